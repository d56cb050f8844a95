"""Portal state across restarts and idle time, without namespaces.

Inbound replay marks (a packet the moat sent before a portal restart is not
accepted again after it), idle peers retired, and peers built only for
packets that pass the ICV.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapath import config as tunnel_config
from datapath.cli import build_sas
from datapath.esp import NEXT_HEADER_IPV4, InboundSA, OutboundSA, SAConfig
from datapath.replay import DUPLICATE, TOO_OLD, ReplayWindow
from datapath.replaymarks import (
    RESTORE_MARGIN,
    SAVE_PACKETS,
    SAVE_SECONDS,
    ReplayMarks,
)
from portal.daemon import PROBE_CACHE, PROBES_PER_TICK, Portal
from portal.db import Database
from portal.provision import add_many
from portal.record import MoatRecord
from portal.register import (
    NO_ANSWER_AFTER,
    TunnelWatch,
    load_config,
    rekey_reason,
    tunnel_config_text,
)
from portal.session import Origin, register
from portal.settings import PortalSettings, settings_from_dict

MOAT_ADDR = ("198.51.100.7", 4500)
CORP = "10.10.0.5"
KEY = bytes(range(20))


# --- the replay window's restart ------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([1, 32, 64, 65, 1024, 4096]),
    top=st.integers(1, 1 << 40),
    esn=st.booleans(),
    data=st.data(),
)
def test_restored_window_accepts_nothing_at_or_below_its_edge(
    size: int, top: int, esn: bool, data: st.DataObject
) -> None:
    if not esn:
        top &= 0xFFFF_FFFF
        top = max(top, 1)
    w = ReplayWindow(size, esn)
    w.restore(top)
    # with ESN a low half left of the window reads as the next 2^32 block,
    # whose ICV then fails (RFC 4303 A2.2): only the window itself is asked
    reach = size - 1 if esn else 3 * size
    below = data.draw(st.integers(max(1, top - reach), top))
    lo = below & 0xFFFF_FFFF
    assert w.check(lo) in (DUPLICATE, TOO_OLD)
    # numbers to the right are accepted, and in any order after a jump
    ahead = data.draw(st.integers(2, 200))
    if not esn and top + ahead > 0xFFFF_FFFF:
        return
    assert w.check((top + 1) & 0xFFFF_FFFF) == top + 1
    w.update(top + ahead)
    first = max(top + 1, top + ahead - size + 1)  # still inside the window
    if first > top + ahead - 1:
        return
    late = data.draw(st.integers(first, top + ahead - 1))
    assert w.check(late & 0xFFFF_FFFF) == late  # bits above the edge were clear
    w.update(late)
    assert w.check(late & 0xFFFF_FFFF) == DUPLICATE


def _sa(spi: int = 0x1234, key: bytes = KEY) -> InboundSA:
    return InboundSA(SAConfig(spi=spi, transform="aes-gcm-128", key=key))


def test_marks_exact_after_clean_stop_margin_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "replay.json"
    sa = _sa()
    sa.replay.update(5000)
    marks = ReplayMarks(path)
    assert not marks.due([sa], 1.0)  # moved, but not for SAVE_SECONDS
    assert marks.due([sa], 1.0 + SAVE_SECONDS)
    marks.save([sa], 1.0 + SAVE_SECONDS)
    assert not marks.due([sa], 100.0)
    sa.replay.update(5000 + SAVE_PACKETS)
    assert marks.due([sa], 100.0)  # far enough beyond the saved mark

    # crash: the mark was written while the SA received -> margin
    crashed = _sa()
    assert ReplayMarks(path).restore(crashed)
    assert crashed.replay.top == 5000 + RESTORE_MARGIN
    assert RESTORE_MARGIN > SAVE_PACKETS + 4 * 100_000

    # clean stop: exact
    marks.save([sa], 200.0, clean=True)
    clean = _sa()
    assert ReplayMarks(path).restore(clean)
    assert clean.replay.top == 5000 + SAVE_PACKETS

    # same SPI, new keys: no mark; a lost file: no marks, no crash
    assert not ReplayMarks(path).restore(_sa(key=bytes(20)))
    path.write_text("{not json")
    assert not ReplayMarks(path).restore(_sa())


def test_marks_of_other_sas_keep_their_uncertainty(tmp_path: Path) -> None:
    """A mark written while its SA received stays "open" through a clean stop
    of a run that never rebuilt that SA (its tail is still unknown)."""
    path = tmp_path / "replay.json"
    a, b = _sa(0x100), _sa(0x200)
    a.replay.update(10)
    b.replay.update(20)
    ReplayMarks(path).save([a, b], 0.0)  # then a crash
    second = ReplayMarks(path)
    a2 = _sa(0x100)
    second.restore(a2)
    second.save([a2], 1.0, clean=True)  # b was never rebuilt in this run
    doc = json.loads(path.read_text())
    assert list(doc["open"].values()) == [20]
    assert list(doc["exact"].values()) == [10 + RESTORE_MARGIN]


# --- the portal -------------------------------------------------------------------


def _settings(tmp_path: Path, **extra: object) -> PortalSettings:
    hk = tmp_path / "hk.pub"
    if not hk.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)[:-4]],
            check=True,
        )
    return settings_from_dict(
        {
            "endpoint": "192.0.2.1",
            "pool": "10.200.0.0/16",
            "host_key": str(hk),
            "networks": ["10.10.0.0/16"],
            "control": str(tmp_path / "ctl.sock"),
            "mtu_policy": "plain",
            **extra,
        },
        "test",
    )


def _db(tmp_path: Path, s: PortalSettings, count: int) -> Database:
    db = Database(tmp_path / "db")
    db.create_layout()
    rows = [("", {"id": f"m{i}", "email": f"m{i}@example.com"}) for i in range(count)]
    add_many(db, s, rows)
    when = dt.datetime.now(dt.UTC)
    for i in range(count):
        register(db, s, f"m{i}", Origin(ipaddress.IPv4Address(MOAT_ADDR[0]), 0), when)
    return db


class Moat:
    """The moat's sending half of its current SA."""

    def __init__(self, rec: MoatRecord) -> None:
        assert rec.sa is not None
        sa = rec.sa
        self.sa = OutboundSA(
            SAConfig(spi=sa.spi_to_portal, transform=sa.transform, key=sa.key_to_portal)
        )
        self.src = str(rec.subnet.network_address + 2)

    def packet(self, n: int) -> bytes:
        header = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0])
        inner = (
            header
            + ipaddress.IPv4Address(self.src).packed
            + ipaddress.IPv4Address(CORP).packed
            + n.to_bytes(8, "big")
        )
        return self.sa.seal(inner, NEXT_HEADER_IPV4)


def _delivered(p: Portal) -> list[bytes]:
    out = list(p.dp.tun_queue)
    p.dp.tun_queue.clear()
    return out


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_packets_from_before_a_restart_are_not_accepted_after_it(
    tmp_path: Path, stop: str
) -> None:
    s = _settings(tmp_path)
    db = _db(tmp_path, s, 1)
    moat = Moat(db.get("m0"))
    first = Portal(db, s)
    first.load(0.0)
    captured = [moat.packet(i) for i in range(300)]
    for i, esp in enumerate(captured):
        first.dp.inbound(esp, MOAT_ADDR, 1.0 + i / 1000)
        if i == 200:
            first.tick(1.0 + SAVE_SECONDS)  # marks saved while receiving
    assert len(_delivered(first)) == 300
    if stop == "clean":
        first.stopped(20.0)

    again = Portal(db, s)
    again.load(0.0)
    for esp in captured:  # replayed, from another address
        again.dp.inbound(esp, ("203.0.113.66", 4500), 30.0)
    assert _delivered(again) == []
    assert again.dp.peers == {}  # nothing built either
    assert again.counters["probe_drops"] == 300

    if stop == "clean":
        # the moat's next packets flow at once
        again.dp.inbound(moat.packet(300), MOAT_ADDR, 31.0)
        assert len(_delivered(again)) == 1
        assert again.status()["replay_marks"]["restored_with_margin"] == 0
    else:
        # after a crash the edge is mark + margin: the moat's packets flow
        # again past it (or at once on new SAs after its registration)
        moat.sa.seq = 200 + RESTORE_MARGIN
        again.dp.inbound(moat.packet(301), MOAT_ADDR, 31.0)
        assert _delivered(again) == []
        again.dp.inbound(moat.packet(302), MOAT_ADDR, 31.0)
        assert len(_delivered(again)) == 1
        assert again.status()["replay_marks"]["restored_with_margin"] >= 1
    # with the peer built, replays are counted on it
    for esp in captured[-50:]:
        again.dp.inbound(esp, ("203.0.113.66", 4500), 32.0)
    peer = again.dp.peers["m0"]
    # far left of the window, ESN reads a low half as the next 2^32 block
    # and the ICV fails (RFC 4303 A2.2): dropped all the same
    drops = ("rx_replay", "rx_replay_window", "rx_icv")
    assert sum(peer.counters[k] for k in drops) == 50
    assert peer.endpoint == MOAT_ADDR
    assert _delivered(again) == []


def test_crash_before_the_first_save_and_new_sas_after_it(tmp_path: Path) -> None:
    """An SA that received but had no mark saved yet when the portal crashed
    restarts at the margin; SAs registered after the restart start empty."""
    s = _settings(tmp_path)
    db = _db(tmp_path, s, 1)
    moat = Moat(db.get("m0"))
    first = Portal(db, s)
    first.load(0.0)
    captured = [moat.packet(i) for i in range(10)]
    for esp in captured:
        first.dp.inbound(esp, MOAT_ADDR, 1.0)
    assert len(_delivered(first)) == 10  # and then a crash, nothing saved

    again = Portal(db, s)
    again.load(0.0)
    for esp in captured:
        again.dp.inbound(esp, ("203.0.113.66", 4500), 2.0)
    assert _delivered(again) == [] and again.dp.peers == {}
    again.dp.inbound(moat.packet(10), MOAT_ADDR, 2.0)
    assert _delivered(again) == []  # the moat too, until it registers again

    # the moat registers again (new SAs): its packets flow at once
    when = dt.datetime.now(dt.UTC)
    register(db, s, "m0", Origin(ipaddress.IPv4Address(MOAT_ADDR[0]), 0), when)
    again.reload("m0", 3.0)
    fresh = Moat(db.get("m0"))
    again.dp.inbound(fresh.packet(0), MOAT_ADDR, 3.1)
    assert len(_delivered(again)) == 1


def test_idle_peers_retired_and_rebuilt(tmp_path: Path) -> None:
    count = 60
    s = _settings(tmp_path, peer_idle=30)
    db = _db(tmp_path, s, count)
    p = Portal(db, s)
    p.load(0.0)
    moats = [Moat(db.get(f"m{i}")) for i in range(count)]

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n in range(3):
            for m in moats:
                p.dp.inbound(m.packet(n), MOAT_ADDR, 1.0)
        p.dp.poll(1.0)
        p.tick(1.0)
        built = tracemalloc.get_traced_memory()[0]
        assert p.status()["up"] == count
        p.dp.poll(40.0)
        p.tick(40.0)  # idle for 39 s > peer_idle
        retired = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    print(
        f"{count} peers: +{(built - base) / count / 1024:.1f} KiB each built,"
        f" +{(retired - base) / count / 1024:.1f} KiB each after retirement"
    )
    assert p.status()["up"] == 0 and p.counters["retired"] == count
    assert retired - base < (built - base) / 3

    # the next packet builds the peer again: its window and outbound
    # sequence number continue (no replay, no jump of a reserved block)
    first = moats[0]
    old = first.packet(3)
    p.dp.inbound(old, MOAT_ADDR, 50.0)
    assert "m0" in p.dp.peers and len(_delivered(p)) == 3 * count + 1
    p.dp.inbound(old, MOAT_ADDR, 50.1)
    assert _delivered(p) == [] and p.dp.peers["m0"].counters["rx_replay"] == 1
    first.sa.seq = 1  # a packet from before the retirement
    p.dp.inbound(first.packet(99), MOAT_ADDR, 50.2)
    assert _delivered(p) == []


def test_outbound_sequence_continues_after_retirement(tmp_path: Path) -> None:
    s = _settings(tmp_path, peer_idle=10)
    db = _db(tmp_path, s, 1)
    p = Portal(db, s)
    p.load(0.0)
    assert p.activate("m0", 0.0)
    seq = p.dp.peers["m0"].out_sa.seq
    p.dp.outbound(_ipv4(CORP, str(db.get("m0").subnet.network_address + 2)), 0.5)
    p.tick(1.0)
    p.tick(20.0)
    assert p.dp.peers == {}
    assert p.activate("m0", 21.0)
    assert p.dp.peers["m0"].out_sa.seq == seq + 1


def _ipv4(src: str, dst: str) -> bytes:
    header = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0])
    return (
        header
        + ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + bytes(8)
    )


def test_forged_packets_for_known_spis_build_nothing(tmp_path: Path) -> None:
    count = 40
    s = _settings(tmp_path)
    db = _db(tmp_path, s, count)
    p = Portal(db, s)
    p.load(0.0)
    spis = [db.get(f"m{i}").sa.spi_to_portal for i in range(count)]  # type: ignore[union-attr]
    flood = 4000
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n in range(flood):
            spi = spis[n % count]
            forged = spi.to_bytes(4, "big") + (n + 1).to_bytes(4, "big") + bytes(60)
            p.dp.inbound(forged, ("203.0.113.66", 4500), 1.0)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    st_ = p.status()
    print(
        f"{flood} forged packets: {st_['counters']['probe_drops']} probe ICV drops,"
        f" {st_['probes']} probe SAs, +{(after - base) / 1024:.0f} KiB"
    )
    assert st_["up"] == 0 and p.dp.peers == {}
    assert st_["probes"] == count <= PROBE_CACHE
    assert st_["counters"]["probe_drops"] == flood
    assert st_["counters"]["probes_built"] == count
    assert _delivered(p) == []

    # building probe SAs is rate-limited per tick; the excess is counted
    q = Portal(db, s)
    q.load(0.0)
    q.probe_budget = 10
    for spi in spis:
        q.dp.inbound(spi.to_bytes(4, "big") + bytes(64), MOAT_ADDR, 1.0)
    assert q.counters["probes_built"] == 10
    assert q.counters["probe_rate_limited"] == count - 10
    q.tick(2.0)
    assert q.probe_budget == PROBES_PER_TICK

    # the real moat still gets through at once
    moat = Moat(db.get("m7"))
    p.dp.inbound(moat.packet(1), MOAT_ADDR, 3.0)
    assert sorted(p.dp.peers) == ["m7"] and len(_delivered(p)) == 1


# --- moat register: early registration from the tunnel's status ------------------


def _tunnel_status(
    needs_rekey: bool = False,
    pending: int | None = None,
    in_seq: int = 5,
    esn: bool = True,
    tx_bytes: int = 0,
    rx_packets: int = 0,
) -> dict[str, object]:
    return {
        "peers": {
            "portal": {
                "out_sa": {"spi": 0x201, "seq": 77, "needs_rekey": needs_rekey},
                "pending_out_spi": pending,
                "in_sas": [
                    {"spi": 0x301, "current": True, "esn": esn, "highest_seq": in_seq}
                ],  # fmt: skip
                "tx_bytes": tx_bytes,
                "rx_packets": rx_packets,
            }
        }
    }


def test_rekey_reason_from_the_tunnel_status() -> None:
    assert rekey_reason(_tunnel_status()) is None
    assert "needs rekeying" in str(rekey_reason(_tunnel_status(needs_rekey=True)))
    # a rekey under way is left to finish
    assert rekey_reason(_tunnel_status(needs_rekey=True, pending=0x202)) is None
    # the portal's numbers near the end of a 32-bit space (no ESN)
    assert rekey_reason(_tunnel_status(in_seq=(1 << 32) - 1000, esn=False))
    assert rekey_reason(_tunnel_status(in_seq=(1 << 32) - 1000, esn=True)) is None
    # ... but not after a jump of a reservation block (portal restart)
    assert rekey_reason(_tunnel_status(in_seq=(1 << 24) + 5, esn=False)) is None


def test_register_reads_rekey_packets_and_writes_it_for_the_tunnel(
    tmp_path: Path,
) -> None:
    (tmp_path / "moat.toml").write_text(
        '[register]\nid = "m1"\nportal = "192.0.2.1"\nrekey_packets = 500\n'
    )
    cfg = load_config(tmp_path / "moat.toml")
    assert cfg.rekey_packets == 500
    answer = {
        "generation": 1,
        "portal": {"address": "192.0.2.1", "port": 4500, "encapsulation": "udp"},
        "networks": ["10.10.0.0/16"],
        "subnet": "10.200.0.0/28",
        "sa_in": {"spi": 0x301, "transform": "aes-gcm-128", "key": KEY.hex()},
        "sa_out": {"spi": 0x201, "transform": "aes-gcm-128", "key": KEY[::-1].hex()},
    }
    tunnel = tunnel_config.parse(tunnel_config_text(cfg, answer), "t")
    assert tunnel.rekey_packets == 500
    out_sa, _ = build_sas(tunnel)
    out_sa.seq = 499
    assert not out_sa.needs_rekey
    out_sa.seal(b"\x45" + bytes(19), NEXT_HEADER_IPV4)
    assert out_sa.needs_rekey


def test_watch_registers_when_the_portal_stops_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "moat.toml").write_text('[register]\nid = "m1"\nportal = "x"\n')
    watch = TunnelWatch(load_config(tmp_path / "moat.toml"))
    answers: list[dict[str, object]] = []
    monkeypatch.setattr("portal.register.query", lambda path: answers[-1])

    def at(now: float, **kw: int) -> str | None:
        answers.append(_tunnel_status(**kw))  # type: ignore[arg-type]
        watch.next_poll = 0.0
        return watch.check(now)

    assert at(0.0, tx_bytes=100, rx_packets=10) is None
    assert at(30.0, tx_bytes=900, rx_packets=25) is None  # answers come back
    # sending, nothing back: after NO_ANSWER_AFTER s, register
    assert at(30.0 + NO_ANSWER_AFTER / 2, tx_bytes=5000, rx_packets=25) is None
    reason = at(30.0 + NO_ANSWER_AFTER, tx_bytes=9000, rx_packets=25)
    assert reason is not None and "no packet from the portal" in reason
    # still nothing back after that registration: the next try waits longer
    watch.registered()
    t = 30.0 + NO_ANSWER_AFTER
    assert at(t + 1, tx_bytes=9100, rx_packets=25) is None
    assert at(t + 1 + NO_ANSWER_AFTER, tx_bytes=9500, rx_packets=25) is None
    assert at(t + 1 + 2 * NO_ANSWER_AFTER, tx_bytes=9900, rx_packets=25)
    assert at(t + 300, tx_bytes=9900, rx_packets=26) is None  # answered again
    assert watch.silence_limit == NO_ANSWER_AFTER
    # idle both ways is not silence
    watch.registered()
    assert at(200.0, tx_bytes=9000, rx_packets=25) is None
    assert at(200.0 + 2 * NO_ANSWER_AFTER, tx_bytes=9000, rx_packets=25) is None
    # and no status (tunnel not up yet) is no reason
    monkeypatch.setattr(
        "portal.register.query", lambda path: (_ for _ in ()).throw(OSError("no"))
    )
    watch.next_poll = 0.0
    assert watch.check(1000.0) is None
