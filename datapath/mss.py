"""TCP MSS clamping: lower the MSS option of SYN and SYN-ACK segments so the
peers never send segments larger than the tunnel carries in one envelope.
Sans-IO: a packet in, the same or a rewritten packet out.

Rewrites only downwards (like iptables TCPMSS since 2.6.25), for IPv4 and
IPv6 (walking the usual extension headers), and fixes the TCP checksum
incrementally (RFC 1624) so no payload byte is read twice. Anything not
understood (fragments, truncated headers, bad option lengths) passes
unchanged: clamping is an optimisation and must never drop traffic.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PROTO_TCP = 6
IPV4_MIN_HEADER = 20
IPV6_HEADER = 40
TCP_MIN_HEADER = 20
TCP_FLAG_SYN = 0x02
TCP_OFF_FLAGS = 13
TCP_OFF_CHECKSUM = 16
TCP_OPT_EOL = 0
TCP_OPT_NOP = 1
TCP_OPT_MSS = 2
TCP_OPT_MSS_LEN = 4
# IPv6 extension headers that may sit before TCP in a SYN (RFC 8200 §4)
IPV6_EXT_HOP_BY_HOP = 0
IPV6_EXT_ROUTING = 43
IPV6_EXT_FRAGMENT = 44
IPV6_EXT_DEST_OPTS = 60
IPV6_SKIPPABLE = {IPV6_EXT_HOP_BY_HOP, IPV6_EXT_ROUTING, IPV6_EXT_DEST_OPTS}
IPV4_FLAG_MF_OFFSET_MASK = 0x3FFF  # MF flag and fragment offset


def mss_for_mtu(mtu: int, ipv6: bool) -> int:
    """The MSS that fills an `mtu`-byte packet (fixed IP and TCP headers only)."""
    return mtu - (IPV6_HEADER if ipv6 else IPV4_MIN_HEADER) - TCP_MIN_HEADER


def tcp_offset(packet: bytes) -> int | None:
    """Where the TCP header starts, or None if this is not an unfragmented TCP
    packet whose header fits the bytes present."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < IPV4_MIN_HEADER:
            return None
        ihl = (packet[0] & 0x0F) * 4
        frag = int.from_bytes(packet[6:8], "big") & IPV4_FLAG_MF_OFFSET_MASK
        if packet[9] != PROTO_TCP or ihl < IPV4_MIN_HEADER or frag:
            return None
        start = ihl
    elif version == 6:
        if len(packet) < IPV6_HEADER:
            return None
        next_header, start = packet[6], IPV6_HEADER
        while next_header in IPV6_SKIPPABLE:
            if len(packet) < start + 8:
                return None
            next_header = packet[start]
            start += (packet[start + 1] + 1) * 8
        if next_header != PROTO_TCP:
            return None  # includes fragment headers: leave those alone
    else:
        return None
    if len(packet) < start + TCP_MIN_HEADER:
        return None
    return start


def _find_mss(packet: bytes, tcp: int) -> int | None:
    """Offset of the 2-byte MSS value in the TCP options, or None."""
    data_offset = (packet[tcp + 12] >> 4) * 4
    end = tcp + data_offset
    if data_offset < TCP_MIN_HEADER or end > len(packet):
        return None
    pos = tcp + TCP_MIN_HEADER
    while pos < end:
        kind = packet[pos]
        if kind == TCP_OPT_EOL:
            return None
        if kind == TCP_OPT_NOP:
            pos += 1
            continue
        if pos + 1 >= end:
            return None
        length = packet[pos + 1]
        if length < 2 or pos + length > end:
            return None
        if kind == TCP_OPT_MSS:
            return pos + 2 if length == TCP_OPT_MSS_LEN else None
        pos += length
    return None


def _ones_sum(data: bytes) -> int:
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum_update(checksum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over 16-bit words."""
    total = (~checksum & 0xFFFF) + (~_ones_sum(old) & 0xFFFF) + _ones_sum(new)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def clamp(packet: bytes, mss: int) -> bytes:
    """`packet` with its SYN MSS option lowered to `mss`; unchanged otherwise."""
    tcp = tcp_offset(packet)
    if tcp is None or not packet[tcp + TCP_OFF_FLAGS] & TCP_FLAG_SYN:
        return packet
    where = _find_mss(packet, tcp)
    if where is None:
        return packet
    current = int.from_bytes(packet[where : where + 2], "big")
    if current <= mss:
        return packet

    # rewrite the value and fix the checksum over the aligned words it touches
    out = bytearray(packet)
    out[where : where + 2] = mss.to_bytes(2, "big")
    lo = tcp + ((where - tcp) & ~1)
    hi = tcp + ((where + 2 - tcp + 1) & ~1)
    checksum = int.from_bytes(packet[tcp + 16 : tcp + 18], "big")
    fixed = checksum_update(checksum, packet[lo:hi], bytes(out[lo:hi]))
    out[tcp + TCP_OFF_CHECKSUM : tcp + TCP_OFF_CHECKSUM + 2] = fixed.to_bytes(2, "big")
    log.debug("clamped MSS %d -> %d", current, mss)
    return bytes(out)
