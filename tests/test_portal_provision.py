"""Provisioning verbs: init/add/import/export/list/show/remove, welcome mail."""

from __future__ import annotations

import email
import email.policy
import socket
import subprocess
import tarfile
import time
import tomllib
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from moat.errors import MoatError
from portal.db import Database
from portal.provision import allocate_subnet, read_csv
from portal.record import RecordError
from portal.settings import load_settings


def moat(moat_cmd: list[str], db: Path, *args: str, ok: bool = True) -> str:
    res = subprocess.run(
        [*moat_cmd, "portal", "--db", str(db), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if ok:
        assert res.returncode == 0, res.stderr
        return res.stdout
    assert res.returncode != 0, res.stdout
    return res.stderr


@pytest.fixture
def portal_db(tmp_path: Path, moat_cmd: list[str]) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")],
        check=True,
    )
    db = tmp_path / "db"
    moat(
        moat_cmd, db, "init", "--endpoint", "192.0.2.1", "--pool", "10.200.0.0/24",
        "--prefix", "28", "--host-key", str(tmp_path / "hk.pub"),
        "--network", "10.10.0.0/16", "--ssh-port", "2222",
    )  # fmt: skip
    return db


def test_add_writes_moat_file_set(
    portal_db: Path, tmp_path: Path, moat_cmd: list[str]
) -> None:
    out = moat(moat_cmd, portal_db, "add", "m1", "--email", "a@example.com",
               "--out", str(tmp_path / "m1"))  # fmt: skip
    assert "10.200.0.0/28" in out
    files = tmp_path / "m1"
    cfg = tomllib.loads((files / "moat.toml").read_text())
    assert cfg["register"]["id"] == "m1"
    assert cfg["register"]["port"] == 2222
    assert cfg["lan"]["subnet"] == "10.200.0.0/28"
    # the key pair is a real OpenSSH key: ssh-keygen derives the same public key
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(files / "id_ed25519")],
        capture_output=True, text=True, check=True,
    ).stdout.split()[:2]  # fmt: skip
    assert derived == (files / "id_ed25519.pub").read_text().split()[:2]
    assert (files / "id_ed25519").stat().st_mode & 0o077 == 0
    host_key = (tmp_path / "hk.pub").read_text().split()[:2]
    assert (files / "known_hosts").read_text().split() == [
        "[192.0.2.1]:2222",
        *host_key,
    ]
    # the portal keeps only the public half
    record = (portal_db / "moats" / "m1.toml").read_text()
    assert derived[1] in record and "PRIVATE" not in record

    moat(moat_cmd, portal_db, "add", "m2", "--email", "b@example.com",
         "--out", str(tmp_path / "m2.tar.gz"), "--no-mail")  # fmt: skip
    with tarfile.open(tmp_path / "m2.tar.gz") as tar:
        names = sorted(tar.getnames())
        assert tar.getmember("id_ed25519").mode == 0o600
    assert names == ["id_ed25519", "id_ed25519.pub", "known_hosts", "moat.toml"]
    listing = moat(moat_cmd, portal_db, "list")
    assert "m1" in listing and "10.200.0.16/28" in listing


@pytest.mark.parametrize(
    "args,message",
    [
        (["add", "Bad!", "--email", "a@example.com"], "id"),
        (["add", "m9", "--email", "nope"], "email"),
        (["add", "m9", "--email", "a@example.com", "--wild", "1.2.3"], "wild"),
        (
            ["add", "m9", "--email", "a@example.com", "--subnet", "10.200.0.1/28"],
            "host bits",
        ),
        (["add", "m1", "--email", "a@example.com"], "exists"),
        (
            ["add", "m9", "--email", "a@example.com", "--subnet", "10.200.0.0/29"],
            "overlaps",
        ),
        (["show", "nosuch"], "no moat"),
        (["remove", "nosuch"], "no moat"),
        (["import", "/nonexistent.csv"], "No such file"),
    ],
)
def test_bad_input_clear_errors(
    portal_db: Path, tmp_path: Path, moat_cmd: list[str], args: list[str], message: str
) -> None:
    moat(moat_cmd, portal_db, "add", "m1", "--email", "a@example.com",
         "--out", str(tmp_path / "m1"), "--no-mail")  # fmt: skip
    if args[0] == "add":
        args = [*args, "--out", str(tmp_path / "x"), "--no-mail"]
    err = moat(moat_cmd, portal_db, *args, ok=False)
    assert message in err
    assert "Traceback" not in err


def test_import_export_moves_moats_between_portals(
    portal_db: Path, tmp_path: Path, moat_cmd: list[str]
) -> None:
    csv = tmp_path / "customers.csv"
    csv.write_text(
        "id,email,wild\n"
        "alice,alice@example.com,dhcp\n"
        "bob,bob@example.com,192.0.2.50\n"
        "carol,carol@example.com,\n"
    )
    out = moat(moat_cmd, portal_db, "import", str(csv), "--out", str(tmp_path / "sets"),
               "--no-mail")  # fmt: skip
    assert "imported 3" in out
    assert (tmp_path / "sets" / "bob" / "id_ed25519").exists()
    exported = moat(moat_cmd, portal_db, "export")

    # a second portal takes the export: same ids, subnets and keys, no new keys
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "hk2")], check=True)  # fmt: skip
    moat(moat_cmd, other, "init", "--endpoint", "192.0.2.2", "--pool", "10.201.0.0/16",
         "--network", "10.10.0.0/16", "--host-key", str(tmp_path / "hk2.pub"),
    )  # fmt: skip
    (tmp_path / "export.csv").write_text(exported)
    moved = tmp_path / "moved"
    moat(moat_cmd, other, "import", str(tmp_path / "export.csv"), "--no-mail",
         "--out", str(moved))  # fmt: skip
    # each moved moat gets a fresh file set for the new portal: its address,
    # its pinned host key; no private key (the moat keeps its own id_ed25519)
    new_host_key = (tmp_path / "hk2.pub").read_text().split()[1]
    for moat_id in ("alice", "bob", "carol"):
        files = sorted(p.name for p in (moved / moat_id).iterdir())
        assert files == ["id_ed25519.pub", "known_hosts", "moat.toml"]
        conf = tomllib.loads((moved / moat_id / "moat.toml").read_text())
        assert conf["register"]["portal"] == "192.0.2.2"
        assert conf["register"]["identity"] == "id_ed25519"
        pin = (moved / moat_id / "known_hosts").read_text()
        assert new_host_key in pin and "192.0.2.2" in pin
        old_pub = (tmp_path / "sets" / moat_id / "id_ed25519.pub").read_text()
        assert (moved / moat_id / "id_ed25519.pub").read_text() == old_pub
    a = Database(portal_db).load_all().records
    b = Database(other).load_all().records
    assert sorted(a) == sorted(b) == ["alice", "bob", "carol"]
    for moat_id in a:
        assert (a[moat_id].ssh_key, a[moat_id].subnet, a[moat_id].wild) == (
            b[moat_id].ssh_key, b[moat_id].subnet, b[moat_id].wild,
        )  # fmt: skip


def test_import_is_all_or_nothing(
    portal_db: Path, tmp_path: Path, moat_cmd: list[str]
) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("id,email\nok1,ok1@example.com\nbad id,x@example.com\n")
    err = moat(moat_cmd, portal_db, "import", str(csv), "--out", str(tmp_path / "s"),
               ok=False)  # fmt: skip
    assert "line 3" in err
    assert Database(portal_db).load_all().records == {}


def test_csv_header_checked() -> None:
    with pytest.raises(RecordError, match="needs column"):
        list(read_csv("name,mail\na,b\n", "x.csv"))
    with pytest.raises(RecordError, match="unknown column"):
        list(read_csv("id,email,colour\na,b,c\n", "x.csv"))


def test_pool_allocation_fills_gaps_and_runs_out(portal_db: Path) -> None:
    import ipaddress

    s = load_settings(portal_db)
    nets = [ipaddress.IPv4Network(n) for n in ("10.200.0.0/28", "10.200.0.32/27")]
    assert str(allocate_subnet(s, nets)) == "10.200.0.16/28"
    full = [ipaddress.IPv4Network("10.200.0.0/24")]
    with pytest.raises(MoatError, match="no free"):
        allocate_subnet(s, full)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        return "250 OK"


def test_welcome_mail_through_real_smtp(
    portal_db: Path, tmp_path: Path, moat_cmd: list[str]
) -> None:
    inbox = Inbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings_file = portal_db / "portal.toml"
        settings_file.write_text(
            settings_file.read_text().replace('smtp = ""', f'smtp = "127.0.0.1:{port}"')
        )
        out = moat(moat_cmd, portal_db, "add", "m1", "--email", "alice@example.com",
                   "--out", str(tmp_path / "m1"))  # fmt: skip
        assert f"smtp 127.0.0.1:{port}" in out
        deadline = time.monotonic() + 10
        while not inbox.messages and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        controller.stop()
    [msg] = inbox.messages
    assert msg["To"] == "alice@example.com"
    assert msg["X-Moat-Id"] == "m1"
    assert "m1" in msg["Subject"]
    body = msg.get_content()
    assert "DHCP" in body
    assert "10.200.0.2 .. 10.200.0.14" in body  # the client range
    assert "gateway, DNS   10.200.0.1" in body
    assert "10.10.0.0/16" in body


def test_welcome_mail_to_outbox_without_smtp(
    portal_db: Path, tmp_path: Path, moat_cmd: list[str]
) -> None:
    moat(moat_cmd, portal_db, "add", "m1", "--email", "alice@example.com",
         "--out", str(tmp_path / "m1"))  # fmt: skip
    raw = (portal_db / "outbox" / "m1.eml").read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["To"] == "alice@example.com"


def test_smtp_failure_is_a_clear_error(
    portal_db: Path, tmp_path: Path, moat_cmd: list[str]
) -> None:
    settings_file = portal_db / "portal.toml"
    settings_file.write_text(
        settings_file.read_text().replace('smtp = ""', 'smtp = "127.0.0.1:1"')
    )
    err = moat(moat_cmd, portal_db, "add", "m1", "--email", "a@example.com",
               "--out", str(tmp_path / "m1"), ok=False)  # fmt: skip
    assert "sending mail via 127.0.0.1:1" in err
