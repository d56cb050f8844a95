"""The secondary's state machine for one zone (RFC 1034 §4.3.5, RFC 1996).

Sans-IO: the adapter tells the core what happened (`loaded`, `soa_answer`,
`transferred`, `failed`, `notify`) together with the wall-clock time `now`, and
asks it `due(now)` for the next action: check the primary's SOA, transfer the
zone (IXFR when we hold a copy, AXFR otherwise or after an IXFR failed), or
nothing until `next_timer()`.

Timers follow the zone's SOA: after a successful check the next one is due
REFRESH seconds later; after a failure, RETRY seconds later. A standard
secondary stops answering once EXPIRE has passed without a successful check.
The moat deliberately keeps serving its last good copy past EXPIRE, up to a
configured `max_age` since the last successful check, because the LAN must keep
resolving corporate names while the wide-area network is down. Past `max_age`
the zone answers SERVFAIL. Times are wall-clock seconds, so a copy loaded from
disk after a reboot keeps its true age.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

SERIAL_BITS = 32
SERIAL_HALF = 1 << (SERIAL_BITS - 1)
SERIAL_MOD = 1 << SERIAL_BITS

# bounds applied to the primary's SOA timers (like NSD's min/max-refresh-time);
# they keep a bad SOA from making us poll every second or never
MIN_REFRESH = 5.0
MAX_REFRESH = 86400.0
MIN_RETRY = 1.0
MAX_RETRY = 3600.0
# how long to wait after a NOTIFY before checking: lets a burst coalesce
NOTIFY_DELAY = 0.0


def serial_gt(a: int, b: int) -> bool:
    """a > b in serial number arithmetic (RFC 1982 §3.2)."""
    return a != b and ((a - b) % SERIAL_MOD) < SERIAL_HALF


class Serving(enum.Enum):
    """How the zone is answered right now."""

    EMPTY = "empty"  # no copy: SERVFAIL
    FRESH = "fresh"  # checked within EXPIRE: authoritative answers
    PAST_EXPIRE = "past-expire"  # local policy: still answered, flagged
    TOO_OLD = "too-old"  # past max_age: SERVFAIL


class Action(enum.Enum):
    CHECK_SOA = "check-soa"
    IXFR = "ixfr"
    AXFR = "axfr"


@dataclass(frozen=True)
class SoaTimers:
    serial: int
    refresh: float
    retry: float
    expire: float

    def bounded(self) -> SoaTimers:
        return SoaTimers(
            self.serial,
            min(max(self.refresh, MIN_REFRESH), MAX_REFRESH),
            min(max(self.retry, MIN_RETRY), MAX_RETRY),
            max(self.expire, 0.0),
        )


class Secondary:
    """State of one secondary zone; see the module docstring."""

    def __init__(self, name: str, max_age: float) -> None:
        self.name = name
        self.max_age = max_age
        self.soa: SoaTimers | None = None
        self.last_ok: float | None = None  # last successful check or transfer
        self.next_at = 0.0  # first check right away
        self.pending: Action | None = None  # action handed out, not answered
        self.ixfr_failed = False
        self.wanted_serial: int | None = None  # seen newer serial, not held yet
        self.failures = 0
        self.counters: dict[str, int] = {
            "soa_checks": 0,
            "ixfr": 0,
            "axfr": 0,
            "transfer_failures": 0,
            "check_failures": 0,
            "notify": 0,
        }
        self._warned_policy = False

    # -- what the adapter reports ---------------------------------------------

    def loaded(self, soa: SoaTimers, saved_at: float, now: float) -> None:
        """A copy was read from disk; it was last checked at `saved_at`."""
        self.soa = soa.bounded()
        self.last_ok = min(saved_at, now)
        self.next_at = now  # check the primary at once anyway
        log.info("zone %s: loaded serial %d from disk", self.name, soa.serial)

    def soa_answer(self, serial: int, now: float) -> None:
        """The primary answered our SOA check with `serial`."""
        self.pending = None
        if self.soa is None or serial_gt(serial, self.soa.serial):
            self.wanted_serial = serial
            self.next_at = now  # transfer right away
            return
        self._succeeded(now)

    def transferred(self, soa: SoaTimers, now: float, how: Action) -> None:
        """A transfer completed and the copy now holds `soa`."""
        self.pending = None
        self.counters["ixfr" if how is Action.IXFR else "axfr"] += 1
        old = self.soa.serial if self.soa else None
        self.soa = soa.bounded()
        self.ixfr_failed = False
        if self.wanted_serial is not None and not serial_gt(
            self.wanted_serial, soa.serial
        ):
            self.wanted_serial = None
        log.info("zone %s: %s serial %s -> %d", self.name, how.value, old, soa.serial)
        self._succeeded(now)

    def failed(self, now: float, why: str) -> None:
        """The pending check or transfer failed (timeout, refused, bad data)."""
        action, self.pending = self.pending, None
        if action is Action.IXFR:
            # fall back to AXFR at once (RFC 1995 §4 lets the primary refuse IXFR)
            self.ixfr_failed = True
            self.counters["transfer_failures"] += 1
            self.next_at = now
            log.warning("zone %s: IXFR failed (%s), trying AXFR", self.name, why)
            return
        self.counters[
            "check_failures" if action is Action.CHECK_SOA else "transfer_failures"
        ] += 1
        self.failures += 1
        retry = self.soa.retry if self.soa else MIN_RETRY * 5
        self.next_at = now + retry
        log.warning(
            "zone %s: %s failed (%s); retry in %.0fs",
            self.name,
            action.value if action else "refresh",
            why,
            retry,
        )

    def notify(self, serial: int | None, now: float) -> None:
        """The primary sent NOTIFY (RFC 1996 §3.7: check, then maybe transfer)."""
        self.counters["notify"] += 1
        soa = self.soa
        if serial is not None and soa is not None and not serial_gt(serial, soa.serial):
            log.debug("zone %s: NOTIFY serial %d not newer", self.name, serial)
            return
        self.next_at = min(self.next_at, now + NOTIFY_DELAY)

    # -- what the adapter asks ------------------------------------------------

    def due(self, now: float) -> Action | None:
        """The action to start now, if any; it stays pending until answered."""
        if self.pending is not None or now < self.next_at:
            return None
        if self.soa is None:
            action = Action.AXFR
        elif self.wanted_serial is not None:
            action = Action.AXFR if self.ixfr_failed else Action.IXFR
        else:
            action = Action.CHECK_SOA
            self.counters["soa_checks"] += 1
        self.pending = action
        return action

    def next_timer(self) -> float | None:
        return None if self.pending is not None else self.next_at

    def serving(self, now: float) -> Serving:
        if self.soa is None or self.last_ok is None:
            return Serving.EMPTY
        age = now - self.last_ok
        if age <= self.soa.expire:
            self._warned_policy = False
            return Serving.FRESH
        if age <= self.max_age:
            if not self._warned_policy:
                self._warned_policy = True
                log.warning(
                    "zone %s: past SOA expire (%.0fs since last refresh); serving "
                    "the stored copy by local policy until max age %.0fs",
                    self.name,
                    age,
                    self.max_age,
                )
            return Serving.PAST_EXPIRE
        return Serving.TOO_OLD

    def status(self, now: float) -> dict[str, object]:
        return {
            "zone": self.name,
            "serving": self.serving(now).value,
            "serial": self.soa.serial if self.soa else None,
            "age": round(now - self.last_ok, 1) if self.last_ok else None,
            "expire": self.soa.expire if self.soa else None,
            "max_age": self.max_age,
            "next_check_in": round(max(0.0, self.next_at - now), 1),
            "pending": self.pending.value if self.pending else None,
            **self.counters,
        }

    def _succeeded(self, now: float) -> None:
        assert self.soa is not None
        self.last_ok = now
        self.failures = 0
        self.next_at = now + self.soa.refresh
