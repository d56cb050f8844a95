"""Registration session (forced command) without sshd: parsing and effects."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from portal_lab import two_moat_portal

from datapath import config as tunnel_config
from datapath.esp import NEXT_HEADER_IPV4, OutboundSA, SAConfig
from portal.daemon import SEQUENCE_BLOCK, Portal, handle
from portal.db import Database, NoSuchMoat
from portal.record import MoatRecord
from portal.register import MoatConfig, load_config, parse_answer, tunnel_config_text
from portal.session import (
    Refused,
    parse_command,
    parse_ssh_connection,
    run_session,
)
from portal.settings import PortalSettings, settings_from_dict


@pytest.fixture
def portal(tmp_path: Path) -> tuple[Database, PortalSettings]:
    return two_moat_portal(tmp_path)


INJECTIONS = [
    "register; rm -rf /",
    "register && touch /tmp/pwned",
    "register $(touch /tmp/pwned)",
    "register `id`",
    "register proto=1|sh",
    "register\nid",
    "register subnet=10.200.0.16/28",
    "register address=203.0.113.9",
    "register id=m2",
    "register proto=1 proto=1",
    "register proto=2",
    "sh -c id",
    "",
    "register " + "x" * 300,
]


@pytest.mark.parametrize("command", INJECTIONS)
def test_injections_refused(command: str) -> None:
    with pytest.raises(Refused):
        parse_command(command)


def test_good_commands() -> None:
    assert parse_command("register").command == "register"
    assert parse_command("register proto=1 generation=7").params == {
        "proto": "1",
        "generation": "7",
    }


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_parser_only_refuses(text: str) -> None:
    """Any string: a Request made only of allow-listed tokens, or Refused."""
    try:
        req = parse_command(text)
    except Refused:
        return
    assert req.command == "register"
    assert set(req.params) <= {"proto", "generation"}
    assert all(v.isalnum() for v in req.params.values())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_ssh_connection_parser_only_refuses(text: str) -> None:
    try:
        origin = parse_ssh_connection(text)
    except Refused:
        return
    assert isinstance(origin.address, ipaddress.IPv4Address)


def env(command: str, address: str = "198.51.100.7") -> dict[str, str]:
    return {
        "SSH_ORIGINAL_COMMAND": command,
        "SSH_CONNECTION": f"{address} 40000 192.0.2.1 22",
    }


def load_config_for_test(tmp_path: Path) -> MoatConfig:
    (tmp_path / "moat.toml").write_text('[register]\nid = "m1"\nportal = "192.0.2.1"\n')
    return load_config(tmp_path / "moat.toml")


def test_session_records_address_and_rotates_keys(
    portal: tuple[Database, PortalSettings], tmp_path: Path
) -> None:
    db, s = portal
    first = run_session(db, s, "m1", env("register proto=1"))
    second = run_session(db, s, "m1", env("register proto=1", "198.51.100.8"))
    rec = db.get("m1")
    assert str(rec.learned.address) == "198.51.100.8"
    assert rec.sa is not None and rec.sa.generation == 2
    assert rec.sa_previous is not None and rec.sa_previous.generation == 1
    assert first["sa_out"]["spi"] != second["sa_out"]["spi"]
    assert first["sa_out"]["key"] != second["sa_out"]["key"]
    assert second["sa_out"]["spi"] == rec.sa.spi_to_portal
    assert second["subnet"] == str(rec.subnet)
    assert second["portal"] == {
        "address": "192.0.2.1",
        "port": 4500,
        "encapsulation": "udp",
        "mtu_policy": "virtual-large",
    }
    # the moat side accepts it and writes its tunnel file
    answer = parse_answer(json.dumps({"ok": True, **second}))
    cfg = load_config_for_test(tmp_path)
    tunnel = tunnel_config.parse(tunnel_config_text(cfg, answer), "t")
    assert tunnel.sa_in.spi == second["sa_in"]["spi"]
    assert tunnel.sa_out.key.hex() == second["sa_out"]["key"]
    assert [str(n) for n in tunnel.remote_subnets] == ["10.10.0.0/16"]
    assert str(tunnel.outer.remote) == "192.0.2.1"


def test_static_moat_cannot_register_from_elsewhere(
    portal: tuple[Database, PortalSettings],
) -> None:
    db, s = portal
    with pytest.raises(Refused, match="static"):
        run_session(db, s, "m2", env("register", "198.51.100.7"))
    assert db.get("m2").sa is None
    run_session(db, s, "m2", env("register", "192.0.2.50"))


def test_refused_session_changes_nothing(
    portal: tuple[Database, PortalSettings],
) -> None:
    db, s = portal
    before = db.get("m1")
    with pytest.raises(Refused):
        run_session(db, s, "m1", env("register; reboot"))
    with pytest.raises(Refused):
        run_session(db, s, "m1", {"SSH_ORIGINAL_COMMAND": "register"})
    assert db.get("m1") == before


def test_portal_reload_touches_one_moat(
    portal: tuple[Database, PortalSettings],
) -> None:
    db, s = portal
    run_session(db, s, "m2", env("register", "192.0.2.50"))
    p = Portal(db, s)
    p.load(0.0)
    assert p.dp.peers == {}  # peers are built on first use
    assert p.status()["ready"] == 1  # m1 never registered
    # a packet towards m2's subnet builds m2's peer (and only that one)
    m2_subnet = db.get("m2").subnet
    dst = m2_subnet.network_address + 1
    p.dp.outbound(_ipv4_packet("10.10.0.5", str(dst)), 0.5)
    assert sorted(p.dp.peers) == ["m2"]
    m2 = p.dp.peers["m2"]
    assert m2.tx_bytes == 28  # the packet was handed to the peer
    assert p.activate("m1", 0.6) is False  # not registered: nothing to build

    # m1 registers: known at once, built on its first ESP packet (SPI lookup)
    run_session(db, s, "m1", env("register"), now=dt.datetime.now(dt.UTC))
    assert p.reload("m1", 1.0) == "updated"
    rec = db.get("m1")
    assert rec.sa is not None
    p.dp.inbound(
        rec.sa.spi_to_portal.to_bytes(4, "big") + bytes(40), ("1.2.3.4", 9), 1.1
    )
    # garbage fails the probe SA's ICV: no peer is built, nothing moves
    assert sorted(p.dp.peers) == ["m2"] and p.status()["counters"]["probe_drops"] == 1
    m1_src = str(rec.subnet.network_address + 2)
    p.dp.inbound(_sealed(rec, _ipv4_packet(m1_src, "10.10.0.5")), MOAT_ADDR, 1.2)
    assert sorted(p.dp.peers) == ["m1", "m2"] and p.dp.peers["m2"] is m2
    assert p.dp.peers["m1"].endpoint == MOAT_ADDR
    assert p.dp.peers["m1"].rx_packets == 1

    # re-registration: make-before-break rekey, both inbound SAs installed
    run_session(db, s, "m1", env("register", "198.51.100.9"))
    assert p.reload("m1", 2.0) == "updated"
    rec = db.get("m1")
    assert rec.sa is not None and rec.sa_previous is not None
    assert rec.sa.spi_to_portal in p.dp.spis
    assert rec.sa_previous.spi_to_portal in p.dp.spis
    assert p.dp.peers["m1"].pending_out is not None
    assert p.dp.peers["m1"].endpoint == ("198.51.100.9", 4500)

    # a corrupt record takes down only that moat
    (db.moats_dir / "m1.toml").write_text("garbage = [")
    assert p.reload("m1", 3.0) == "skipped"
    assert "m1.toml" in p.status()["problems"]
    assert sorted(p.dp.peers) == ["m2"] and p.dp.peers["m2"] is m2
    db.remove("m2")
    assert p.reload("m2", 4.0) == "removed"
    assert p.dp.peers == {}


MOAT_ADDR = ("198.51.100.7", 4500)


def _sealed(rec: MoatRecord, inner: bytes, seq: int = 0) -> bytes:
    """An ESP packet as the moat `rec` sends it (its key to the portal)."""
    assert rec.sa is not None
    sa = rec.sa
    out = OutboundSA(
        SAConfig(spi=sa.spi_to_portal, transform=sa.transform, key=sa.key_to_portal)
    )
    out.seq = seq
    return out.seal(inner, NEXT_HEADER_IPV4)


def _ipv4_packet(src: str, dst: str) -> bytes:
    import ipaddress as ip

    header = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0])
    return header + ip.IPv4Address(src).packed + ip.IPv4Address(dst).packed + bytes(8)


def test_control_protocol(portal: tuple[Database, PortalSettings]) -> None:
    db, s = portal
    p = Portal(db, s)
    p.load(0.0)
    assert handle(p, b'{"op": "ping"}') == {"ok": True}
    assert handle(p, b'{"op": "status"}')["moats"] == 2
    assert handle(p, b"\xff\xfe")["ok"] is False
    assert handle(p, b"[1]")["ok"] is False
    assert handle(p, b'{"op": "reload"}')["ok"] is False
    assert "unknown op" in handle(p, b'{"op": "rm"}')["error"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_control_never_raises(line: bytes) -> None:
    p = _EMPTY_PORTAL
    assert isinstance(handle(p, line), dict)


class _NoDb(Database):
    def get(self, moat_id: str) -> object:  # type: ignore[override]
        raise NoSuchMoat(moat_id)


_EMPTY_PORTAL = Portal(
    _NoDb("/nonexistent"),
    settings_from_dict(
        {"endpoint": "192.0.2.1", "pool": "10.0.0.0/8", "host_key": "/x"}, "t"
    ),
)


def test_sequence_reservation_survives_restart(
    portal: tuple[Database, PortalSettings],
) -> None:
    db, s = portal
    run_session(db, s, "m1", env("register"))
    p = Portal(db, s)
    p.load(0.0)
    assert p.activate("m1", 0.0)
    peer = p.dp.peers["m1"]
    # a restored SA starts past anything a previous run could have sent
    assert peer.out_sa.seq == SEQUENCE_BLOCK
    peer.out_sa.seq = SEQUENCE_BLOCK + SEQUENCE_BLOCK // 2 + 5
    p.reserve_sequences()
    again = Portal(db, s)
    again.load(0.0)
    assert again.activate("m1", 0.0)
    assert again.dp.peers["m1"].out_sa.seq > peer.out_sa.seq
