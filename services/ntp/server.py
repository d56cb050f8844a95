"""The moat's NTP server for the LAN (RFC 5905 §9, RFC 4330 §5-§6).

Sans-IO: `respond(data, receive_ts, transmit_ts, clock)` returns the reply or
None (a counted drop). Only client requests (mode 3) are answered, with mode 4;
control (6), private (7) and every other mode are ignored, so the server can
never be used as an amplifier: a reply is exactly one header, never longer
than the request.

Until the moat's clock has been set from the portal the reply says so: LI=3
(alarm) and stratum 16, which clients refuse to follow. Once synchronised:
stratum = upstream + 1, reference ID = the upstream's address, root delay and
dispersion accumulated from the upstream.
"""

from __future__ import annotations

import logging
from collections import Counter

from services.ntp import packet
from services.ntp.client import ClockState
from services.ntp.packet import Leap, Mode, NtpError, NtpPacket

log = logging.getLogger(__name__)

PRECISION = -20  # log2 seconds: about a microsecond
MIN_VERSION = 1
DROP_BY_MODE = {
    Mode.CONTROL: "mode_6",
    Mode.PRIVATE: "mode_7",
}


class NtpServer:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def respond(
        self, data: bytes, receive_ts: int, transmit_ts: int, clock: ClockState
    ) -> bytes | None:
        # which requests are answered
        try:
            request = packet.decode(data)
        except NtpError:
            self._drop("short")
            return None
        if request.mode != Mode.CLIENT:
            self._drop(DROP_BY_MODE.get(Mode(request.mode), "mode_other"))
            return None
        if not MIN_VERSION <= request.version <= packet.VERSION:
            self._drop("version")
            return None

        # the reply (RFC 5905 §9.2 fast_xmit; origin is the client's transmit)
        if clock.synchronised:
            leap, stratum, ref_id = Leap.NONE, clock.stratum, clock.reference_id
            reference_ts = packet.from_unix(clock.reference_time)
        else:
            leap, stratum, ref_id = Leap.ALARM, packet.UNSYNCHRONISED_STRATUM, bytes(4)
            reference_ts = 0
        self.counters["answered"] += 1
        return NtpPacket(
            leap=leap,
            version=request.version,
            mode=Mode.SERVER,
            stratum=stratum,
            poll=request.poll,
            precision=PRECISION,
            root_delay=packet.to_short(clock.root_delay),
            root_dispersion=packet.to_short(clock.root_dispersion),
            reference_id=ref_id,
            reference_ts=reference_ts,
            origin_ts=request.transmit_ts,
            receive_ts=receive_ts,
            transmit_ts=transmit_ts,
        ).encode()

    def _drop(self, reason: str) -> None:
        self.counters[f"drop_{reason}"] += 1
        log.debug("request dropped: %s", reason)
