"""The DNS server's configuration file (TOML).

listen = ["192.168.1.1"]          # private-side addresses, UDP and TCP
port = 53
state_dir = "/var/lib/moat/dns"   # zone copies
status_file = "/run/moat/dns.status.json"
allow_query = ["192.168.1.0/24"]  # who may query (default: anyone reaching us)

[[zone]]                          # one table per corporate zone
name = "corp.example"
primaries = ["10.99.0.1"]         # transfers from / NOTIFY accepted from
primary_port = 53
max_age = 604800                  # serve the copy this long past refresh
transfer_timeout = 10
tsig_name = "moat-xfr"            # optional TSIG (RFC 8945) for SOA checks,
tsig_secret = "base64..."         # transfers and NOTIFY; a NOTIFY without it
tsig_algorithm = "hmac-sha256"    # is then refused

[forward]
resolvers = ["10.99.0.53"]        # corporate resolvers (through the tunnel)
port = 53
timeout = 2.0

[cache]
min_ttl = 0
max_ttl = 86400
negative_max_ttl = 3600
size = 10000

[local]
domain = "lan"
hosts_file = "/etc/moat/hosts"    # ADDRESS NAME... lines
lease_file = "/var/lib/moat/dhcpd.leases"  # written by moat dhcpd
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name
import dns.tsig

from services.configfile import Section, read_section
from services.dns.cache import CachePolicy
from services.dns.handler import IPNetwork

DAY = 86400.0


@dataclass(frozen=True)
class ZoneConfig:
    name: str
    primaries: list[str]
    primary_port: int
    max_age: float
    transfer_timeout: float
    tsig: dns.tsig.Key | None


@dataclass(frozen=True)
class LocalConfig:
    domain: str
    hosts_file: Path | None
    lease_file: Path | None


@dataclass(frozen=True)
class DnsConfig:
    listen: list[str]
    port: int
    state_dir: Path
    status_file: Path
    zones: list[ZoneConfig]
    resolvers: list[tuple[str, int]]
    forward_timeout: float
    cache: CachePolicy
    local: LocalConfig | None
    allow_query: list[IPNetwork] | None


def _name(section: Section, key: str, default: str | None = None) -> str:
    text = section.get(key, str, default)
    try:
        return dns.name.from_text(text).to_text()
    except dns.exception.DNSException as exc:
        raise section.error(key, f"not a domain name: {text!r}") from exc


def _networks(section: Section, key: str) -> list[IPNetwork] | None:
    if key not in section.table:
        return None
    try:
        return [
            ipaddress.ip_network(str(n), strict=False) for n in section.get(key, list)
        ]
    except ValueError as exc:
        raise section.error(key, str(exc)) from exc


def _tsig_key(section: Section) -> dns.tsig.Key | None:
    if "tsig_name" not in section.table:
        return None
    name = _name(section, "tsig_name")
    secret = section.get("tsig_secret", str)
    algorithm = section.get("tsig_algorithm", str, "hmac-sha256")
    try:
        base64.b64decode(secret, validate=True)
        return dns.tsig.Key(name, secret, algorithm)
    except (ValueError, dns.exception.DNSException) as exc:
        raise section.error("tsig_secret", f"not a usable TSIG key: {exc}") from exc


def _path(section: Section, key: str) -> Path | None:
    value = section.get(key, str, "")
    return Path(value) if value else None


def load(path: str | Path) -> DnsConfig:
    top = read_section(path)
    zones = [
        ZoneConfig(
            name=_name(z, "name"),
            primaries=z.addresses("primaries"),
            primary_port=z.port("primary_port", 53),
            max_age=z.number("max_age", 7 * DAY),
            transfer_timeout=z.number("transfer_timeout", 10.0, low=0.1),
            tsig=_tsig_key(z),
        )
        for z in top.subs("zone")
    ]
    fwd = top.sub("forward")
    port = fwd.port("port", 53)
    cache = top.sub("cache")
    local = top.sub("local")
    state_dir = Path(top.get("state_dir", str, "/var/lib/moat/dns"))
    return DnsConfig(
        listen=top.addresses("listen"),
        port=top.port("port", 53),
        state_dir=state_dir,
        status_file=Path(top.get("status_file", str, "/run/moat/dns.status.json")),
        zones=zones,
        resolvers=[(a, port) for a in fwd.addresses("resolvers", [])],
        forward_timeout=fwd.number("timeout", 2.0, low=0.05),
        cache=CachePolicy(
            min_ttl=cache.number("min_ttl", 0),
            max_ttl=cache.number("max_ttl", DAY),
            negative_max_ttl=cache.number("negative_max_ttl", 3600),
            size=int(cache.number("size", 10000, low=1)),
        ),
        local=LocalConfig(
            domain=_name(local, "domain", "lan"),
            hosts_file=_path(local, "hosts_file"),
            lease_file=_path(local, "lease_file"),
        )
        if local.table
        else None,
        allow_query=_networks(top, "allow_query"),
    )
