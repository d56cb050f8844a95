"""`moat wan`: the wild (WAN) side's address, as the console saved it.

The console's "set WAN address" item writes /var/moat/wan.json:

    {"mode": "dhcp"}
    {"mode": "static", "address": "192.0.2.10/24", "gateway": "192.0.2.1",
     "dns": "192.0.2.53"}                                  (dns optional)

No file means DHCP. The supervisor runs this verb as the `wan` service:

- dhcp: the link comes up and the DHCP client (`moat dhcpc`) runs in this
  same process with the arguments after `--` (one process, not two: the box
  has 128 MiB);
- static: the link comes up, its addresses are replaced by the static one,
  the default route goes via the gateway; then the process waits, so the
  supervisor sees a running service, until SIGTERM (the settings stay).

Its pid is kept in /run/moat/wan.pid: after saving new settings the console
sends it SIGTERM, and the supervisor (or init, in a recovery boot) starts
`moat wan` again, which reads them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from moat.durable import atomic_write
from moat.errors import ConfigError, MoatError

log = logging.getLogger(__name__)

WAN_FILE = Path("/var/moat/wan.json")
WAN_PID_FILE = Path("/run/moat/wan.pid")
# left by a static setup, so a later DHCP start removes that address first
STATIC_MARK = Path("/run/moat/wan-static.json")
MODES = ("dhcp", "static")
IP_TIMEOUT = 10.0


@dataclass(frozen=True)
class WanSettings:
    mode: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    dns: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @classmethod
    def static(cls, address: str, gateway: str, dns: str = "") -> WanSettings:
        """Checked static settings; ValueError says what is wrong."""
        iface = ipaddress.ip_interface(address)
        via = ipaddress.ip_address(gateway)
        if iface.network.prefixlen == iface.max_prefixlen:
            raise ValueError("the address needs a prefix shorter than a host")
        if via not in iface.network:
            raise ValueError("gateway is not inside the address's network")
        if via == iface.ip:
            raise ValueError("gateway is the address itself")
        return cls("static", iface, via, ipaddress.ip_address(dns) if dns else None)

    @classmethod
    def parse(cls, data: Any, source: str) -> WanSettings:
        """Settings from wan.json's decoded contents; ConfigError when bad."""
        if not isinstance(data, dict):
            raise ConfigError(source, "file", "must be a JSON object")
        mode = data.get("mode")
        if mode not in MODES:
            raise ConfigError(source, "mode", f"must be one of {', '.join(MODES)}")
        if mode == "dhcp":
            return cls("dhcp")
        fields = {k: data.get(k, "") for k in ("address", "gateway", "dns")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise ConfigError(source, "static", "address/gateway/dns must be text")
        try:
            return cls.static(fields["address"], fields["gateway"], fields["dns"])
        except ValueError as exc:
            raise ConfigError(source, "static", str(exc)) from exc

    def to_json(self) -> dict[str, str]:
        out = {"mode": self.mode}
        if self.mode == "static":
            out |= {"address": str(self.address), "gateway": str(self.gateway)}
            if self.dns is not None:
                out["dns"] = str(self.dns)
        return out


def load(path: Path) -> WanSettings:
    """The saved settings; DHCP when there is no file."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return WanSettings("dhcp")
    except OSError as exc:
        raise ConfigError(str(path), "file", str(exc)) from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(str(path), "syntax", str(exc)) from exc
    return WanSettings.parse(data, str(path))


def save(path: Path, settings: WanSettings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(settings.to_json(), indent=1).encode() + b"\n")


def restart_service(pid_file: Path = WAN_PID_FILE) -> bool:
    """SIGTERM to the running `moat wan` (its keeper starts it again with the
    new settings); False when none runs."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    if b"wan" not in cmdline:  # a stale file: the pid now belongs to another
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    return True


# -- applying -------------------------------------------------------------------


def ip(*argv: str) -> None:
    """One ip(8) command (busybox's on the box), no shell; MoatError if it fails."""
    try:
        res = subprocess.run(
            ["ip", *argv], capture_output=True, text=True, timeout=IP_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MoatError(f"ip {' '.join(argv)}: {exc}") from exc
    if res.returncode != 0:
        raise MoatError(f"ip {' '.join(argv)}: {res.stderr.strip()}")


def apply_static(interface: str, settings: WanSettings, mark: Path) -> None:
    ip("link", "set", "dev", interface, "up")
    ip("addr", "flush", "dev", interface)
    ip("addr", "add", str(settings.address), "dev", interface)
    ip("route", "replace", "default", "via", str(settings.gateway), "dev", interface)
    mark.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(mark, json.dumps(settings.to_json()).encode())
    log.info(
        "wan: static %s via %s on %s", settings.address, settings.gateway, interface
    )


def undo_static(interface: str, mark: Path) -> None:
    """Before DHCP: remove the address a static setup left (if any)."""
    if not mark.exists():
        return
    log.info("wan: removing the static setup before DHCP")
    ip("addr", "flush", "dev", interface)
    mark.unlink()


def wait_for_term() -> None:
    stop = {"now": False}

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_term)
    while not stop["now"]:
        signal.pause()


# -- verb -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interface", default="wild", help="wild-side interface")
    parser.add_argument("--settings", type=Path, default=WAN_FILE, metavar="PATH")
    parser.add_argument("--pid-file", type=Path, default=WAN_PID_FILE, metavar="PATH")
    parser.add_argument(
        "--static-mark", type=Path, default=STATIC_MARK, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "dhcpc_args",
        nargs=argparse.REMAINDER,
        help="after --: arguments for the DHCP client (moat dhcpc --help)",
    )


def run(args: argparse.Namespace) -> int:
    settings = load(args.settings)
    dhcpc_args = list(args.dhcpc_args)
    if dhcpc_args[:1] == ["--"]:
        dhcpc_args = dhcpc_args[1:]
    args.pid_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.pid_file, b"%d\n" % os.getpid())
    log.info("wan: %s on %s (from %s)", settings.mode, args.interface, args.settings)

    if settings.mode == "static":
        apply_static(args.interface, settings, args.static_mark)
        wait_for_term()
        return 0

    # dhcp: the client runs here, in this process
    from services.dhcp import dhcpc

    ip("link", "set", "dev", args.interface, "up")
    undo_static(args.interface, args.static_mark)
    parser = argparse.ArgumentParser(prog="moat wan -- (dhcpc)")
    dhcpc.add_arguments(parser)
    return dhcpc.run(parser.parse_args(["--interface", args.interface, *dhcpc_args]))
