"""The moat's NTP client of the portal's server, and the clock state it keeps.

Sans-IO: `request(now)` gives the datagram to send; `response(data, source,
now)` checks a reply and returns a Sample or a drop reason. Times are Unix
seconds from the moat's clock.

Checks on a reply (RFC 5905 §8 and §9.2, RFC 4330 §5):
- from the upstream's address and port, at least a header long, mode 4;
- its origin timestamp equals the transmit timestamp of our outstanding
  request, which is then consumed (no replay, no spoofed off-path reply);
- a Kiss-o'-Death (stratum 0) with a matching origin backs off the poll;
- not LI=3, stratum 1..15, transmit timestamp not zero, sane root distance.

Each accepted reply is a sample (offset θ, delay δ, RFC 5905 §8):

    θ = ((T2 - T1) + (T3 - T4)) / 2      δ = (T4 - T1) - (T3 - T2)

The clock filter keeps the last eight samples and uses the one with the
smallest delay (RFC 5905 §10, without the jitter weighting).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
from collections import Counter, deque
from dataclasses import dataclass

from services.ntp import packet
from services.ntp.packet import Leap, Mode, NtpError, NtpPacket

log = logging.getLogger(__name__)

FILTER_SIZE = 8
MAX_DISPERSION = 16.0  # seconds (RFC 5905 MAXDISP)
PHI = 15e-6  # frequency tolerance, s/s (RFC 5905)
TIMESTAMP_NOISE_BITS = 8  # random low bits of our transmit timestamp (~60 ns)
MAX_POLL_BACKOFF = 8  # KoD RATE doubles the poll up to 2**8 times


@dataclass(frozen=True)
class Sample:
    offset: float  # upstream clock minus ours, seconds
    delay: float
    at: float  # our clock when received
    stratum: int
    root_delay: float
    root_dispersion: float


@dataclass(frozen=True)
class ClockState:
    """What the moat's NTP server tells its clients about its clock."""

    synchronised: bool
    stratum: int
    reference_id: bytes
    reference_time: float  # Unix time of the last update, 0 if none
    root_delay: float
    root_dispersion: float


class NtpClient:
    def __init__(self, upstream: tuple[str, int], precision: float = 1e-6) -> None:
        self.upstream = upstream
        self.precision = precision
        self.outstanding: int | None = None  # our transmit timestamp, raw
        self.sent_at = 0.0
        self.samples: deque[Sample] = deque(maxlen=FILTER_SIZE)
        self.selected: Sample | None = None
        self.updated_at: float | None = None  # our clock at the last update
        self.backoff = 0
        self.counters: Counter[str] = Counter()

    # -- requests and replies -------------------------------------------------

    def request(self, now: float) -> bytes:
        """A mode-3 request; its transmit timestamp becomes the awaited origin."""
        noise = secrets.randbits(TIMESTAMP_NOISE_BITS)
        transmit = packet.from_unix(now) ^ noise
        self.outstanding = transmit
        self.sent_at = now
        self.counters["requests"] += 1
        return NtpPacket(
            leap=Leap.ALARM if self.updated_at is None else Leap.NONE,
            version=packet.VERSION,
            mode=Mode.CLIENT,
            stratum=0,
            poll=0,
            precision=0,
            root_delay=0,
            root_dispersion=0,
            reference_id=bytes(4),
            reference_ts=0,
            origin_ts=0,
            receive_ts=0,
            transmit_ts=transmit,
        ).encode()

    def response(
        self, data: bytes, source: tuple[str, int], now: float
    ) -> Sample | str:
        """Check a reply; a Sample, or the reason it was dropped (counted)."""
        reason = self._check(data, source)
        if isinstance(reason, str):
            self.counters[f"drop_{reason}"] += 1
            log.debug("upstream reply dropped: %s", reason)
            return reason
        reply = reason

        # on-wire calculation (RFC 5905 §8)
        t1 = self.sent_at
        t2 = packet.to_unix(reply.receive_ts, t1)
        t3 = packet.to_unix(reply.transmit_ts, t1)
        t4 = now
        offset = ((t2 - t1) + (t3 - t4)) / 2
        delay = max((t4 - t1) - (t3 - t2), self.precision)
        sample = Sample(
            offset,
            delay,
            now,
            reply.stratum,
            packet.from_short(reply.root_delay),
            packet.from_short(reply.root_dispersion),
        )

        # clock filter: smallest delay of the last eight
        self.samples.append(sample)
        self.selected = min(self.samples, key=lambda s: s.delay)
        self.updated_at = now
        self.backoff = 0
        self.counters["samples"] += 1
        return sample

    def _check(self, data: bytes, source: tuple[str, int]) -> NtpPacket | str:
        if source != self.upstream:
            return "wrong_source"
        try:
            reply = packet.decode(data)
        except NtpError:
            return "short"
        if reply.mode != Mode.SERVER:
            return "wrong_mode"
        if self.outstanding is None or reply.origin_ts != self.outstanding:
            return "bogus_origin"
        self.outstanding = None  # one reply per request
        if reply.stratum == 0:
            return self._kiss(reply)
        if reply.leap == Leap.ALARM or reply.stratum > packet.MAX_STRATUM:
            return "unsynchronised"
        if reply.transmit_ts == 0:
            return "zero_transmit"
        distance = packet.from_short(reply.root_delay) / 2 + packet.from_short(
            reply.root_dispersion
        )
        if distance > MAX_DISPERSION:
            return "root_distance"
        return reply

    def _kiss(self, reply: NtpPacket) -> str:
        # RFC 5905 §7.4: RATE asks us to slow down; DENY/RSTR to stop
        code = reply.reference_id.decode("ascii", "replace")
        log.warning("upstream sent Kiss-o'-Death %r", code)
        self.backoff = min(self.backoff + 1, MAX_POLL_BACKOFF)
        return f"kiss_{code.lower()}" if code.isalnum() else "kiss"

    def after_step(self, step: float) -> None:
        """The clock was stepped by `step` s: old samples no longer apply."""
        self.samples.clear()
        self.selected = None
        if self.updated_at is not None:
            self.updated_at += step
        self.sent_at += step

    # -- what the server advertises -------------------------------------------

    def clock_state(self, now: float) -> ClockState:
        sample = self.selected
        if sample is None or self.updated_at is None:
            return ClockState(False, packet.UNSYNCHRONISED_STRATUM, bytes(4), 0.0, 0, 0)
        age = max(0.0, now - self.updated_at)
        dispersion = sample.root_dispersion + sample.delay / 2 + PHI * age
        synchronised = dispersion < MAX_DISPERSION
        stratum = sample.stratum + 1 if synchronised else packet.UNSYNCHRONISED_STRATUM
        return ClockState(
            synchronised,
            min(stratum, packet.UNSYNCHRONISED_STRATUM),
            _address_id(self.upstream[0]),
            self.updated_at,
            sample.root_delay + sample.delay,
            dispersion,
        )

    def status(self, now: float) -> dict[str, object]:
        state = self.clock_state(now)
        sample = self.selected
        return {
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
            "synchronised": state.synchronised,
            "stratum": state.stratum,
            "offset": sample.offset if sample else None,
            "delay": sample.delay if sample else None,
            "samples": len(self.samples),
            "last_update_age": round(now - self.updated_at, 1)
            if self.updated_at
            else None,
            "root_delay": state.root_delay,
            "root_dispersion": state.root_dispersion,
            "poll_backoff": self.backoff,
            **dict(sorted(self.counters.items())),
        }


def _address_id(address: str) -> bytes:
    # RFC 5905 §7.3: the upstream's IPv4 address; IPv6: first 4 bytes of MD5
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return ip.packed
    return hashlib.md5(ip.packed, usedforsecurity=False).digest()[:4]
