"""A secondary zone's data: authoritative lookups and the copy kept on disk.

The copy is a master-file text (RFC 1035 §5) preceded by one comment line that
records when the zone was last confirmed current with the primary:

    ; moat-zone-copy saved-at=1764770000.0

It is written with moat.durable.atomic_write after every transfer and every
successful SOA check, so a reboot during a wide-area outage still serves the
last good copy with its true age.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.versioned
import dns.zone

from moat.durable import atomic_write
from services.dns.secondary import SoaTimers

log = logging.getLogger(__name__)

HEADER = "; moat-zone-copy saved-at="
HEADER_RE = re.compile(r"^; moat-zone-copy saved-at=([0-9.]+)\n")
MAX_CNAME_CHAIN = 8


@dataclass
class Answer:
    """The sections of an authoritative answer."""

    rcode: int = dns.rcode.NOERROR
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    authority: list[dns.rrset.RRset] = field(default_factory=list)


def soa_timers(zone: dns.zone.Zone) -> SoaTimers | None:
    with zone.reader() as txn:
        rdataset = txn.get(zone.origin, dns.rdatatype.SOA)
        if not rdataset:
            return None
        soa = rdataset[0]
        return SoaTimers(soa.serial, soa.refresh, soa.retry, soa.expire)


def new_zone(name: str) -> dns.versioned.Zone:
    return dns.versioned.Zone(dns.name.from_text(name), relativize=False)


def lookup(zone: dns.zone.Zone, qname: dns.name.Name, rdtype: int) -> Answer:
    """Answer `qname`/`rdtype` from the zone (RFC 1034 §4.3.2, without wildcards).

    TODO: wildcards and delegations below the apex are answered as NXDOMAIN;
    the corporate zones served so far have neither.
    """
    out = Answer()
    with zone.reader() as txn:
        origin = zone.origin
        assert origin is not None
        soa = txn.get(origin, dns.rdatatype.SOA)
        name = qname

        # follow CNAMEs inside the zone
        for _ in range(MAX_CNAME_CHAIN):
            rdataset = txn.get(name, rdtype)
            if rdataset:
                out.answer.append(_rrset(name, rdataset))
                return out
            cname = txn.get(name, dns.rdatatype.CNAME)
            if not cname or rdtype == dns.rdatatype.CNAME:
                break
            out.answer.append(_rrset(name, cname))
            name = cname[0].target
            if not name.is_subdomain(origin):
                return out

        # no data or no name: SOA in authority for negative caching (RFC 2308 §3)
        if not txn.name_exists(name) and not _has_descendant(zone, name):
            out.rcode = dns.rcode.NXDOMAIN
        if soa:
            neg_ttl = min(soa.ttl, soa[0].minimum)
            out.authority.append(_rrset(origin, soa, neg_ttl))
    return out


def _has_descendant(zone: dns.zone.Zone, name: dns.name.Name) -> bool:
    # an empty non-terminal exists (RFC 8020): answer NODATA, not NXDOMAIN
    with zone.reader() as txn:
        return any(n != name and n.is_subdomain(name) for n in txn.iterate_names())


def _rrset(
    name: dns.name.Name, rdataset: dns.rdataset.Rdataset, ttl: int | None = None
) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
    rrset.update(rdataset)
    if ttl is not None:
        rrset.ttl = ttl
    return rrset


# -- the copy on disk ---------------------------------------------------------


def copy_path(directory: Path, name: str) -> Path:
    return directory / f"{name.rstrip('.') or 'root'}.zone"


def save(directory: Path, zone: dns.zone.Zone, saved_at: float) -> None:
    text = zone.to_text(relativize=False)
    assert isinstance(text, str)
    data = f"{HEADER}{saved_at:.1f}\n{text}".encode()
    assert zone.origin is not None
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(copy_path(directory, zone.origin.to_text()), data, 0o644)


def load(directory: Path, name: str) -> tuple[dns.versioned.Zone, float] | None:
    """The stored copy and its saved-at time, or None if absent or unusable."""
    path = copy_path(directory, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("zone %s: cannot read stored copy %s: %s", name, path, exc)
        return None
    match = HEADER_RE.match(text)
    if match is None:
        log.warning("zone %s: stored copy %s has no header; ignored", name, path)
        return None
    try:
        zone = dns.zone.from_text(
            text,
            origin=dns.name.from_text(name),
            relativize=False,
            zone_factory=dns.versioned.Zone,
        )
    except dns.exception.DNSException as exc:
        log.warning("zone %s: stored copy %s is bad (%s); ignored", name, path, exc)
        return None
    assert isinstance(zone, dns.versioned.Zone)
    return zone, float(match.group(1))
