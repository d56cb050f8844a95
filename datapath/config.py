"""The tunnel configuration file: TOML, manually keyed, one peer.

    [tunnel]
    name = "portal"               # peer name in logs and status
    encapsulation = "udp"         # udp (RFC 3948, UDP/4500) or esp (IP protocol 50)
    keepalive = 20                # NAT keepalive after this many idle seconds; 0 = off
    mtu_policy = "virtual-large"  # inner packets larger than the path: virtual-large
                                  # (AGGFRAG), clamp-mss, classic (ICMP) or plain
    rekey_grace = 30              # seconds an old inbound SA is kept after a reload
    rekey_packets = 0             # outbound SA "needs rekey" after this many packets
                                  # (0 = when 1/16 of its sequence space is left)
    control_socket = "/run/moat/tunnel.sock"
    state_dir = "/var/lib/moat/tunnel"   # sequence and replay high-water marks

    [tun]
    name = "moat0"
    addresses = ["10.9.0.1/32"]
    routes = ["10.2.0.0/16"]      # default: the remote selectors
    mtu = 0                       # 0 = computed from the outer MTU and transform
    txqueuelen = 1000
    coalesce = true               # merge received TCP segments (virtio-net GSO)

    [outer]
    local = "192.0.2.1"           # IPv4 or IPv6
    remote = "198.51.100.7"
    port = 4500                   # local UDP port
    remote_port = 4500
    mtu = 1500                    # path MTU of the outer network

    [selectors]                   # RFC 4301 traffic selectors (inner addresses)
    local = ["10.1.0.0/24"]
    remote = ["10.2.0.0/16"]

    [sa.in]                       # what the peer sends us; the SPI we chose
    spi = 0x1001
    transform = "aes-gcm-128"
    key = "<hex: key followed by the 4-byte salt>"
    replay_window = 1024
    esn = true

    [sa.out]
    spi = 0x2001
    ...

Every error names the field (`sa.in.key`) and the problem, as a ConfigError.
The parser checks everything it can without building SAs: key lengths per
transform, SPI range, address families, that no key is used in both directions.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapath.transform import TRANSFORMS
from moat.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

ENCAPSULATIONS = ("udp", "esp")
NAT_T_PORT = 4500  # RFC 3948 §2.1
DEFAULT_KEEPALIVE = 20.0  # RFC 3948 §4: default 20 s
DEFAULT_CONTROL_SOCKET = "/run/moat/tunnel.sock"
SPI_RESERVED_MAX = 255  # RFC 4303 §2.1: 1-255 reserved by IANA, 0 local use
SPI_MAX = 0xFFFFFFFF
REPLAY_WINDOW_MIN = 32  # RFC 4303 §3.4.3: at least 32 must be supported
REPLAY_WINDOW_MAX = 65536
TUN_NAME_MAX = 15  # IFNAMSIZ - 1
MTU_MIN_IPV4 = 576
MTU_MAX = 65535

# transform -> (allowed cipher key lengths incl. salt, auth key length), from
# the transforms themselves. AEAD key material is the cipher key followed by a
# 4-byte salt (RFC 4106 §8.1, RFC 7634 §2); CBC suites have a separate HMAC key
# (RFC 4868 §2.1.1, RFC 2404).
TRANSFORM_KEYS: dict[str, tuple[tuple[int, ...], int]] = {
    name: cls.key_lengths() for name, cls in TRANSFORMS.items()
}

# mtu policies; "plain" is the built-in one (the TUN MTU keeps inner packets
# small enough). Others are provided by datapath modules that register them.
MTU_POLICIES = ("virtual-large", "clamp-mss", "classic", "plain", "aggfrag")
DEFAULT_MTU_POLICY = "virtual-large"


@dataclass(frozen=True)
class SASpec:
    """One manually keyed SA as written in the file."""

    spi: int
    transform: str
    key: bytes
    auth_key: bytes = b""
    replay_window: int = 1024
    esn: bool = True


@dataclass(frozen=True)
class TunSpec:
    name: str = "moat0"
    addresses: tuple[IPInterface, ...] = ()
    routes: tuple[IPNetwork, ...] = ()
    mtu: int = 0
    txqueuelen: int = 1000
    coalesce: bool = True


@dataclass(frozen=True)
class OuterSpec:
    local: IPAddress
    remote: IPAddress
    port: int = NAT_T_PORT
    remote_port: int = NAT_T_PORT
    mtu: int = 1500


@dataclass(frozen=True)
class TunnelConfig:
    source: str
    name: str
    encapsulation: str
    tun: TunSpec
    outer: OuterSpec
    local_subnets: tuple[IPNetwork, ...]
    remote_subnets: tuple[IPNetwork, ...]
    sa_in: SASpec
    sa_out: SASpec
    keepalive: float = DEFAULT_KEEPALIVE
    mtu_policy: str = DEFAULT_MTU_POLICY
    rekey_grace: float = 30.0
    rekey_packets: int = 0
    control_socket: str = DEFAULT_CONTROL_SOCKET
    state_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


class _Table:
    """A TOML table with its dotted path, so errors can name the field."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(data, dict):
            raise self.error("", "must be a table")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.name(key) if key else self.path, problem)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "missing")
            return default
        return self.data[key]

    def table(self, key: str, required: bool = True) -> _Table:
        value = self.raw(key, None, required)
        return _Table({} if value is None else value, self.name(key), self.source)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw(key, default, default is None)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_kind(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def integer(
        self,
        key: str,
        lo: int,
        hi: int,
        default: int | None = None,
        hexok: bool = False,
    ) -> int:
        value = self.raw(key, default, default is None)
        if hexok and isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise self.error(key, f"{value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {_kind(value)}")
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is out of range {lo}..{hi}")
        return value

    def number(self, key: str, lo: float, hi: float, default: float) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {_kind(value)}")
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is out of range {lo}..{hi}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_kind(value)}")
        return value

    def hexbytes(self, key: str, required: bool = True) -> bytes:
        value = self.raw(key, None if required else "", required)
        if not isinstance(value, str):
            raise self.error(key, f"must be a hex string, not {_kind(value)}")
        text = value.strip().removeprefix("0x").replace(":", "")
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise self.error(key, "is not valid hex") from None

    def address(self, key: str) -> IPAddress:
        value = self.string(key)
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            raise self.error(key, f"{value!r} is not an IP address") from None

    def _list(self, key: str) -> list[str]:
        value = self.raw(key)
        if not isinstance(value, list):
            raise self.error(key, f"must be a list of prefixes, not {_kind(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{i}]", f"must be a string, not {_kind(item)}")
        return value

    def networks(
        self, key: str, default: tuple[IPNetwork, ...] | None = None
    ) -> tuple[IPNetwork, ...]:
        if default is not None and key not in self.data:
            self.used.add(key)
            return default
        out: list[IPNetwork] = []
        for i, item in enumerate(self._list(key)):
            try:
                out.append(ipaddress.ip_network(item))
            except ValueError as exc:
                problem = "has host bits set" if "host bits" in str(exc) else ""
                problem = problem or "is not a prefix"
                raise self.error(f"{key}[{i}]", f"{item!r} {problem}") from None
        return tuple(out)

    def interfaces(self, key: str) -> tuple[IPInterface, ...]:
        if key not in self.data:
            self.used.add(key)
            return ()
        out: list[IPInterface] = []
        for i, item in enumerate(self._list(key)):
            try:
                out.append(ipaddress.ip_interface(item))
            except ValueError:
                raise self.error(
                    f"{key}[{i}]", f"{item!r} is not an address/prefix"
                ) from None
        return tuple(out)

    def check_unknown(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise self.error(key, "unknown field")


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _sa(table: _Table) -> SASpec:
    spi = table.integer("spi", 0, SPI_MAX, hexok=True)
    if spi <= SPI_RESERVED_MAX:
        raise table.error("spi", f"{spi} is reserved (SPIs 0-255 are not for SAs)")
    transform = table.string("transform")
    if transform not in TRANSFORM_KEYS:
        raise table.error(
            "transform", f"{transform!r} is not one of {', '.join(TRANSFORM_KEYS)}"
        )
    key_lengths, auth_length = TRANSFORM_KEYS[transform]
    key = table.hexbytes("key")
    if len(key) not in key_lengths:
        want = " or ".join(str(n) for n in key_lengths)
        what = "key followed by 4-byte salt" if auth_length == 0 else "cipher key"
        raise table.error("key", f"{len(key)} bytes, {transform} needs {want} ({what})")
    auth_key = table.hexbytes("auth_key", required=False)
    if auth_length == 0 and auth_key:
        raise table.error("auth_key", f"not used by {transform} (an AEAD transform)")
    if auth_length and len(auth_key) != auth_length:
        raise table.error(
            "auth_key", f"{len(auth_key)} bytes, {transform} needs {auth_length}"
        )
    replay_window = table.integer(
        "replay_window", REPLAY_WINDOW_MIN, REPLAY_WINDOW_MAX, 1024
    )
    esn = table.boolean("esn", True)
    table.check_unknown()
    return SASpec(spi, transform, key, auth_key, replay_window, esn)


def parse(text: str, source: str = "") -> TunnelConfig:
    """Parse the TOML text of a tunnel configuration."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"not valid TOML: {exc}") from None
    top = _Table(data, "", source)

    # tunnel
    tunnel = top.table("tunnel", required=False)
    name = tunnel.string("name", "peer")
    encapsulation = tunnel.choice("encapsulation", ENCAPSULATIONS, "udp")
    keepalive = tunnel.number("keepalive", 0, 3600, DEFAULT_KEEPALIVE)
    mtu_policy = tunnel.choice("mtu_policy", MTU_POLICIES, DEFAULT_MTU_POLICY)
    rekey_grace = tunnel.number("rekey_grace", 0, 3600, 30.0)
    rekey_packets = tunnel.integer("rekey_packets", 0, (1 << 64) - 1, 0)
    control_socket = tunnel.string("control_socket", DEFAULT_CONTROL_SOCKET)
    state_dir = tunnel.string("state_dir", "")
    tunnel.check_unknown()

    # outer addresses
    outer_t = top.table("outer")
    local = outer_t.address("local")
    remote = outer_t.address("remote")
    if local.version != remote.version:
        raise outer_t.error(
            "remote", f"IPv{remote.version} but outer.local is IPv{local.version}"
        )
    port = outer_t.integer("port", 1, 65535, NAT_T_PORT)
    remote_port = outer_t.integer("remote_port", 1, 65535, NAT_T_PORT)
    min_mtu = MTU_MIN_IPV4 if local.version == 4 else 1280
    outer_mtu = outer_t.integer("mtu", min_mtu, MTU_MAX, 1500)
    outer_t.check_unknown()
    outer = OuterSpec(local, remote, port, remote_port, outer_mtu)

    # selectors
    sel = top.table("selectors")
    local_subnets = sel.networks("local")
    remote_subnets = sel.networks("remote")
    for key, nets in (("local", local_subnets), ("remote", remote_subnets)):
        if not nets:
            raise sel.error(key, "must name at least one prefix")
    sel.check_unknown()

    # tun device
    tun_t = top.table("tun", required=False)
    tun_name = tun_t.string("name", "moat0")
    if not 0 < len(tun_name) <= TUN_NAME_MAX or "/" in tun_name or " " in tun_name:
        raise tun_t.error("name", f"{tun_name!r} is not a valid interface name")
    tun = TunSpec(
        name=tun_name,
        addresses=tun_t.interfaces("addresses"),
        routes=tun_t.networks("routes", remote_subnets),
        mtu=tun_t.integer("mtu", 0, MTU_MAX, 0),
        txqueuelen=tun_t.integer("txqueuelen", 1, 1_000_000, 1000),
        coalesce=tun_t.boolean("coalesce", True),
    )
    if 0 < tun.mtu < 68:
        raise tun_t.error("mtu", f"{tun.mtu} is below the IPv4 minimum 68")
    tun_t.check_unknown()

    # security associations
    sa_t = top.table("sa")
    sa_in = _sa(sa_t.table("in"))
    sa_out = _sa(sa_t.table("out"))
    sa_t.check_unknown()
    if sa_in.key == sa_out.key:
        # RFC 4106 §8.1 / trap: one key in both directions reuses nonces
        raise ConfigError(
            source, "sa.out.key", "equals sa.in.key; each direction needs its own key"
        )
    top.check_unknown()

    return TunnelConfig(
        source=source,
        name=name,
        encapsulation=encapsulation,
        tun=tun,
        outer=outer,
        local_subnets=local_subnets,
        remote_subnets=remote_subnets,
        sa_in=sa_in,
        sa_out=sa_out,
        keepalive=keepalive,
        mtu_policy=mtu_policy,
        rekey_grace=rekey_grace,
        rekey_packets=rekey_packets,
        control_socket=control_socket,
        state_dir=state_dir,
    )


def load(path: str | Path) -> TunnelConfig:
    """Read and parse a tunnel configuration file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(str(path), "(file)", exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "(file)", "not UTF-8 text") from None
    return parse(text, str(path))
