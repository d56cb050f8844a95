"""Outer path MTU by probing between two Moat peers, in the spirit of
DPLPMTUD (RFC 8899). Sans-IO: `now` in; probes to send, the current envelope
size and timers out.

Why probing: ICMP "fragmentation needed" is often filtered, so an envelope
size learned only from ICMP can be wrong forever. The tunnel starts at a size
every path carries (the base), probes larger sizes and only uses a size once
the peer confirms that a packet of that size arrived.

Confirmation (ESP has no acknowledgements). A probe is an ESP packet of the
probed size whose AGGFRAG payload (RFC 9347) is an all-pad payload with a
sub-type 1 (congestion control) header: P bit set ("PLPMTUD probe in
progress", RFC 9347 §6.1.2) and TVal = a fresh probe number. A Moat receiver
answers every probe at once with a small all-pad payload on its own SA to us
whose TEcho carries that TVal, exactly the echo RFC 9347 §3 defines for TVal
and whose §2 suggests congestion-control payloads as in-band probes. The echo
is authenticated by ESP, so it cannot be forged from outside. All-pad payloads
are transparent to reassembly (§2.2.3), and a receiver that does not
implement congestion control (Linux xfrm iptfs) parses and ignores the header:
against such a peer no probe is ever confirmed and the tunnel keeps the base
size, which still works.

Search. Base first (proves the peer echoes); then the largest size (the local
link MTU: on most paths that is the answer, found in one round trip); on
failure a binary search between the largest confirmed and the smallest failed
size, down to `granularity` bytes. A size fails after `max_probes` probes
without echo (RFC 8899 MAX_PROBES = 3). In SEARCH_COMPLETE the size in use is
re-confirmed every `confirm_interval` (black-hole detection when the path
shrinks without ICMP: back to base) and a new search starts every
`raise_interval` (the path may have grown). EMSGSIZE from the local stack is
trusted at once: the size that failed becomes the upper bound.

Sizes are outer IP packet sizes (what the path MTU limits); the caller turns
them into an AGGFRAG payload size with the SA's overhead.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
from dataclasses import dataclass

from datapath.aggfrag import CongestionInfo, all_pad_payload

log = logging.getLogger(__name__)

IPV4_SAFE_MTU = 576  # every IPv4 host accepts it (RFC 791); the base for IPv4
IPV6_MIN_MTU = 1280  # RFC 8200 §5; the base for IPv6
DEFAULT_MAX_PROBES = 3  # RFC 8899 §5.1.2
DEFAULT_PROBE_TIMEOUT = 1.0  # ceiling; the peer echoes at once, so the timeout
MIN_PROBE_TIMEOUT = 0.2  # is 4 x the smoothed echo round trip within these
RTT_GAIN = 0.125  # smoothing of the echo round trip (as RFC 6298 SRTT)
DEFAULT_CONFIRM_INTERVAL = 30.0
DEFAULT_RAISE_INTERVAL = 600.0  # RFC 8899 PMTU_RAISE_TIMER
DEFAULT_GRANULARITY = 8
ECHO_PAYLOAD_SIZE = 25  # sub-type 1 header and a 1-byte pad block
SENT_PROBES_KEPT = 16


class State(enum.StrEnum):
    BASE = "base"  # confirming the base size
    SEARCHING = "searching"
    SEARCH_COMPLETE = "search_complete"
    ERROR = "error"  # base never confirmed (peer does not echo, or path broken)


@dataclass(frozen=True)
class Probe:
    tval: int  # the probe number to put in TVal
    size: int  # outer IP packet size to build


def probe_payload(probe: Probe, payload_size: int) -> bytes:
    """The AGGFRAG payload of a probe, `payload_size` bytes (fills the ESP SA's
    payload room for an outer packet of probe.size)."""
    return all_pad_payload(payload_size, CongestionInfo(probe=True, tval=probe.tval))


def echo_payload(info: CongestionInfo) -> bytes | None:
    """The answer to a received sub-type 1 header, if it was a probe."""
    if not info.probe or info.tval == 0:
        return None
    return all_pad_payload(ECHO_PAYLOAD_SIZE, CongestionInfo(techo=info.tval))


class Plpmtud:
    """Search state of one tunnel (one outbound SA and its peer's echoes)."""

    def __init__(
        self,
        base: int = IPV4_SAFE_MTU,
        max_size: int = 1500,
        *,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        max_probes: int = DEFAULT_MAX_PROBES,
        confirm_interval: float = DEFAULT_CONFIRM_INTERVAL,
        raise_interval: float = DEFAULT_RAISE_INTERVAL,
        granularity: int = DEFAULT_GRANULARITY,
    ) -> None:
        if not 0 < base <= max_size:
            raise ValueError(f"need 0 < base ({base}) <= max_size ({max_size})")
        self.base = base
        self.max_size = max_size
        self.probe_timeout = probe_timeout
        self.max_probes = max_probes
        self.confirm_interval = confirm_interval
        self.raise_interval = raise_interval
        self.granularity = granularity
        self.plpmtu = base  # the size data uses now
        self.state = State.BASE
        self.lo = 0  # largest confirmed size in this search
        self.hi = max_size + 1  # smallest size known to fail
        self._target = base  # size being probed
        self._attempts = 0
        self._tvals = itertools.count(1)
        self._sent: dict[int, tuple[int, float]] = {}  # tval -> (size, sent at)
        self.srtt: float | None = None  # smoothed probe echo round trip
        self._outstanding: int | None = None  # tval awaiting an echo
        self._deadline = 0.0  # when to send the next probe or give up
        self._next_confirm = 0.0
        self._next_raise = 0.0
        self.counters: collections.Counter[str] = collections.Counter()

    # -- inputs -------------------------------------------------------------

    def poll(self, now: float) -> Probe | None:
        """A probe to send now, if any (also runs the timeouts)."""
        if now < self._deadline:
            return None
        if self._outstanding is not None:
            # the probe went unanswered
            self._outstanding = None
            self.counters["probe_lost"] += 1
            if self._attempts >= self.max_probes:
                self._size_failed(self._target, now)
        if self.state == State.SEARCH_COMPLETE and self._outstanding is None:
            if now >= self._next_raise:
                self._start_search(now)
            elif now >= self._next_confirm:
                self._target = self.plpmtu
            else:
                self._deadline = min(self._next_confirm, self._next_raise)
                return None
        if self.state == State.ERROR and now < self._next_confirm:
            self._deadline = self._next_confirm
            return None
        return self._send(now)

    def on_echo(self, techo: int, now: float) -> None:
        """The peer echoed TVal `techo`: a packet of that probe's size arrived."""
        sent = self._sent.pop(techo, None)
        if sent is None:
            self.counters["echo_unknown"] += 1
            return
        size, sent_at = sent
        rtt = max(0.0, now - sent_at)
        self.srtt = (
            rtt if self.srtt is None else self.srtt + RTT_GAIN * (rtt - self.srtt)
        )
        self.counters["echo"] += 1
        if techo == self._outstanding:
            self._outstanding = None
        self._size_ok(size, now)

    def on_emsgsize(self, size: int, hint: int | None, now: float) -> None:
        """Sending `size` bytes failed with EMSGSIZE; `hint` = the kernel's
        path MTU (IP_MTU) if known."""
        self.counters["emsgsize"] += 1
        limit = min(size - 1, hint if hint else size - 1)
        self.hi = min(self.hi, limit + 1)
        if self.plpmtu > limit:
            log.info(
                "envelope %d too big for the local stack, now %d", self.plpmtu, limit
            )
            self.plpmtu = max(limit, 68)
            self.lo = min(self.lo, self.plpmtu)
        probing = self._sent.get(self._outstanding or 0)
        if self._outstanding is not None and probing and probing[0] > limit:
            self._outstanding = None
            self._size_failed(self._target, now)

    @property
    def current_timeout(self) -> float:
        """How long a probe may go unanswered: 4 echo round trips, bounded."""
        if self.srtt is None:
            return self.probe_timeout
        return min(self.probe_timeout, max(MIN_PROBE_TIMEOUT, 4 * self.srtt))

    def next_timer(self) -> float:
        return self._deadline

    def status(self) -> dict[str, object]:
        return {
            "state": str(self.state),
            "plpmtu": self.plpmtu,
            "srtt_ms": None if self.srtt is None else round(self.srtt * 1000, 2),
            "probing": self._target if self._outstanding is not None else None,
            "counters": dict(self.counters),
        }

    # -- steps --------------------------------------------------------------

    def _send(self, now: float) -> Probe:
        tval = next(self._tvals) & 0xFFFFFFFF or next(self._tvals)
        self._sent[tval] = (self._target, now)
        while len(self._sent) > SENT_PROBES_KEPT:
            del self._sent[next(iter(self._sent))]
        self._outstanding = tval
        self._attempts += 1
        self._deadline = now + self.current_timeout
        self.counters["probe_sent"] += 1
        return Probe(tval, self._target)

    def _size_ok(self, size: int, now: float) -> None:
        if self.state in (State.BASE, State.ERROR):
            if size < self.base:
                return
            log.info("base %d confirmed, searching up to %d", self.base, self.max_size)
            self._start_search(now)
            self.lo = max(self.lo, size)
            self._target = self.max_size
            self._deadline = now
            return
        self.lo = max(self.lo, size)
        if self.lo > self.plpmtu or self.state == State.SEARCHING:
            self.plpmtu = max(self.lo, self.plpmtu)
        if self.state == State.SEARCH_COMPLETE:
            self._attempts = 0
            self._next_confirm = now + self.confirm_interval
            self._deadline = min(self._next_confirm, self._next_raise)
            return
        self._next_target(now)

    def _size_failed(self, size: int, now: float) -> None:
        self._attempts = 0
        if self.state in (State.BASE, State.ERROR):
            if self.state == State.BASE:
                log.warning("no echo for base probes: peer does not answer probes")
            self.state = State.ERROR
            self._next_confirm = now + self.confirm_interval
            self._deadline = self._next_confirm
            return
        if self.state == State.SEARCH_COMPLETE:
            # the size in use stopped working: a black hole, start again
            log.warning("envelope %d no longer confirmed, back to %d", size, self.base)
            self.counters["black_hole"] += 1
            self.plpmtu = self.base
            self.state = State.BASE
            self.lo, self.hi = 0, self.max_size + 1
            self._target = self.base
            self._deadline = now
            return
        self.hi = min(self.hi, size)
        self._next_target(now)

    def _start_search(self, now: float) -> None:
        self.state = State.SEARCHING
        self.lo = self.plpmtu
        self.hi = self.max_size + 1
        self._attempts = 0
        self._target = self.max_size
        self._deadline = now
        self._next_raise = now + self.raise_interval

    def _next_target(self, now: float) -> None:
        self._attempts = 0
        self._deadline = now
        if self.hi - self.lo <= self.granularity or self.lo >= self.max_size:
            log.info("path MTU search complete: envelope %d", self.plpmtu)
            self.state = State.SEARCH_COMPLETE
            self._next_confirm = now + self.confirm_interval
            self._deadline = min(self._next_confirm, self._next_raise)
            return
        self._target = (self.lo + self.hi) // 2
