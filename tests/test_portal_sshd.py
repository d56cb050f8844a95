"""Registration through a real OpenSSH sshd, with the refusals that matter."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Host, Lab
from portal_lab import SSH_PORT, SSH_USER, PortalSite, moat_argv

from datapath import config as tunnel_config
from portal.db import Database
from portal.register import load_config, ssh_argv

pytestmark = pytest.mark.netns

PORTAL = "10.99.0.1"
MOAT = "10.99.0.2"


@pytest.fixture
def site(lab: Lab) -> Iterator[tuple[PortalSite, Host]]:
    portal = lab.host("portal")
    moat = lab.host("moat")
    lab.link(portal, "eth0", f"{PORTAL}/24", moat, "eth0", f"{MOAT}/24")
    s = PortalSite(portal, PORTAL)
    try:
        yield s, moat
    finally:
        s.close()


def register(moat: Host, bundle: Path) -> subprocess.CompletedProcess[str]:
    return moat.run(*moat_argv("register", "--config", str(bundle / "moat.toml")),
                    check=False, timeout=120)  # fmt: skip


def raw_ssh(
    moat: Host, bundle: Path, command: str, *opts: str
) -> subprocess.CompletedProcess[str]:
    argv = ssh_argv(load_config(bundle / "moat.toml"), None)
    argv = [*argv[:-2], *opts, argv[-2], command]
    return moat.run(*argv, check=False, timeout=60)


def test_registration_and_refusals(
    site: tuple[PortalSite, Host], tmp_path: Path
) -> None:
    s, moat = site
    m1, m2, m3 = s.add("m1"), s.add("m2"), s.add("m3")
    db = Database(s.db)

    # the key lookup script and the Python lookup agree, run as nobody
    blob = (m1 / "id_ed25519.pub").read_text().split()[1]
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(m1 / "id_ed25519.pub")],
        capture_output=True, text=True, check=True,
    ).stdout.split()[1]  # fmt: skip
    script = subprocess.run(
        ["su", "-s", "/bin/sh", "nobody", "-c",
         f"{s.keys_command} {SSH_USER} ssh-ed25519 {blob} {fingerprint}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    python = s.moat("authorized-keys", SSH_USER, "ssh-ed25519", blob)
    assert script == python and "--id m1" in script and script.startswith("restrict,")

    # without the daemon the moat is told to come back later, nothing changes
    res = register(moat, m1)
    assert res.returncode != 0 and "daemon is not running" in res.stderr
    assert db.get("m1").sa is None
    daemon = s.start_daemon(tmp_path / "portal.log")

    # registration: address from the connection, keys in the answer
    t0 = time.monotonic()
    res = register(moat, m1)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    print(f"registration through sshd took {took:.2f}s")
    rec = db.get("m1")
    assert str(rec.learned.address) == MOAT
    tunnel = tunnel_config.load(m1 / "tunnel.toml")
    assert rec.sa is not None
    assert tunnel.sa_out.spi == rec.sa.spi_to_portal
    assert tunnel.sa_out.key == rec.sa.key_to_portal
    assert str(tunnel.outer.remote) == PORTAL
    assert [str(n) for n in tunnel.local_subnets] == [str(rec.subnet)]
    state = json.loads((m1 / "registration.json").read_text())
    assert state["address"] == MOAT
    # a second registration rotates the keys
    assert register(moat, m1).returncode == 0
    tunnel2 = tunnel_config.load(m1 / "tunnel.toml")
    assert json.loads((m1 / "registration.json").read_text())["generation"] == (
        state["generation"] + 1
    )
    assert tunnel2.sa_out.key != tunnel.sa_out.key
    assert tunnel2.sa_in.spi != tunnel.sa_in.spi

    # a key not in the database is refused by sshd
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    for name in ("moat.toml", "known_hosts"):
        (stranger / name).write_text((m1 / name).read_text())
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                    "-f", str(stranger / "id_ed25519")], check=True)  # fmt: skip
    res = register(moat, stranger)
    assert res.returncode != 0 and "Permission denied" in res.stderr

    # command injection: refused, and nothing was executed
    before = db.get("m1")
    canary = tmp_path / "pwned"
    for attack in (
        f"register; touch {canary}",
        f"register proto=1 $(touch {canary})",
        f"register `touch {canary}`",
        f"touch {canary}",
        f"register proto=1 && touch {canary}",
    ):
        res = raw_ssh(moat, m1, attack)
        answer = json.loads(res.stdout)
        assert res.returncode == 1 and answer["ok"] is False, attack
    assert not canary.exists()
    assert db.get("m1") == before

    # a moat cannot claim another's subnet or address: the claim is refused
    # and its own record still shows the connection's address
    m2_subnet = db.get("m2").subnet
    for claim in (f"register subnet={m2_subnet}", "register address=10.99.0.9"):
        assert json.loads(raw_ssh(moat, m1, claim).stdout)["ok"] is False
    assert db.get("m2").sa is None and db.get("m2").learned.address is None

    # restrict: no PTY, no (remote) port forwarding
    res = raw_ssh(moat, m1, "register", "-o", "ExitOnForwardFailure=yes",
                  "-R", "127.0.0.1:9999:127.0.0.1:22")  # fmt: skip
    assert res.returncode == 255
    res = raw_ssh(moat, m1, "register", "-tt")
    assert "PTY allocation request failed" in res.stderr or res.returncode != 0

    # a corrupt record is refused cleanly while the others keep working
    (s.db / "moats" / "m3.toml").write_text("version = [broken\n")
    res = register(moat, m3)
    assert res.returncode != 0 and "not valid TOML" in res.stderr
    assert register(moat, m2).returncode == 0
    assert str(db.get("m2").learned.address) == MOAT

    # the moat pins the portal's host key: another key is refused
    (m2 / "known_hosts").write_text(
        f"[{PORTAL}]:{SSH_PORT} " + (stranger / "id_ed25519.pub").read_text()
    )
    res = register(moat, m2)
    assert res.returncode != 0 and "Host key verification failed" in res.stderr

    # the daemon installed what the moats were told
    status = json.loads(s.moat("status"))
    assert status["counters"]["registered"] >= 3  # m1 (twice and more), m2
    assert status["ready"] == 2 and "m3.toml" in status["problems"]
    daemon.terminate()
    assert daemon.wait(20) == 0
