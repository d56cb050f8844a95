"""Registration session (forced command) without sshd: parsing and effects."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket as socketlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portal import control
from portal.daemon import MoatTable
from portal.db import Database
from portal.provision import add_many
from portal.register import parse_answer, tunnel_config_text
from portal.session import (
    Origin,
    Refused,
    parse_command,
    parse_ssh_connection,
    run_session,
)
from portal.settings import PortalSettings, settings_from_dict, settings_to_toml


@pytest.fixture
def portal(tmp_path: Path) -> tuple[Database, PortalSettings]:
    hk = tmp_path / "hk.pub"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)[:-4]],
                   check=True)  # fmt: skip
    s = settings_from_dict(
        {
            "endpoint": "192.0.2.1",
            "pool": "10.200.0.0/16",
            "host_key": str(hk),
            "networks": ["10.10.0.0/16"],
            "control": str(tmp_path / "ctl.sock"),
        },
        "test",
    )
    db = Database(tmp_path / "db")
    db.create_layout()
    add_many(db, s, [("", {"id": "m1", "email": "a@example.com"}),
                     ("", {"id": "m2", "email": "b@example.com",
                           "wild": "192.0.2.50"})])  # fmt: skip
    return db, s


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


def test_session_records_address_and_rotates_keys(
    portal: tuple[Database, PortalSettings],
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
    assert second["portal"] == {"address": "192.0.2.1", "port": 4500,
                                "encapsulation": "udp"}  # fmt: skip
    # the moat side accepts it and writes its tunnel file
    answer = parse_answer(json.dumps({"ok": True, **second}))
    text = tunnel_config_text(answer, json.dumps(first["sa_in"]))
    assert f"spi = {first['sa_in']['spi']}" in text


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


def test_daemon_told_through_control_socket(
    portal: tuple[Database, PortalSettings], moat_cmd: list[str], tmp_path: Path
) -> None:
    db, s = portal
    (db.root / "portal.toml").write_text(settings_to_toml(s))
    daemon = subprocess.Popen([*moat_cmd, "portal", "--db", str(db.root), "run"])
    try:
        _wait(lambda: Path(s.control).exists())
        assert control.request(s.control, {"op": "ping"})["ok"]
        run_session(db, s, "m1", env("register"))
        status = control.request(s.control, {"op": "status"})
        assert status["moats"] == 2 and status["registered"] == 1
        assert status["counters"]["reloads"] == 1
        with pytest.raises(control.ControlError, match="unknown op"):
            control.request(s.control, {"op": "format-disk"})
        # garbage on the socket does not hurt the daemon
        with socketlib.socket(socketlib.AF_UNIX) as sock:
            sock.connect(s.control)
            sock.sendall(b"\xff" * 1000 + b"\n")
        assert control.request(s.control, {"op": "ping"})["ok"]
    finally:
        daemon.terminate()
        assert daemon.wait(10) == 0


def _wait(pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_moat_table_reload_touches_one_moat(
    portal: tuple[Database, PortalSettings],
) -> None:
    db, s = portal
    table = MoatTable(db)
    table.load()
    m2 = table.moats["m2"]
    run_session(db, s, "m1", env("register"), now=dt.datetime.now(dt.UTC))
    assert table.reload("m1") == "updated"
    assert table.moats["m2"] is m2
    (db.moats_dir / "m1.toml").write_text("garbage = [")
    assert table.reload("m1") == "skipped"
    assert "m1.toml" in table.status()["problems"]
    assert table.moats["m2"] is m2
    db.remove("m2")
    assert table.reload("m2") == "removed"
    assert Origin  # re-exported type used by the registration path
