"""A portal with a real OpenSSH sshd inside a test namespace.

sshd demands that its AuthorizedKeysCommand and every directory above it be
root-owned and not writable by group or others, which rules out /tmp; the
site therefore lives in a fresh directory under /run, removed afterwards.

Moats log in as the dedicated account SSH_USER (created here if missing, as a
portal's installation would: a system user with /bin/sh and no password),
whose forced command talks to the daemon; root's shell start-up files (which
sshd runs before every command) play no part.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from netns import Host, wait_for

SSHD = "/usr/sbin/sshd"
SSH_PORT = 2222
SSH_USER = "moat"


def two_moat_portal(tmp_path: Path, **settings: Any) -> tuple[Any, Any]:
    """A portal database (no daemon, no sshd) with moats m1 (DHCP) and m2
    (static 192.0.2.50); `settings` adds to or overrides the portal's."""
    from portal.db import Database
    from portal.provision import add_many
    from portal.settings import settings_from_dict

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
            **settings,
        },
        "test",
    )
    db = Database(tmp_path / "db")
    db.create_layout()
    add_many(db, s, [("", {"id": "m1", "email": "a@example.com"}),
                     ("", {"id": "m2", "email": "b@example.com",
                           "wild": "192.0.2.50"})])  # fmt: skip
    return db, s


def ensure_ssh_user(name: str = SSH_USER) -> None:
    """The registration account: /bin/sh, home /, no password ('*')."""

    def exists() -> bool:
        if subprocess.run(["id", "-u", name], capture_output=True).returncode == 0:
            return True
        subprocess.run(
            ["useradd", "--system", "--shell", "/bin/sh", "--home-dir", "/",
             "--no-create-home", "--password", "*", name],
            capture_output=True,
        )  # fmt: skip
        return False  # checked again: another test may have held the lock

    wait_for(exists, timeout=30, interval=0.2)


def moat_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "moat", *args]


class PortalSite:
    def __init__(
        self,
        host: Host,
        address: str,
        networks: tuple[str, ...] = ("10.10.0.0/16",),
        pool: str = "10.200.0.0/16",
        prefix: int = 28,
    ) -> None:
        self.host = host
        self.address = address
        Path("/run").mkdir(exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="moat-portal-", dir="/run"))
        self.dir.chmod(0o755)
        self.db = self.dir / "db"
        self.bundles = self.dir / "bundles"
        self.keys_command = self.dir / "authorized-keys"
        self.control = self.dir / "portal.sock"
        ensure_ssh_user()
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                str(self.dir / "hostkey"),
            ],
            check=True,
        )
        nets = [a for n in networks for a in ("--network", n)]
        self.moat("init", "--endpoint", address, "--pool", pool,
                  "--prefix", str(prefix), "--host-key", str(self.dir / "hostkey.pub"),
                  "--ssh-port", str(SSH_PORT), "--ssh-user", SSH_USER,
                  "--control", str(self.control), *nets)  # fmt: skip
        lines = self.moat("sshd-config", "--keys-command", str(self.keys_command),
                          "--keys-user", "nobody").splitlines()  # fmt: skip
        config = [
            f"ListenAddress {address}:{SSH_PORT}",
            f"HostKey {self.dir / 'hostkey'}",
            f"PidFile {self.dir / 'sshd.pid'}",
            *lines,
        ]
        (self.dir / "sshd_config").write_text("\n".join(config) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        subprocess.run([SSHD, "-t", "-f", str(self.dir / "sshd_config")], check=True)
        self.sshd_log = self.dir / "sshd.log"
        self.sshd = host.popen(
            SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config"),
            stderr=self.sshd_log.open("w"),
        )  # fmt: skip
        wait_for(self._listening, timeout=20)

    def _listening(self) -> bool:
        res = self.host.run("ss", "-ltn", check=False)
        return f"{self.address}:{SSH_PORT}" in res.stdout

    def moat(self, *args: str) -> str:
        res = subprocess.run(
            moat_argv("portal", "--db", str(self.db), *args),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout

    def add(self, moat_id: str, *extra: str) -> Path:
        out = self.bundles / moat_id
        self.moat("add", moat_id, "--email", f"{moat_id}@example.com",
                  "--out", str(out), "--no-mail", *extra)  # fmt: skip
        return out

    def start_daemon(self, log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        """`moat portal run`, once its control socket is open to the ssh user."""
        proc = self.host.popen(
            *moat_argv("portal", "--db", str(self.db), "run"),
            stdout=log.open("a"), stderr=subprocess.STDOUT, **kw,
        )  # fmt: skip

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return self.control.exists() and self.control.stat().st_mode & 0o060 != 0

        wait_for(ready, timeout=60)
        return proc

    def close(self) -> None:
        if self.sshd.poll() is None:
            self.sshd.terminate()
            self.sshd.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
