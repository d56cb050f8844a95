"""virtio-net headers for a TUN device opened with IFF_VNET_HDR.

Every read from and write to such a device starts with a 10-byte
`struct virtio_net_hdr` (linux/virtio_net.h, native byte order):

    flags(1) gso_type(1) hdr_len(2) gso_size(2) csum_start(2) csum_offset(2)

On write the header lets us hand the kernel one TCP "super-packet" made of
many consecutive segments of one flow (what GRO does in a NIC driver): one
write and one trip through the IP and TCP stacks instead of dozens. The
merged packet's TCP checksum is left partial (flag NEEDS_CSUM, like a packet
from a NIC with checksum offload); each original segment was authenticated
by ESP, so nothing unverified is invented.

Coalescing rules (IPv4 only; anything else is written as it is): no IP
options or fragments, same addresses, ports, TOS, TTL, DF, ACK number,
window and TCP options; the flags are plain ACK (the last may add PSH);
sequence numbers follow each other; all payloads equal except a shorter
last one; the merged packet stays within 65535 bytes.
"""

from __future__ import annotations

import struct

VNET_HDR_SIZE = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1

PLAIN = bytes(VNET_HDR_SIZE)  # header of a packet written as it is
IPV4_HEADER_SIZE = 20
TCP_HEADER_SIZE = 20
TCP_CHECKSUM_OFFSET = 16
IPPROTO_TCP = 6
IPV4_MAX_LENGTH = 65535
TCP_ACK = 0x10
TCP_PSH = 0x08
IP_DF = 0x4000
IP_FRAGMENT_MASK = 0x3FFF  # MF flag and fragment offset
MAX_SEGMENTS = 64

_VNET = struct.Struct("=BBHHHH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
# IPv4 header, then TCP: ports, seq, ack, data offset, flags, window
_IPV4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBH")
_U16 = struct.Struct("!H")


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_header_checksum(header: bytes) -> int:
    """RFC 791 header checksum of `header` (its checksum field set to 0)."""
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    return ~_fold(total) & 0xFFFF


def _merge(group: list[bytes], hlen: int, seg: int) -> bytes:
    """One GSO TCPv4 packet (with its vnet header) from consecutive segments."""
    first = group[0]
    total = hlen + sum(len(p) - hlen for p in group)
    ip = bytearray(first[:IPV4_HEADER_SIZE])
    ip[2:4] = _U16.pack(total)
    ip[10:12] = b"\0\0"
    ip[10:12] = _U16.pack(ipv4_header_checksum(bytes(ip)))
    tcp = bytearray(first[IPV4_HEADER_SIZE:hlen])
    tcp[13] |= group[-1][IPV4_HEADER_SIZE + 13] & TCP_PSH
    # partial checksum: the pseudo-header sum, completed by the kernel
    tcp_len = total - IPV4_HEADER_SIZE
    pseudo = _fold(sum(struct.unpack("!4H", first[12:20])) + IPPROTO_TCP + tcp_len)
    tcp[TCP_CHECKSUM_OFFSET : TCP_CHECKSUM_OFFSET + 2] = _U16.pack(pseudo)
    vnet = _VNET.pack(
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV4,
        hlen,
        seg,
        IPV4_HEADER_SIZE,
        TCP_CHECKSUM_OFFSET,
    )
    return b"".join([vnet, ip, tcp, *(p[hlen:] for p in group)])


def coalesce(packets: list[bytes]) -> list[bytes]:
    """Buffers to write to a vnet-header TUN device, in the original order."""
    out: list[bytes] = []
    group: list[bytes] = []
    key: tuple[object, ...] = ()
    hlen = seg = next_seq = 0
    unpack = _IPV4_TCP.unpack_from

    def flush() -> None:
        if len(group) == 1:
            out.append(PLAIN + group[0])
        elif group:
            out.append(_merge(group, hlen, seg))
        group.clear()

    for packet in packets:
        if len(packet) < IPV4_HEADER_SIZE + TCP_HEADER_SIZE or packet[0] != 0x45:
            flush()
            out.append(PLAIN + packet)
            continue
        (_vihl, tos, tot_len, _id, frag, ttl, proto, _ck, src, dst,
         sport, dport, seq, ack, doff, flags, window) = unpack(packet)  # fmt: skip
        thl = (doff >> 4) * 4
        plen = tot_len - IPV4_HEADER_SIZE - thl
        if (
            proto != IPPROTO_TCP
            or frag & IP_FRAGMENT_MASK
            or tot_len != len(packet)
            or thl < TCP_HEADER_SIZE
            or plen <= 0
            or flags & ~TCP_PSH != TCP_ACK
        ):
            flush()
            out.append(PLAIN + packet)
            continue
        options = packet[IPV4_HEADER_SIZE + TCP_HEADER_SIZE : IPV4_HEADER_SIZE + thl]
        this = (src, dst, sport, dport, tos, ttl, frag, ack, window, options)
        if (
            group
            and this == key
            and seq == next_seq
            and plen <= seg
            and len(group) < MAX_SEGMENTS
            and (len(group) + 1) * seg + hlen <= IPV4_MAX_LENGTH
        ):
            group.append(packet)
            next_seq = (seq + plen) & 0xFFFFFFFF
            if plen < seg or flags & TCP_PSH:
                flush()  # a short or pushed segment ends the run
            continue
        flush()
        group.append(packet)
        key = this
        hlen = IPV4_HEADER_SIZE + thl
        seg = plen
        next_seq = (seq + plen) & 0xFFFFFFFF
        if flags & TCP_PSH:
            flush()
    flush()
    return out
