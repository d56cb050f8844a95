"""Coalescing received TCP segments into virtio-net GSO packets for the TUN."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from datapath.vnet import (
    PLAIN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR_SIZE,
    coalesce,
    ipv4_header_checksum,
)

VNET = struct.Struct("=BBHHHH")


def segment(
    seq: int, payload: bytes, flags: str = "A", sport: int = 5001, ts: int = 7
) -> bytes:
    pkt = IP(src="10.1.0.5", dst="10.2.0.9", id=seq & 0xFFFF, flags="DF") / TCP(
        sport=sport,
        dport=80,
        seq=seq,
        ack=99,
        flags=flags,
        window=500,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (ts, 3))],
    )
    return bytes(pkt / payload)


def finish_checksum(buf: bytes, start: int, offset: int) -> bytes:
    """What the kernel does for NEEDS_CSUM: fold the sum from csum_start."""
    data = buf[start:] + (b"\0" if (len(buf) - start) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    out = bytearray(buf)
    out[start + offset : start + offset + 2] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(out)


def unpack(buffers: list[bytes]) -> list[tuple[tuple[int, ...], bytes]]:
    return [(VNET.unpack_from(b), b[VNET_HDR_SIZE:]) for b in buffers]


def test_consecutive_segments_become_one_gso_packet() -> None:
    data = bytes(range(256)) * 40
    segs = [segment(1000 + i * 1000, data[i * 1000 : (i + 1) * 1000]) for i in range(5)]
    segs.append(segment(6000, data[5000:5500], flags="PA"))
    ((hdr, pkt),) = unpack(coalesce(segs))
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = hdr
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM and gso_type == VIRTIO_NET_HDR_GSO_TCPV4
    assert (hdr_len, gso_size, csum_start, csum_offset) == (52, 1000, 20, 16)

    # a valid IPv4 header, and a TCP checksum that completes to a valid one
    assert ipv4_header_checksum(pkt[:20]) == 0
    full = IP(finish_checksum(pkt, csum_start, csum_offset))
    assert full[IP].len == len(pkt) == 52 + 5500
    check = full.copy()
    del check[TCP].chksum
    assert IP(bytes(check))[TCP].chksum == full[TCP].chksum
    assert bytes(full[TCP].payload) == data[:5500]
    assert full[TCP].seq == 1000 and full[TCP].flags == "PA"


def test_other_packets_pass_unchanged_and_in_order() -> None:
    udp = bytes(IP(src="10.1.0.5", dst="10.2.0.9") / UDP() / (b"x" * 30))
    syn = segment(1, b"", flags="S")
    a1, a2 = segment(100, b"a" * 500), segment(600, b"a" * 500)
    other_flow = segment(1100, b"b" * 500, sport=5002)
    gap = segment(5000, b"c" * 500)
    fin = segment(5500, b"d" * 10, flags="FA")
    packets = [udp, syn, a1, a2, other_flow, gap, fin, b"\x60" + bytes(50)]
    out = unpack(coalesce(packets))
    assert [hdr for hdr, _ in out if hdr[1]] == [(1, 1, 52, 500, 20, 16)]
    plain = [pkt for hdr, pkt in out if not hdr[1]]
    assert plain == [udp, syn, other_flow, gap, fin, b"\x60" + bytes(50)]
    assert all(b.startswith(PLAIN) for b in coalesce([udp]))


def test_different_timestamps_start_a_new_packet() -> None:
    segs = [segment(0, b"x" * 100, ts=1), segment(100, b"x" * 100, ts=1)]
    segs += [segment(200, b"x" * 100, ts=2), segment(300, b"x" * 100, ts=2)]
    out = unpack(coalesce(segs))
    assert [hdr[1] for hdr, _ in out] == [1, 1]


def test_longer_segment_after_a_short_one_is_not_merged() -> None:
    segs = [segment(0, b"x" * 100), segment(100, b"x" * 50), segment(150, b"x" * 100)]
    out = unpack(coalesce(segs))
    assert len(out) == 2 and out[0][0][3] == 100 and out[1][0][1] == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 1400), st.integers(0, 2), st.booleans()),
        min_size=1,
        max_size=80,
    )
)
def test_coalesced_stream_carries_the_same_bytes(
    spec: list[tuple[int, int, bool]],
) -> None:
    # a stream of segments, some of them of other flows or pushed
    packets: list[bytes] = []
    seqs = {5001: 0, 5002: 0, 5003: 0}
    want: dict[int, bytes] = {5001: b"", 5002: b"", 5003: b""}
    for n, (size, flow, push) in enumerate(spec):
        sport = 5001 + flow
        payload = bytes([n % 256]) * size
        packets.append(
            segment(seqs[sport], payload, flags="PA" if push else "A", sport=sport)
        )
        seqs[sport] += size
        want[sport] += payload

    got: dict[int, bytes] = {5001: b"", 5002: b"", 5003: b""}
    for hdr, pkt in unpack(coalesce(packets)):
        assert len(pkt) <= 65535
        if hdr[1]:
            assert ipv4_header_checksum(pkt[:20]) == 0
            pkt = finish_checksum(pkt, hdr[4], hdr[5])
        ip = IP(pkt)
        check = ip.copy()
        del check[TCP].chksum
        assert IP(bytes(check))[TCP].chksum == ip[TCP].chksum
        got[ip[TCP].sport] += bytes(ip[TCP].payload)
    assert got == want
