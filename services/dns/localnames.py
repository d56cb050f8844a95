"""Names of the LAN's own hosts: A and PTR answers under the local domain.

Two sources, both re-read when their modification time changes:

- a hosts-like file: `ADDRESS NAME [NAME...]` per line, `#` comments;
- the DHCP server's lease file (JSON written by services.dhcp.lease):
  `{"leases": [{"address": ..., "hostname": ..., "expires": ..., "state": ...}]}`;
  only leases in state "bound" that have not expired and carry a host name
  are used.

Names are single labels or names under the local domain; a bare label `nas`
answers `nas.<domain>`. Bad lines and records are skipped and counted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

log = logging.getLogger(__name__)

LOCAL_TTL = 60
LEASE_BOUND = "bound"  # services.dhcp.lease.BOUND


class LocalNames:
    def __init__(
        self,
        domain: str,
        hosts_file: Path | None = None,
        lease_file: Path | None = None,
    ) -> None:
        self.domain = dns.name.from_text(domain)
        self.sources = [p for p in (hosts_file, lease_file) if p is not None]
        self.hosts_file = hosts_file
        self.lease_file = lease_file
        self._mtimes: dict[Path, float | None] = {}
        self.by_name: dict[dns.name.Name, list[str]] = {}
        self.by_addr: dict[dns.name.Name, dns.name.Name] = {}
        self.skipped = 0

    def refresh(self) -> None:
        """Re-read the sources if any changed on disk."""
        mtimes = {p: _mtime(p) for p in self.sources}
        if mtimes == self._mtimes:
            return
        self._mtimes = mtimes
        pairs: list[tuple[str, str]] = []
        if self.hosts_file is not None:
            pairs += list(self._read_hosts(self.hosts_file))
        if self.lease_file is not None:
            pairs += list(self._read_leases(self.lease_file))
        self._index(pairs)
        log.info("local names: %d names loaded", len(self.by_name))

    def covers(self, qname: dns.name.Name) -> bool:
        return qname.is_subdomain(self.domain) or qname in self.by_addr

    def answer(self, qname: dns.name.Name, rdtype: int) -> list[dns.rrset.RRset] | None:
        """Records for qname/rdtype; [] for a known name without that type;
        None for an unknown name (NXDOMAIN under the local domain)."""
        name = qname.canonicalize()
        if name in self.by_addr:
            if rdtype != dns.rdatatype.PTR:
                return []
            return [
                dns.rrset.from_text_list(
                    qname, LOCAL_TTL, "IN", "PTR", [self.by_addr[name].to_text()]
                )
            ]
        addresses = self.by_name.get(name)
        if addresses is None:
            return [] if name == self.domain else None
        if rdtype != dns.rdatatype.A:
            return []
        return [dns.rrset.from_text_list(qname, LOCAL_TTL, "IN", "A", addresses)]

    def _index(self, pairs: Iterable[tuple[str, str]]) -> None:
        by_name: dict[dns.name.Name, list[str]] = {}
        by_addr: dict[dns.name.Name, dns.name.Name] = {}
        for address, hostname in pairs:
            try:
                ip = ipaddress.IPv4Address(address)
                name = self._qualify(hostname)
            except (ValueError, dns.name.NameTooLong, dns.name.EmptyLabel) as exc:
                log.debug("local names: skip %r %r: %s", address, hostname, exc)
                self.skipped += 1
                continue
            if str(ip) not in by_name.setdefault(name, []):
                by_name[name].append(str(ip))
            by_addr.setdefault(dns.reversename.from_address(str(ip)), name)
        self.by_name, self.by_addr = by_name, by_addr

    def _qualify(self, hostname: str) -> dns.name.Name:
        if not hostname or any(c.isspace() for c in hostname):
            raise ValueError("bad host name")
        name = dns.name.from_text(hostname.rstrip("."), origin=None)
        if len(name) == 1:
            return (name.concatenate(self.domain)).canonicalize()
        full = dns.name.from_text(hostname)
        if not full.is_subdomain(self.domain):
            raise ValueError(f"{hostname} is not under {self.domain}")
        return full.canonicalize()

    def _read_hosts(self, path: Path) -> Iterator[tuple[str, str]]:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as exc:
            log.warning("local names: cannot read %s: %s", path, exc)
            return
        for line in lines:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                self.skipped += bool(fields)
                continue
            for hostname in fields[1:]:
                yield fields[0], hostname

    def _read_leases(self, path: Path) -> Iterator[tuple[str, str]]:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("local names: cannot read lease file %s: %s", path, exc)
            return
        now = time.time()
        for record in _records(data):
            address = record.get("address")
            hostname = record.get("hostname")
            expires = record.get("expires")
            if not isinstance(address, str) or not isinstance(hostname, str):
                self.skipped += 1
                continue
            if not hostname or record.get("state", LEASE_BOUND) != LEASE_BOUND:
                continue
            if not isinstance(expires, int | float) or expires < now:
                continue
            yield address, hostname


def _records(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict):
        data = data.get("leases")
    if isinstance(data, list):
        yield from (r for r in data if isinstance(r, dict))


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None
