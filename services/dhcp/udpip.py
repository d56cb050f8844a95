"""IPv4 + UDP framing for the DHCP client's packet socket.

Before it has an address the client cannot use a normal UDP socket to send
from 0.0.0.0 or to receive replies unicast to an address it does not have
yet, so it reads and writes whole IP datagrams on an AF_PACKET socket.
Parsing is bounds-checked and raises `BadFrame` (a `DhcpError`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from datapath.icmp import internet_checksum as checksum  # RFC 1071
from services.dhcp.message import DhcpError

IPV4_VERSION = 4
IPV4_MIN_HEADER = 20
UDP_HEADER = 8
PROTO_UDP = 17
DEFAULT_TTL = 64
FRAGMENT_MASK = 0x3FFF  # MF flag + fragment offset
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


class BadFrame(DhcpError):
    """Not a whole, well-formed IPv4/UDP datagram."""


@dataclass
class UdpDatagram:
    source: IPv4Address
    destination: IPv4Address
    source_port: int
    destination_port: int
    payload: bytes


def _pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, PROTO_UDP, length)


def build(d: UdpDatagram, ident: int = 0) -> bytes:
    length = UDP_HEADER + len(d.payload)
    udp = _UDP.pack(d.source_port, d.destination_port, length, 0) + d.payload
    src, dst = d.source.packed, d.destination.packed
    udp_sum = checksum(_pseudo_header(src, dst, length) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    header = _IPV4.pack(
        (IPV4_VERSION << 4) | 5, 0, IPV4_MIN_HEADER + length, ident & 0xFFFF,
        0, DEFAULT_TTL, PROTO_UDP, 0, src, dst,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def parse(packet: bytes, verify_udp_checksum: bool = True) -> UdpDatagram:
    """One IPv4/UDP datagram. Skip the UDP checksum for packets the kernel
    says still await checksum offload (PACKET_AUXDATA, TP_STATUS_CSUMNOTREADY)."""
    if len(packet) < IPV4_MIN_HEADER:
        raise BadFrame("shorter than an IPv4 header")
    fields = _IPV4.unpack(packet[:IPV4_MIN_HEADER])
    version_ihl, _, total, _, fragment, _, proto, _, src, dst = fields
    header_length = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != IPV4_VERSION or header_length < IPV4_MIN_HEADER:
        raise BadFrame("not IPv4")
    if not header_length + UDP_HEADER <= total <= len(packet):
        raise BadFrame("bad total length")
    if proto != PROTO_UDP or fragment & FRAGMENT_MASK:
        raise BadFrame("not an unfragmented UDP datagram")
    if checksum(packet[:header_length]):
        raise BadFrame("bad IPv4 header checksum")
    udp = packet[header_length:total]
    sport, dport, length, udp_sum = _UDP.unpack(udp[:UDP_HEADER])
    if not UDP_HEADER <= length <= len(udp):
        raise BadFrame("bad UDP length")
    udp = udp[:length]
    if (
        verify_udp_checksum
        and udp_sum
        and checksum(_pseudo_header(src, dst, length) + udp)
    ):
        raise BadFrame("bad UDP checksum")
    return UdpDatagram(
        IPv4Address(src), IPv4Address(dst), sport, dport, udp[UDP_HEADER:]
    )
