"""NTPv4 packet codec and timestamp arithmetic (RFC 5905 §7.3, §6).

Sans-IO and pure. The 48-byte header:

     0                   1                   2                   3
    |LI | VN  |Mode |    Stratum    |     Poll      |   Precision   |
    |                         Root Delay                            |
    |                       Root Dispersion                         |
    |                          Reference ID                         |
    |                Reference Timestamp (64)                       |
    |                  Origin Timestamp (64)                        |
    |                  Receive Timestamp (64)                       |
    |                  Transmit Timestamp (64)                      |

Extension fields and a MAC may follow; this codec keeps them opaque in
`trailer` (the moat neither sends nor checks them). Timestamps stay raw 64-bit
integers (32.32 fixed point seconds since 1900 of the current era) so an
origin timestamp can be echoed bit for bit; `timestamp_diff` subtracts them
correctly across an era boundary (2036).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!BBbbII4sQQQQ")
HEADER_SIZE = HEADER.size  # 48
NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
FRACTION = 1 << 32
ERA = 1 << 64  # timestamp span in 2**-32 s units
SHORT_FRACTION = 1 << 16  # NTP short format (root delay / dispersion)
MAX_SHORT = 0xFFFF_FFFF
VERSION = 4
MAX_STRATUM = 15
UNSYNCHRONISED_STRATUM = 16


class NtpError(ValueError):
    """A datagram is not an NTP packet."""


class Leap(enum.IntEnum):
    NONE = 0
    ADD_SECOND = 1
    DEL_SECOND = 2
    ALARM = 3  # clock not synchronised


class Mode(enum.IntEnum):
    RESERVED = 0
    SYMMETRIC_ACTIVE = 1
    SYMMETRIC_PASSIVE = 2
    CLIENT = 3
    SERVER = 4
    BROADCAST = 5
    CONTROL = 6  # ntpq: never answered
    PRIVATE = 7  # ntpdc monlist: never answered


@dataclass(frozen=True)
class NtpPacket:
    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision: int
    root_delay: int  # NTP short format, 16.16 seconds
    root_dispersion: int
    reference_id: bytes  # 4 bytes
    reference_ts: int  # NTP timestamp format, 32.32 seconds
    origin_ts: int
    receive_ts: int
    transmit_ts: int
    trailer: bytes = b""

    def encode(self) -> bytes:
        if len(self.reference_id) != 4:
            raise NtpError("reference ID must be 4 bytes")
        first = (self.leap & 0x3) << 6 | (self.version & 0x7) << 3 | self.mode & 0x7
        return (
            HEADER.pack(
                first,
                self.stratum,
                self.poll,
                self.precision,
                self.root_delay,
                self.root_dispersion,
                self.reference_id,
                self.reference_ts,
                self.origin_ts,
                self.receive_ts,
                self.transmit_ts,
            )
            + self.trailer
        )


def decode(data: bytes) -> NtpPacket:
    """Parse a datagram; NtpError if it is shorter than the header."""
    if len(data) < HEADER_SIZE:
        raise NtpError(f"{len(data)} bytes, need {HEADER_SIZE}")
    (
        first,
        stratum,
        poll,
        precision,
        root_delay,
        root_dispersion,
        reference_id,
        reference_ts,
        origin_ts,
        receive_ts,
        transmit_ts,
    ) = HEADER.unpack_from(data)
    return NtpPacket(
        leap=first >> 6,
        version=(first >> 3) & 0x7,
        mode=first & 0x7,
        stratum=stratum,
        poll=poll,
        precision=precision,
        root_delay=root_delay,
        root_dispersion=root_dispersion,
        reference_id=reference_id,
        reference_ts=reference_ts,
        origin_ts=origin_ts,
        receive_ts=receive_ts,
        transmit_ts=transmit_ts,
        trailer=bytes(data[HEADER_SIZE:]),
    )


# -- timestamps ---------------------------------------------------------------


def from_unix(seconds: float) -> int:
    """A Unix time as an NTP timestamp of the era it falls in (RFC 5905 §6)."""
    return round((seconds + NTP_UNIX_OFFSET) * FRACTION) % ERA


def to_unix(timestamp: int, pivot: float) -> float:
    """An NTP timestamp as the Unix time nearest to `pivot` (era resolution)."""
    return pivot + timestamp_diff(timestamp, from_unix(pivot))


def timestamp_diff(a: int, b: int) -> float:
    """a - b in seconds, for timestamps less than 68 years apart (RFC 5905 §6)."""
    delta = (a - b) % ERA
    if delta >= ERA // 2:
        delta -= ERA
    return delta / FRACTION


def to_short(seconds: float) -> int:
    """Seconds in NTP short format (root delay, root dispersion), saturating."""
    return min(MAX_SHORT, max(0, round(seconds * SHORT_FRACTION)))


def from_short(value: int) -> float:
    return value / SHORT_FRACTION
