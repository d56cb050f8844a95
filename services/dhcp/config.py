"""The DHCP server's configuration: table [dhcpd] of a TOML file.

    [dhcpd]
    interface = "lan0"                # private-side interface
    address = "192.168.77.1"          # our address there (server identifier)
    subnet = "192.168.77.0/24"
    pool_start = "192.168.77.100"
    pool_end = "192.168.77.199"
    router = "192.168.77.1"           # option 3 (default: address)
    dns_servers = ["192.168.77.1"]    # option 6 (default: [address])
    domain = "home.example"           # option 15
    search = ["corp.example"]         # option 119 (RFC 3397)
    ntp_servers = ["192.168.77.1"]    # option 42 (default: [address])
    mtu = 1400                        # option 26
    lease_time = 3600                 # option 51, seconds
    renewal_time = 1800               # option 58, T1 (default 0.5 x lease)
    rebinding_time = 3150             # option 59, T2 (default 0.875 x lease)
    decline_probation = 3600          # seconds a declined address is parked
    lease_file = "/var/lib/moat/dhcpd.leases"
    status_file = "/run/moat/dhcpd.status.json"   # `moat dhcpd --status`

    [[dhcpd.reservations]]
    mac = "02:00:00:00:00:10"
    address = "192.168.77.10"

Every error names the field (`dhcpd.pool_end: not inside subnet ...`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from moat.errors import ConfigError
from services.configfile import load_toml
from services.dhcp.message import DhcpError, encode_domain_search

SECTION = "dhcpd"
DEFAULT_STATUS_FILE = "/run/moat/dhcpd.status.json"
MIN_LEASE_TIME = 10
MAX_LEASE_TIME = 0xFFFFFFFE  # 0xffffffff means "infinite" (RFC 2131 §3.3)
MIN_MTU = 68  # RFC 2132 §5.1


@dataclass
class Reservation:
    mac: str  # hex, no separators
    address: IPv4Address


@dataclass
class ServerConfig:
    interface: str
    address: IPv4Address
    subnet: IPv4Network
    pool_start: IPv4Address
    pool_end: IPv4Address
    lease_file: Path
    router: IPv4Address | None = None
    dns_servers: list[IPv4Address] = field(default_factory=list)
    domain: str | None = None
    search: list[str] = field(default_factory=list)
    ntp_servers: list[IPv4Address] = field(default_factory=list)
    mtu: int | None = None
    lease_time: int = 3600
    renewal_time: int = 1800
    rebinding_time: int = 3150
    decline_probation: int = 3600
    reservations: list[Reservation] = field(default_factory=list)
    status_file: Path = Path(DEFAULT_STATUS_FILE)


def load(path: str | Path) -> ServerConfig:
    return parse(load_toml(path), str(path))


def parse(document: dict[str, Any], source: str = "") -> ServerConfig:
    table = document.get(SECTION)
    if not isinstance(table, dict):
        raise ConfigError(source, SECTION, "missing table [dhcpd]")
    fields = _Fields(table, source)

    # addresses
    interface = fields.string("interface")
    subnet = fields.network("subnet")
    address = fields.address("address", subnet)
    pool_start = fields.address("pool_start", subnet)
    pool_end = fields.address("pool_end", subnet)
    if pool_end < pool_start:
        raise fields.error("pool_end", "before pool_start")
    for name, value in (("pool_start", pool_start), ("pool_end", pool_end)):
        if value in (subnet.network_address, subnet.broadcast_address):
            raise fields.error(name, "is the network or broadcast address")

    # options
    router = fields.address("router", subnet, default=address)
    dns_servers = fields.addresses("dns_servers", default=[address])
    ntp_servers = fields.addresses("ntp_servers", default=[address])
    domain = fields.string("domain", required=False) or None
    search = fields.strings("search")
    try:
        encode_domain_search(search)
    except DhcpError as exc:
        raise fields.error("search", str(exc)) from exc
    mtu = fields.optional_integer("mtu", MIN_MTU, 65535)

    # timers: T1 < T2 < lease (RFC 2131 §4.4.5)
    lease_time = fields.integer("lease_time", MIN_LEASE_TIME, MAX_LEASE_TIME, 3600)
    renewal_time = fields.integer("renewal_time", 1, lease_time, lease_time // 2)
    rebinding_time = fields.integer(
        "rebinding_time", 1, lease_time, lease_time * 7 // 8
    )
    if not renewal_time < rebinding_time < lease_time:
        raise fields.error("rebinding_time", "need renewal < rebinding < lease")
    decline_probation = fields.integer("decline_probation", 0, 10**7, 3600)

    return ServerConfig(
        interface=interface,
        address=address,
        subnet=subnet,
        pool_start=pool_start,
        pool_end=pool_end,
        lease_file=Path(fields.string("lease_file")),
        router=router,
        dns_servers=dns_servers,
        domain=domain,
        search=search,
        ntp_servers=ntp_servers,
        mtu=mtu,
        lease_time=lease_time,
        renewal_time=renewal_time,
        rebinding_time=rebinding_time,
        decline_probation=decline_probation,
        reservations=_reservations(table.get("reservations", []), subnet, source),
        status_file=Path(
            fields.string("status_file", required=False) or DEFAULT_STATUS_FILE
        ),
    )


def parse_mac(text: str) -> str:
    """'02:00:00:AA:bb:01' or '0200...' -> '020000aabb01'; ValueError if bad."""
    digits = text.replace(":", "").replace("-", "").lower()
    if len(digits) != 12:
        raise ValueError("want 6 octets")
    bytes.fromhex(digits)
    return digits


def _reservations(items: Any, subnet: IPv4Network, source: str) -> list[Reservation]:
    if not isinstance(items, list):
        raise ConfigError(source, f"{SECTION}.reservations", "must be a list of tables")
    out: list[Reservation] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{SECTION}.reservations[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, where, "must be a table")
        fields = _Fields(item, source, where)
        try:
            mac = parse_mac(fields.string("mac"))
        except ValueError as exc:
            raise fields.error("mac", f"not a MAC address ({exc})") from exc
        if mac in seen:
            raise fields.error("mac", "reserved twice")
        seen.add(mac)
        out.append(Reservation(mac, fields.address("address", subnet)))
    return out


class _Fields:
    """Typed access to one TOML table; errors carry the dotted field name."""

    def __init__(self, table: dict[str, Any], source: str, prefix: str = SECTION):
        self.table = table
        self.source = source
        self.prefix = prefix

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, f"{self.prefix}.{name}", problem)

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.table and required:
            raise self.error(name, "missing")
        return self.table.get(name)

    def string(self, name: str, required: bool = True) -> str:
        value = self._get(name, required)
        if value is None:
            return ""
        if not isinstance(value, str) or not value:
            raise self.error(name, "must be a non-empty string")
        return value

    def strings(self, name: str) -> list[str]:
        value = self.table.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "must be a list of strings")
        return list(value)

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        value = self.optional_integer(name, low, high)
        return default if value is None else value

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        value = self.table.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, "must be an integer")
        if not low <= value <= high:
            raise self.error(name, f"must be between {low} and {high}")
        return value

    def network(self, name: str) -> IPv4Network:
        value = self.string(name)
        try:
            return IPv4Network(value, strict=True)
        except ValueError as exc:
            raise self.error(name, f"not an IPv4 network ({exc})") from exc

    def address(
        self,
        name: str,
        subnet: IPv4Network | None = None,
        default: IPv4Address | None = None,
    ) -> IPv4Address:
        if name not in self.table and default is not None:
            return default
        value = self.string(name)
        try:
            address = IPv4Address(value)
        except ValueError as exc:
            raise self.error(name, f"not an IPv4 address ({exc})") from exc
        if subnet is not None and address not in subnet:
            raise self.error(name, f"{address} not inside subnet {subnet}")
        return address

    def addresses(self, name: str, default: list[IPv4Address]) -> list[IPv4Address]:
        if name not in self.table:
            return list(default)
        try:
            return [IPv4Address(v) for v in self.strings(name)]
        except ValueError as exc:
            raise self.error(name, f"not a list of IPv4 addresses ({exc})") from exc
