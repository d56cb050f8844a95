"""Portal settings: DB/portal.toml, written by `moat portal init`.

    endpoint = "203.0.113.1"        # where moats send ESP (the tunnel endpoint)
    port = 4500                     # ESP-in-UDP port (RFC 3948)
    encapsulation = "udp"           # or "esp" (raw IP protocol 50)
    ssh_host = "203.0.113.1"        # where moats register (default: endpoint)
    ssh_port = 22
    ssh_user = "moat"               # the account whose keys the portal serves
    host_key = "/etc/ssh/ssh_host_ed25519_key.pub"   # pinned by every moat
    pool = "10.200.0.0/16"          # private subnets are allocated from here
    prefix = 28                     # size of each moat's subnet
    networks = ["10.10.0.0/16"]     # the corporate networks behind the portal
    transform = "aes-gcm-128"
    mtu_policy = "virtual-large"    # both ends use it (datapath/config.py)
    control = "/run/moat/portal.sock"  # the daemon's control socket
    register_command = "/usr/bin/python3 -I -S .../portal/forced_command.py"
    ssh_kex = "curve25519-sha256,sntrup761x25519-sha512@openssh.com"
    outbox = "/var/lib/moat/outbox" # welcome mails land here without smtp
    smtp = ""                       # "host:port" to send welcome mails
    mail_from = "moat-portal@localhost"
    peer_idle = 900                 # seconds: an idle moat's SAs leave memory

`ssh_kex` is the key exchange list sshd offers and every moat's ssh asks
for, in that order (the client's order decides). curve25519 first costs a
moat ~20 ms of CPU per registration; sntrup761 (post-quantum hybrid) costs it
~140 ms and the portal about the same as curve25519: put it first to protect
recorded registrations, which carry SA keys, against a future quantum
computer.

The file holds no secret, so it is mode 0644.
"""

from __future__ import annotations

import ipaddress
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from datapath.config import DEFAULT_MTU_POLICY, MTU_POLICIES
from moat.errors import ConfigError
from portal.record import TRANSFORM_KEY_BYTES
from portal.register import DEFAULT_KEX, KEX_PATTERN

SETTINGS_FILE = "portal.toml"
SYSTEM_PYTHON = Path("/usr/bin/python3")
FORCED_COMMAND = Path(__file__).resolve().with_name("forced_command.py")


def default_register_command() -> str:
    """The tiny forced command, run by the system Python (the ssh user may
    not be able to reach a virtualenv's interpreter)."""
    python = SYSTEM_PYTHON if SYSTEM_PYTHON.exists() else Path(sys.executable)
    return f"{python} -I -S {FORCED_COMMAND}"


ENCAPSULATIONS = ("udp", "esp")


@dataclass(frozen=True)
class PortalSettings:
    endpoint: ipaddress.IPv4Address
    pool: ipaddress.IPv4Network
    host_key: str
    port: int = 4500
    encapsulation: str = "udp"
    ssh_host: str = ""
    ssh_port: int = 22
    ssh_user: str = "moat"
    prefix: int = 28
    networks: tuple[ipaddress.IPv4Network, ...] = ()
    transform: str = "aes-gcm-128"
    mtu_policy: str = DEFAULT_MTU_POLICY
    control: str = "/run/moat/portal.sock"
    register_command: str = field(default_factory=default_register_command)
    ssh_kex: str = DEFAULT_KEX
    outbox: str = "/var/lib/moat/outbox"
    smtp: str = ""
    mail_from: str = "moat-portal@localhost"
    peer_idle: int = 900

    @property
    def registration_host(self) -> str:
        return self.ssh_host or str(self.endpoint)

    def host_key_line(self) -> str:
        """`type base64` of the portal's ssh host key, for the moats' pin."""
        try:
            parts = Path(self.host_key).read_text().split()
        except OSError as exc:
            raise ConfigError(SETTINGS_FILE, "host_key", f"{exc.strerror}") from None
        if len(parts) < 2:
            raise ConfigError(SETTINGS_FILE, "host_key", "not an ssh public key")
        return f"{parts[0]} {parts[1]}"


def _check(name: str, value: Any, kind: type, source: str) -> Any:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(source, name, "must be an integer")
    if not isinstance(value, kind):
        raise ConfigError(source, name, f"must be a {kind.__name__}")
    return value


def settings_from_dict(d: dict[str, Any], source: str) -> PortalSettings:
    known = {f.name for f in fields(PortalSettings)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(source, unknown[0], "unknown setting")
    for required in ("endpoint", "pool", "host_key"):
        if required not in d:
            raise ConfigError(source, required, "missing")
    try:
        endpoint = ipaddress.IPv4Address(_check("endpoint", d["endpoint"], str, source))
    except ValueError:
        raise ConfigError(source, "endpoint", "not an IPv4 address") from None
    try:
        pool = ipaddress.IPv4Network(_check("pool", d["pool"], str, source))
    except ValueError as exc:
        raise ConfigError(source, "pool", str(exc)) from None
    networks = []
    for i, net in enumerate(_check("networks", d.get("networks", []), list, source)):
        try:
            networks.append(ipaddress.IPv4Network(_check("networks", net, str, source)))
        except ValueError as exc:
            raise ConfigError(source, f"networks[{i}]", str(exc)) from None
    prefix = _check("prefix", d.get("prefix", 28), int, source)
    if not pool.prefixlen <= prefix <= 30:
        raise ConfigError(source, "prefix", f"must be {pool.prefixlen}..30")
    transform = _check("transform", d.get("transform", "aes-gcm-128"), str, source)
    if transform not in TRANSFORM_KEY_BYTES:
        raise ConfigError(
            source, "transform", f"one of {', '.join(sorted(TRANSFORM_KEY_BYTES))}"
        )
    mtu_policy = _check(
        "mtu_policy", d.get("mtu_policy", DEFAULT_MTU_POLICY), str, source
    )
    if mtu_policy not in MTU_POLICIES:
        raise ConfigError(source, "mtu_policy", f"one of {', '.join(MTU_POLICIES)}")
    encapsulation = _check("encapsulation", d.get("encapsulation", "udp"), str, source)
    if encapsulation not in ENCAPSULATIONS:
        raise ConfigError(source, "encapsulation", "must be udp or esp")
    rest: dict[str, Any] = {}
    if "ssh_kex" in d:
        rest["ssh_kex"] = _check("ssh_kex", d["ssh_kex"], str, source)
        if not KEX_PATTERN.match(rest["ssh_kex"]):
            raise ConfigError(source, "ssh_kex", "comma-separated algorithm names")
    for name in ("ssh_host", "ssh_user", "control", "register_command", "outbox"):
        if name in d:
            rest[name] = _check(name, d[name], str, source)
    for name in ("smtp", "mail_from", "host_key"):
        if name in d:
            rest[name] = _check(name, d[name], str, source)
    for name in ("port", "ssh_port"):
        if name in d:
            port = _check(name, d[name], int, source)
            if not 1 <= port <= 65535:
                raise ConfigError(source, name, "must be 1..65535")
            rest[name] = port
    if "peer_idle" in d:
        rest["peer_idle"] = _check("peer_idle", d["peer_idle"], int, source)
        if rest["peer_idle"] < 1:
            raise ConfigError(source, "peer_idle", "must be >= 1 (seconds)")
    return PortalSettings(
        endpoint=endpoint,
        pool=pool,
        prefix=prefix,
        networks=tuple(networks),
        transform=transform,
        mtu_policy=mtu_policy,
        encapsulation=encapsulation,
        **rest,
    )


def load_settings(db_root: str | Path) -> PortalSettings:
    path = Path(db_root) / SETTINGS_FILE
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            str(path), "file", "missing: create it with `moat portal init`"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "file", f"not valid TOML: {exc}") from None
    return settings_from_dict(doc, str(path))


def settings_to_toml(s: PortalSettings) -> str:
    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    nets = ", ".join(q(str(n)) for n in s.networks)
    return "\n".join(
        [
            "# portal settings (moat portal init); see portal/settings.py",
            f"endpoint = {q(str(s.endpoint))}",
            f"port = {s.port}",
            f"encapsulation = {q(s.encapsulation)}",
            f"ssh_host = {q(s.ssh_host)}",
            f"ssh_port = {s.ssh_port}",
            f"ssh_user = {q(s.ssh_user)}",
            f"host_key = {q(s.host_key)}",
            f"pool = {q(str(s.pool))}",
            f"prefix = {s.prefix}",
            f"networks = [{nets}]",
            f"transform = {q(s.transform)}",
            f"mtu_policy = {q(s.mtu_policy)}",
            f"control = {q(s.control)}",
            f"register_command = {q(s.register_command)}",
            f"ssh_kex = {q(s.ssh_kex)}",
            f"outbox = {q(s.outbox)}",
            f"smtp = {q(s.smtp)}",
            f"mail_from = {q(s.mail_from)}",
            f"peer_idle = {s.peer_idle}",
            "",
        ]
    )
