"""The DHCP server's lease database.

All state is in memory; every change that a client will rely on (a binding
before its DHCPACK, a release, a decline) rewrites the whole file with
`moat.durable.atomic_write` before the caller answers. A home LAN has tens of
leases, so a rewrite is cheap and the file is never half-written (RFC 2131
§4.3.2: "the server MUST ... commit the binding ... to persistent storage"
before the ACK).

One record per address: which client holds or last held it and until when.
Records of expired and released leases are kept so a client gets its old
address back (RFC 2131 §4.3.1). Declined addresses are parked for a
probation period. Offers are held in memory only for a few seconds.

On load every record is validated; bad ones are skipped and logged (a server
that refuses to start over its own lease file is worse than one that forgets
a lease: clients simply ask again). An unreadable file is moved aside.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from moat.durable import atomic_write

log = logging.getLogger(__name__)

FILE_VERSION = 1
BOUND = "bound"
RELEASED = "released"
LEASE_STATES = (BOUND, RELEASED)
KEY_KINDS = ("id:", "hw:")
OFFER_HOLD = 30.0  # seconds an offered address is kept for its client
DECLINES_PER_CLIENT = 4  # cap per client per DECLINE_WINDOW (decline storms)
DECLINE_WINDOW = 3600.0
EXHAUSTION_LOG_INTERVAL = 60.0
MAX_HOSTNAME = 63


@dataclass
class Lease:
    address: IPv4Address
    client_key: str  # "id:<hex client-id>" or "hw:<hex chaddr>"
    chaddr: str  # hex hardware address
    expires: float  # wall-clock seconds since the epoch
    hostname: str = ""
    state: str = BOUND

    def active(self, now: float) -> bool:
        return self.state == BOUND and self.expires > now

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["address"] = str(self.address)
        return record

    @classmethod
    def from_record(cls, record: Any) -> Lease:
        """Validate one stored record; ValueError/TypeError/KeyError if bad."""
        if not isinstance(record, dict):
            raise TypeError("record is not an object")
        lease = cls(
            address=IPv4Address(record["address"]),
            client_key=str(record["client_key"]),
            chaddr=str(record["chaddr"]),
            expires=float(record["expires"]),
            hostname=str(record.get("hostname", "")),
            state=str(record.get("state", BOUND)),
        )
        bytes.fromhex(lease.chaddr)
        if lease.state not in LEASE_STATES or lease.client_key[:3] not in KEY_KINDS:
            raise ValueError("bad state or client key")
        return lease


@dataclass
class Offer:
    client_key: str
    until: float


class LeaseDatabase:
    """Addresses of one pool, their leases, reservations and parked addresses."""

    def __init__(
        self,
        path: Path | None,
        subnet: IPv4Network,
        pool_start: IPv4Address,
        pool_end: IPv4Address,
        reservations: dict[str, IPv4Address] | None = None,
        excluded: set[IPv4Address] | None = None,
        decline_probation: float = 3600.0,
    ) -> None:
        self.path = path
        self.subnet = subnet
        self.pool_start = pool_start
        self.pool_end = pool_end
        self.reservations = dict(reservations or {})  # hex chaddr -> address
        self.reserved = {a: mac for mac, a in self.reservations.items()}
        self.excluded = set(excluded or ())
        self.decline_probation = decline_probation
        self.leases: dict[IPv4Address, Lease] = {}
        self.parked: dict[IPv4Address, float] = {}  # declined address -> until
        self.offers: dict[IPv4Address, Offer] = {}
        self.declines: dict[str, list[float]] = {}
        self.counters: Counter[str] = Counter()
        self._last_exhaustion_log = -EXHAUSTION_LOG_INTERVAL

    # queries

    def pool(self) -> Iterator[IPv4Address]:
        for n in range(int(self.pool_start), int(self.pool_end) + 1):
            yield IPv4Address(n)

    def in_pool(self, address: IPv4Address) -> bool:
        return self.pool_start <= address <= self.pool_end

    def lease_of(self, client_key: str) -> Lease | None:
        for lease in self.leases.values():
            if lease.client_key == client_key:
                return lease
        return None

    def available(
        self, address: IPv4Address, client_key: str, chaddr: str, now: float
    ) -> bool:
        """May `address` be given to this client now?"""
        reserved_for = self.reserved.get(address)
        if reserved_for is not None:
            if reserved_for != chaddr:
                return False
        elif not self.in_pool(address):
            return False
        if address in self.excluded or self.parked.get(address, 0.0) > now:
            return False
        lease = self.leases.get(address)
        if lease and lease.active(now) and lease.client_key != client_key:
            return False
        offer = self.offers.get(address)
        return not (offer and offer.until > now and offer.client_key != client_key)

    def choose_address(
        self,
        client_key: str,
        chaddr: str,
        requested: IPv4Address | None,
        now: float,
    ) -> IPv4Address | None:
        """Address to offer, in the order of RFC 2131 §4.3.1; None if exhausted."""
        candidates: list[IPv4Address] = []
        if chaddr in self.reservations:
            candidates.append(self.reservations[chaddr])
        previous = self.lease_of(client_key)
        if previous is not None:
            candidates.append(previous.address)
        if requested is not None:
            candidates.append(requested)
        for address in candidates:
            if self.available(address, client_key, chaddr, now):
                return address

        # fresh pool address: never used first, then the longest expired
        reused: list[tuple[float, IPv4Address]] = []
        for address in self.pool():
            if not self.available(address, client_key, chaddr, now):
                continue
            lease = self.leases.get(address)
            if lease is None:
                return address
            reused.append((lease.expires, address))
        if reused:
            return min(reused)[1]

        self.counters["pool_exhausted"] += 1
        if now - self._last_exhaustion_log >= EXHAUSTION_LOG_INTERVAL:
            self._last_exhaustion_log = now
            log.warning(
                "address pool %s-%s exhausted (%d active, %d parked)",
                self.pool_start,
                self.pool_end,
                sum(1 for lease in self.leases.values() if lease.active(now)),
                sum(1 for until in self.parked.values() if until > now),
            )
        return None

    def status(self, now: float) -> dict[str, object]:
        size = int(self.pool_end) - int(self.pool_start) + 1
        active = [lease for lease in self.leases.values() if lease.active(now)]
        return {
            "pool": f"{self.pool_start}-{self.pool_end}",
            "pool_size": size,
            "active_leases": len(active),
            "parked_addresses": sum(1 for u in self.parked.values() if u > now),
            "counters": dict(sorted(self.counters.items())),
        }

    # changes

    def hold_offer(self, address: IPv4Address, client_key: str, now: float) -> None:
        self.offers = {a: o for a, o in self.offers.items() if o.until > now}
        for held, offer in list(self.offers.items()):
            if offer.client_key == client_key:
                del self.offers[held]
        self.offers[address] = Offer(client_key, now + OFFER_HOLD)

    def forget_offer(self, client_key: str) -> None:
        for held, offer in list(self.offers.items()):
            if offer.client_key == client_key:
                del self.offers[held]

    def commit(
        self,
        address: IPv4Address,
        client_key: str,
        chaddr: str,
        lease_time: float,
        hostname: str,
        now: float,
    ) -> Lease:
        """Bind `address` to the client and write it durably (raises OSError)."""
        for held, old in list(self.leases.items()):
            if old.client_key == client_key and held != address:
                old.state, old.expires = RELEASED, min(old.expires, now)
        lease = Lease(
            address, client_key, chaddr, now + lease_time, hostname[:MAX_HOSTNAME]
        )
        self.leases[address] = lease
        self.offers.pop(address, None)
        self.save()
        self.counters["leases_committed"] += 1
        return lease

    def release(self, address: IPv4Address, client_key: str, now: float) -> bool:
        lease = self.leases.get(address)
        if lease is None or lease.client_key != client_key or not lease.active(now):
            return False
        lease.state, lease.expires = RELEASED, now
        self.save()
        return True

    def decline(self, address: IPv4Address, client_key: str, now: float) -> bool:
        """Park `address` (in use by someone else); False if ignored."""
        recent = [
            t for t in self.declines.get(client_key, []) if t > now - DECLINE_WINDOW
        ]
        if len(recent) >= DECLINES_PER_CLIENT:
            self.counters["decline_over_cap"] += 1
            return False
        self.declines[client_key] = [*recent, now]
        self.leases.pop(address, None)
        self.offers.pop(address, None)
        self.parked[address] = now + self.decline_probation
        self.save()
        self.counters["addresses_parked"] += 1
        return True

    # persistence

    def save(self) -> None:
        if self.path is None:
            return
        document = {
            "version": FILE_VERSION,
            "leases": [lease.to_record() for lease in self.leases.values()],
            "parked": [
                {"address": str(a), "until": until} for a, until in self.parked.items()
            ],
        }
        data = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
        try:
            atomic_write(self.path, data, mode=0o600)
        except OSError:
            self.counters["lease_write_failed"] += 1
            raise

    def load(self, now: float) -> None:
        """Read the lease file; skip bad records; move an unreadable file aside."""
        if self.path is None or not self.path.exists():
            return
        try:
            document = json.loads(self.path.read_bytes())
            if not isinstance(document, dict):
                raise ValueError("not an object")
            records = list(document.get("leases", []))
            parked = list(document.get("parked", []))
        except (OSError, ValueError, TypeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.bad-{int(now)}")
            log.error(
                "lease file %s unreadable (%s), moved to %s", self.path, exc, aside
            )
            os.replace(self.path, aside)
            self.counters["lease_file_unreadable"] += 1
            return

        for record in records:
            try:
                lease = Lease.from_record(record)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("lease file: skipped bad record %r (%s)", record, exc)
                self.counters["lease_records_skipped"] += 1
                continue
            if lease.address not in self.subnet or not (
                self.in_pool(lease.address) or lease.address in self.reserved
            ):
                log.info("lease file: %s no longer served, dropped", lease.address)
                continue
            self.leases[lease.address] = lease
        for record in parked:
            try:
                address, until = IPv4Address(record["address"]), float(record["until"])
            except (ValueError, TypeError, KeyError):
                self.counters["lease_records_skipped"] += 1
                continue
            if until > now:
                self.parked[address] = until
        log.info(
            "loaded %d leases, %d parked addresses", len(self.leases), len(self.parked)
        )
