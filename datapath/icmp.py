"""ICMP "fragmentation needed" (RFC 792/1191) and ICMPv6 "packet too big"
(RFC 4443 §3.2) for packets that do not fit the tunnel, the classic way of
telling a sender the tunnel's inner MTU. Sans-IO: the offending inner packet
and `now` in, the ICMP packet to write back to the TUN device out (or None,
with the reason counted).

Never answered (RFC 1122 §3.2.2, RFC 4443 §2.4 (e)): ICMP error messages,
non-first fragments, packets to multicast/broadcast, packets from addresses
that cannot be answered (unspecified, multicast, loopback). IPv4 packets
without DF are not "too big" at all (they may be fragmented). Replies are
rate-limited by a token bucket.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import logging
import struct

log = logging.getLogger(__name__)

PROTO_ICMP = 1
PROTO_ICMPV6 = 58
IPV4_HEADER = 20
IPV6_HEADER = 40
ICMP_HEADER = 8
ICMP_DEST_UNREACH = 3
ICMP_CODE_FRAG_NEEDED = 4
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_ERROR_MAX_TYPE = 127  # types 0..127 are errors (RFC 4443 §2.1)
ICMP_ERROR_TYPES = {3, 4, 5, 11, 12}  # unreach, quench, redirect, time, param
IPV4_DF = 0x4000
IPV4_OFFSET_MASK = 0x1FFF
IPV6_EXT_FRAGMENT = 44
IPV4_MIN_MTU = 68  # RFC 791
IPV6_MIN_MTU = 1280  # RFC 8200 §5
# an ICMP error carries as much of the offending packet as fits in these
IPV4_ERROR_MAX = 576  # RFC 1812 §4.3.2.3
IPV6_ERROR_MAX = IPV6_MIN_MTU  # RFC 4443 §2.4 (c)
DEFAULT_TTL = 64
DEFAULT_RATE = 10.0  # replies per second, sustained
DEFAULT_BURST = 10


class NoReply(enum.StrEnum):
    """Why a too-big packet got no ICMP answer."""

    MALFORMED = "malformed"
    FITS = "fits"  # not too big after all
    NO_DF = "no_df"  # IPv4 without DF: fragment it instead
    ICMP_ERROR = "icmp_error"
    FRAGMENT = "fragment"
    MULTICAST = "multicast"
    BAD_SOURCE = "bad_source"
    RATE_LIMITED = "rate_limited"


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.last: float | None = None

    def allow(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class TooBig:
    """Builds rate-limited too-big replies from the tunnel's local addresses.

    `local_v4`/`local_v6` are the source addresses of the replies (the
    moat's own inner address: the sender sees the tunnel as a router hop).
    Without one, the reply comes from the offending packet's destination,
    which always passes the reverse-path filter of the box writing it to
    its TUN device (the destination is routed through the tunnel).
    """

    def __init__(
        self,
        local_v4: str | None = None,
        local_v6: str | None = None,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
    ) -> None:
        self.local_v4 = ipaddress.IPv4Address(local_v4) if local_v4 else None
        self.local_v6 = ipaddress.IPv6Address(local_v6) if local_v6 else None
        self.bucket = TokenBucket(rate, burst)
        self.counters: collections.Counter[str] = collections.Counter()

    def reply(self, packet: bytes, mtu: int, now: float) -> bytes | None:
        """The ICMP answer to `packet`, which does not fit an `mtu`-byte link."""
        version = packet[0] >> 4 if packet else 0
        if version == 4:
            reason = self._check_v4(packet, mtu)
        elif version == 6:
            reason = self._check_v6(packet, mtu)
        else:
            reason = NoReply.MALFORMED
        if reason is None and not self.bucket.allow(now):
            reason = NoReply.RATE_LIMITED
        if reason is not None:
            self.counters[reason] += 1
            return None
        self.counters["sent"] += 1
        if version == 4:
            return self._build_v4(packet, mtu)
        return self._build_v6(packet, mtu)

    # -- checks -------------------------------------------------------------

    def _check_v4(self, packet: bytes, mtu: int) -> NoReply | None:
        if len(packet) < IPV4_HEADER:
            return NoReply.MALFORMED
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_HEADER or len(packet) < ihl:
            return NoReply.MALFORMED
        if len(packet) <= mtu:
            return NoReply.FITS
        flags = int.from_bytes(packet[6:8], "big")
        if not flags & IPV4_DF:
            return NoReply.NO_DF
        if flags & IPV4_OFFSET_MASK:
            return NoReply.FRAGMENT  # non-first fragment (offset != 0)
        if packet[9] == PROTO_ICMP and (
            len(packet) <= ihl or packet[ihl] in ICMP_ERROR_TYPES
        ):
            return NoReply.ICMP_ERROR
        src = ipaddress.IPv4Address(packet[12:16])
        dst = ipaddress.IPv4Address(packet[16:20])
        if dst.is_multicast or dst == ipaddress.IPv4Address("255.255.255.255"):
            return NoReply.MULTICAST
        if src.is_multicast or src.is_unspecified or src.is_loopback:
            return NoReply.BAD_SOURCE
        if src == ipaddress.IPv4Address("255.255.255.255"):
            return NoReply.BAD_SOURCE
        return None

    def _check_v6(self, packet: bytes, mtu: int) -> NoReply | None:
        if len(packet) < IPV6_HEADER:
            return NoReply.MALFORMED
        if len(packet) <= mtu:
            return NoReply.FITS
        next_header = packet[6]
        if next_header == IPV6_EXT_FRAGMENT:
            if len(packet) < IPV6_HEADER + 8:
                return NoReply.MALFORMED
            offset = int.from_bytes(packet[42:44], "big") >> 3
            if offset:
                return NoReply.FRAGMENT
        if next_header == PROTO_ICMPV6 and (
            len(packet) <= IPV6_HEADER or packet[IPV6_HEADER] <= ICMPV6_ERROR_MAX_TYPE
        ):
            return NoReply.ICMP_ERROR
        src = ipaddress.IPv6Address(packet[8:24])
        dst = ipaddress.IPv6Address(packet[24:40])
        if dst.is_multicast:
            return NoReply.MULTICAST
        if src.is_multicast or src.is_unspecified or src.is_loopback:
            return NoReply.BAD_SOURCE
        return None

    # -- builders -----------------------------------------------------------

    def _build_v4(self, packet: bytes, mtu: int) -> bytes:
        src = self.local_v4.packed if self.local_v4 else packet[16:20]
        quoted = packet[: IPV4_ERROR_MAX - IPV4_HEADER - ICMP_HEADER]
        mtu = max(min(mtu, 0xFFFF), IPV4_MIN_MTU)
        # RFC 1191 §4: unused (16) | Next-Hop MTU (16)
        icmp = struct.pack(
            "!BBHHH", ICMP_DEST_UNREACH, ICMP_CODE_FRAG_NEEDED, 0, 0, mtu
        )
        icmp += quoted
        icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
        total = IPV4_HEADER + len(icmp)
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45, 0, total, 0, 0, DEFAULT_TTL, PROTO_ICMP, 0,
            src, packet[12:16],
        )  # fmt: skip
        header = (
            header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
        )
        return header + icmp

    def _build_v6(self, packet: bytes, mtu: int) -> bytes:
        quoted = packet[: IPV6_ERROR_MAX - IPV6_HEADER - ICMP_HEADER]
        # an MTU below 1280 cannot be reported (RFC 8201 §4): say 1280
        mtu = max(mtu, IPV6_MIN_MTU)
        icmp = struct.pack("!BBHI", ICMPV6_PACKET_TOO_BIG, 0, 0, mtu) + quoted
        src = self.local_v6.packed if self.local_v6 else packet[24:40]
        dst = packet[8:24]
        pseudo = src + dst + struct.pack("!I3xB", len(icmp), PROTO_ICMPV6)
        checksum = internet_checksum(pseudo + icmp)
        icmp = icmp[:2] + struct.pack("!H", checksum) + icmp[4:]
        header = struct.pack(
            "!IHBB16s16s", 0x60000000, len(icmp), PROTO_ICMPV6, DEFAULT_TTL, src, dst
        )
        return header + icmp
