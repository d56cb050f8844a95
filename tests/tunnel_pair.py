"""Two `moat tunnel` processes in two namespaces, for tests, demo and bench.

    a (10.99.0.1 on moat0) --- wild veth 192.168.77.0/24 --- b (10.99.0.2 on moat0)

Each side gets a TOML file with fresh random keys (one key per direction)
and runs `python -m moat tunnel --config FILE` inside its namespace.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import Host, Lab, wait_for

from datapath.config import TRANSFORM_KEYS

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# transform -> (cipher key bytes incl. salt, auth key bytes)
KEY_SIZES = {name: (keys[-1], auth) for name, (keys, auth) in TRANSFORM_KEYS.items()}


@dataclass
class SAKeys:
    spi: int
    transform: str
    key: str
    auth_key: str = ""
    esn: bool = True
    replay_window: int = 1024

    @classmethod
    def random(cls, spi: int, transform: str, esn: bool = True) -> SAKeys:
        key_len, auth_len = KEY_SIZES[transform]
        auth = secrets.token_hex(auth_len) if auth_len else ""
        return cls(spi, transform, secrets.token_hex(key_len), auth, esn)

    def toml(self, which: str) -> str:
        lines = [
            f"[sa.{which}]",
            f"spi = {self.spi:#x}",
            f'transform = "{self.transform}"',
            f'key = "{self.key}"',
            f"esn = {'true' if self.esn else 'false'}",
            f"replay_window = {self.replay_window}",
        ]
        if self.auth_key:
            lines.append(f'auth_key = "{self.auth_key}"')
        return "\n".join(lines) + "\n"


@dataclass
class Side:
    name: str
    outer: str
    inner: str
    local_subnets: list[str]
    remote_subnets: list[str]
    peer_outer: str
    sa_in: SAKeys
    sa_out: SAKeys
    control: str
    encapsulation: str = "udp"
    tun: str = "moat0"
    extra: dict[str, Any] = field(default_factory=dict)

    def toml(self) -> str:
        tunnel = {
            "name": f"peer-of-{self.name}",
            "encapsulation": self.encapsulation,
            "control_socket": self.control,
            "rekey_grace": 3,
            **self.extra,
        }

        def value(v: Any) -> str:
            if isinstance(v, str):
                return f'"{v}"'
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, list):
                return "[" + ", ".join(value(x) for x in v) + "]"
            return str(v)

        body = "[tunnel]\n" + "".join(f"{k} = {value(v)}\n" for k, v in tunnel.items())
        body += (
            f'[tun]\nname = "{self.tun}"\naddresses = ["{self.inner}/32"]\n'
            f'[outer]\nlocal = "{self.outer}"\nremote = "{self.peer_outer}"\n'
            f"[selectors]\nlocal = {value(self.local_subnets)}\n"
            f"remote = {value(self.remote_subnets)}\n"
        )
        return body + self.sa_in.toml("in") + self.sa_out.toml("out")


def make_sides(
    tmp: Path,
    transform: str = "aes-gcm-128",
    encapsulation: str = "udp",
    esn: bool = True,
    outer: tuple[str, str] = ("192.168.77.1", "192.168.77.2"),
    inner: tuple[str, str] = ("10.99.0.1", "10.99.0.2"),
) -> tuple[Side, Side]:
    a_to_b = SAKeys.random(0x1000 + secrets.randbelow(0xF000), transform, esn)
    b_to_a = SAKeys.random(0x20000 + secrets.randbelow(0xF000), transform, esn)
    a = Side(
        "a",
        outer[0],
        inner[0],
        [f"{inner[0]}/32"],
        [f"{inner[1]}/32"],
        outer[1],
        sa_in=b_to_a,
        sa_out=a_to_b,
        control=str(tmp / "a.sock"),
        encapsulation=encapsulation,
    )
    b = Side(
        "b",
        outer[1],
        inner[1],
        [f"{inner[1]}/32"],
        [f"{inner[0]}/32"],
        outer[0],
        sa_in=a_to_b,
        sa_out=b_to_a,
        control=str(tmp / "b.sock"),
        encapsulation=encapsulation,
    )
    return a, b


def moat_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "moat", *args]


class TunnelPair:
    """Hosts a and b joined by a veth pair, each running `moat tunnel`."""

    def __init__(
        self,
        lab: Lab,
        tmp: Path,
        transform: str = "aes-gcm-128",
        encapsulation: str = "udp",
        esn: bool = True,
        ipv6_outer: bool = False,
    ) -> None:
        self.lab = lab
        self.tmp = tmp
        self.a = lab.host("a")
        self.b = lab.host("b")
        outer = (
            ("fd77::1", "fd77::2") if ipv6_outer else ("192.168.77.1", "192.168.77.2")
        )
        plen = 64 if ipv6_outer else 24
        lab.link(
            self.a, "wild0", f"{outer[0]}/{plen}", self.b, "wild0", f"{outer[1]}/{plen}"
        )
        if ipv6_outer:
            # no duplicate address detection delay before the tunnel binds
            for host in (self.a, self.b):
                host.run("sysctl", "-qw", "net.ipv6.conf.wild0.accept_dad=0")
                host.ip("-6", "addr", "flush", "dev", "wild0")
            self.a.ip("-6", "addr", "add", f"{outer[0]}/64", "dev", "wild0", "nodad")
            self.b.ip("-6", "addr", "add", f"{outer[1]}/64", "dev", "wild0", "nodad")
        sides = make_sides(tmp, transform, encapsulation, esn, outer=outer)
        self.sides = dict(zip("ab", sides, strict=True))
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    def host(self, side: str) -> Host:
        return self.a if side == "a" else self.b

    def config_path(self, side: str) -> Path:
        return self.tmp / f"{side}.toml"

    def write(self, side: str) -> Path:
        path = self.config_path(side)
        path.write_text(self.sides[side].toml())
        return path

    def start(self, side: str, log_level: str = "INFO") -> subprocess.Popen[Any]:
        path = self.write(side)
        log = open(self.tmp / f"{side}.log", "ab")  # noqa: SIM115
        proc = self.host(side).popen(
            *moat_argv("tunnel", "--config", str(path)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**ENV, "MOAT_LOG_LEVEL": log_level},
        )
        self.procs[side] = proc
        wait_for(lambda: self._alive_and_ready(side), timeout=30)
        return proc

    def _alive_and_ready(self, side: str) -> bool:
        proc = self.procs[side]
        if proc.poll() is not None:
            raise AssertionError(f"moat tunnel {side} exited: {self.log(side)}")
        return os.path.exists(self.sides[side].control)

    def start_both(self, log_level: str = "INFO") -> None:
        self.start("a", log_level)
        self.start("b", log_level)

    def log(self, side: str) -> str:
        path = self.tmp / f"{side}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self, side: str) -> dict[str, Any]:
        import json

        res = subprocess.run(
            moat_argv(
                "tunnel", "--status", "--json", "--control", self.sides[side].control
            ),
            capture_output=True,
            text=True,
            env=ENV,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        status: dict[str, Any] = json.loads(res.stdout)
        return status

    def peer_status(self, side: str) -> dict[str, Any]:
        peers = self.status(side)["peers"]
        assert len(peers) == 1
        peer: dict[str, Any] = next(iter(peers.values()))
        return peer
