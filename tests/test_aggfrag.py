"""AGGFRAG (RFC 9347): Packer and Reassembler, worked example, runts, hostile
BlockOffset values, round trips with loss, reordering and duplication."""

from __future__ import annotations

import random
import struct

import pytest
from aggfrag_util import ipv4, ipv6
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from datapath import aggfrag
from datapath.aggfrag import (
    AggfragError,
    CongestionInfo,
    Drop,
    Packer,
    Reassembler,
    all_pad_payload,
    basic_header,
)


def offsets(payloads: list[bytes]) -> list[int]:
    return [struct.unpack_from("!H", p, 2)[0] for p in payloads]


def feed_all(
    r: Reassembler, payloads: list[bytes], first_seq: int = 1, now: float = 0.0
) -> list[bytes]:
    out: list[bytes] = []
    for i, p in enumerate(payloads):
        out += r.feed(first_seq + i, p, now)
    return out


# -- the worked example (RFC 9347 Appendix A) -------------------------------


def test_rfc_worked_example_block_offsets() -> None:
    # payload space 1404 (4 header + 1400 DataBlocks), fixed-size payloads
    packer = Packer(1404, pad=True)
    inner = [ipv4(n, i) for i, n in enumerate([750, 750, 60, 240, 3000])]
    payloads: list[bytes] = []
    for packet in inner:
        payloads += packer.push(packet)
    payloads += packer.flush()
    assert offsets(payloads) == [0, 100, 2000, 600]
    assert [len(p) for p in payloads] == [1404] * 4
    assert all(p[0] == 0 and p[1] == 0 for p in payloads)  # sub-type 0, reserved 0
    # the last payload: 600 bytes of the 3000-byte packet, then a pad block
    assert payloads[3][4 + 600] >> 4 == 0
    assert feed_all(Reassembler(), payloads) == inner


def test_flush_sends_at_once_without_padding() -> None:
    packer = Packer(1400)
    assert packer.push(ipv4(100, 1)) == []  # waits for more while the queue is busy
    assert packer.pending == 100
    (payload,) = packer.flush()  # the TUN queue is empty: send now
    assert payload == basic_header(0) + ipv4(100, 1)
    assert packer.flush() == []


def test_full_payload_is_emitted_immediately() -> None:
    packer = Packer(104)
    assert packer.push(ipv4(100, 1)) == [basic_header(0) + ipv4(100, 1)]
    assert packer.pending == 0


def test_resize_flushes_first() -> None:
    packer = Packer(1400)
    packer.push(ipv4(200))
    (old,) = packer.resize(100)
    assert len(old) == 204
    out = packer.push(ipv4(300, 2))
    assert all(len(p) == 100 for p in out)


@pytest.mark.parametrize("size", [0, 4])
def test_payload_size_too_small(size: int) -> None:
    with pytest.raises(AggfragError):
        Packer(size)


@pytest.mark.parametrize(
    "packet,reason",
    [
        (b"", Drop.INNER_INVALID),
        (b"\x45" + bytes(18), Drop.INNER_INVALID),  # shorter than a header
        (ipv4(100)[:99], Drop.INNER_INVALID),  # Total Length says 100
        (ipv6(100) + b"x", Drop.INNER_INVALID),
        (b"\x55" + ipv4(100)[1:], Drop.INNER_INVALID),  # version 5
        (ipv6(40) + bytes(0x10000), Drop.INNER_TOO_BIG),
    ],
)
def test_packer_refuses_bad_inner(packet: bytes, reason: Drop) -> None:
    packer = Packer(1400)
    assert packer.push(packet) == []
    assert packer.counters[reason] == 1
    assert packer.flush() == []


# -- receiver details --------------------------------------------------------


@pytest.mark.parametrize("cut", range(1, 7))
def test_runt_header_split(cut: int) -> None:
    # a new inner packet starts `cut` bytes before the end of a payload, so its
    # length field (IPv4: bytes 2..3, IPv6: 4..5) may be in the next payload
    for make in (ipv4, ipv6):
        first = ipv4(100 - cut, 1)
        second = make(300, 2)
        data = first + second
        p1 = basic_header(0) + data[:100]
        p2 = basic_header(300 - cut) + data[100:]
        for order in ((1, p1), (2, p2)), ((2, p2), (1, p1)):
            r = Reassembler()
            got = [pkt for seq, p in order for pkt in r.feed(seq, p, 0.0)]
            assert sorted(got) == sorted([first, second]), (make, cut, order)
            assert r.held_bytes == 0


def test_congestion_header_skipped_and_reported() -> None:
    info = CongestionInfo(block_offset=0, probe=True, tval=7, rtt=1 << 30)
    packet = ipv4(60, 3)
    r = Reassembler()
    assert r.feed(1, info.pack() + packet, 0.0) == [packet]
    (seen,) = r.take_feedback()
    assert seen.tval == 7 and seen.probe and seen.rtt == aggfrag.RTT_MAX
    assert CongestionInfo.unpack(info.pack()) == CongestionInfo(
        probe=True, tval=7, rtt=aggfrag.RTT_MAX
    )


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"", Drop.MALFORMED),
        (b"\x00\x00\x00", Drop.MALFORMED),
        (b"\x01" + bytes(10), Drop.MALFORMED),
        (b"\x02\x00\x00\x00" + ipv4(40), Drop.BAD_SUBTYPE),
        (basic_header(0) + b"\x50" + bytes(30), Drop.BAD_BLOCK_TYPE),
        (basic_header(0) + b"\x45\x00\x00\x10" + bytes(30), Drop.BAD_INNER_LENGTH),
    ],
)
def test_bad_payloads_are_counted(payload: bytes, reason: Drop) -> None:
    r = Reassembler()
    assert r.feed(1, payload, 0.0) == []
    assert r.counters[reason] == 1


def test_reserved_byte_ignored_on_receipt() -> None:
    packet = ipv4(80)
    assert Reassembler().feed(1, b"\x00\xff\x00\x00" + packet, 0.0) == [packet]


def test_duplicate_and_too_old() -> None:
    r = Reassembler(window=3)
    p = basic_header(0) + ipv4(40)
    assert r.feed(10, p, 0.0)
    assert r.feed(10, p, 0.0) == []
    assert r.counters[Drop.DUPLICATE] == 1
    assert r.feed(7, p, 0.0)  # 10 - 3: still inside
    assert r.feed(6, p, 0.0) == []
    assert r.counters[Drop.TOO_OLD] == 1


def test_all_pad_payload_between_pieces_is_skipped() -> None:
    big = ipv4(3000, 9)
    packer = Packer(1000)
    pieces = packer.push(big) + packer.flush()
    stream = [pieces[0], all_pad_payload(200), *pieces[1:]]
    stream.insert(3, all_pad_payload(100, CongestionInfo(probe=True, tval=1)))
    r = Reassembler()
    assert feed_all(r, stream) == [big]


def test_partial_dropped_after_drop_timer() -> None:
    big = ipv4(3000, 9)
    pieces = Packer(1000).push(big)
    r = Reassembler(drop_timeout=1.0)
    r.feed(1, pieces[0], 10.0)
    assert r.held_bytes == 996
    assert r.next_timer() == 11.0
    r.expire(10.5)
    assert r.held_bytes == 996
    r.expire(11.0)
    assert r.held_bytes == 0 and r.next_timer() is None
    assert r.counters[Drop.PARTIAL_TIMEOUT] == 1
    # the rest arrives too late: its continuation bytes are orphans
    assert r.feed(2, pieces[1], 11.1) == []
    assert r.held_bytes == 0


def test_lost_middle_piece_drops_packet_keeps_neighbours() -> None:
    a, big, c = ipv4(500, 1), ipv4(2500, 2), ipv4(300, 3)
    packer = Packer(1004)
    payloads = packer.push(a) + packer.push(big) + packer.push(c) + packer.flush()
    assert len(payloads) == 4
    r = Reassembler()
    got = [pkt for seq in (1, 2, 4) for pkt in r.feed(seq, payloads[seq - 1], 0.0)]
    assert got == [a, c]  # the packet that lost a piece is never delivered
    r.feed(5, basic_header(0) + ipv4(40), 0.0)
    r.feed(6, basic_header(0) + ipv4(40), 0.0)
    r.feed(7, basic_header(0) + ipv4(40), 0.0)
    assert r.held_bytes == 0
    assert r.counters[Drop.PARTIAL_WINDOW] == 1


def test_memory_bounded() -> None:
    r = Reassembler(window=1000, max_bytes=10_000)
    for seq in range(1, 200, 2):  # every packet loses its second half
        r.feed(seq, basic_header(0) + ipv4(3000, seq)[:1000], 0.0)
        assert r.held_bytes <= 10_000
    assert r.counters[Drop.MEMORY] > 0


def test_selector_check_applies_to_each_inner_packet() -> None:
    ok, bad = ipv4(40, 1), ipv6(60, 2)
    r = Reassembler(permits=lambda p: p[0] >> 4 == 4)
    assert r.feed(1, basic_header(0) + ok + bad, 0.0) == [ok]
    assert r.counters[Drop.SELECTOR] == 1


# -- hostile BlockOffset values ----------------------------------------------

HOSTILE = [
    # (name, payloads, expected drop reason)
    (
        "offset too small",
        [basic_header(0) + ipv4(300, 1)[:100], basic_header(50) + ipv4(300, 1)[100:]],
        Drop.OFFSET_MISMATCH,
    ),
    (
        "offset too large",
        [basic_header(0) + ipv4(300, 1)[:100], basic_header(201) + ipv4(300, 1)[100:]],
        Drop.OFFSET_MISMATCH,
    ),
    (
        "new block where a continuation is due",
        [basic_header(0) + ipv4(300, 1)[:100], basic_header(0) + ipv4(200, 2)],
        Drop.OFFSET_MISMATCH,
    ),
    (
        "continuation of nothing",
        [basic_header(0) + ipv4(100, 1), basic_header(40) + bytes(40) + ipv4(60, 2)],
        Drop.ORPHAN_CONTINUATION,
    ),
    (
        "maximum offset, nothing behind it",
        [basic_header(0) + ipv4(300, 1)[:100], basic_header(0xFFFF) + bytes(10)],
        Drop.OFFSET_MISMATCH,
    ),
]


@pytest.mark.parametrize("name,payloads,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_block_offset(name: str, payloads: list[bytes], reason: Drop) -> None:
    for order in (payloads, payloads[::-1]):
        r = Reassembler()
        seqs = [1, 2] if order is payloads else [2, 1]
        got = [
            p for seq, pl in zip(seqs, order, strict=True) for p in r.feed(seq, pl, 0)
        ]
        assert r.counters[reason] == 1, (name, r.counters)
        assert all(aggfrag.valid_inner(p) for p in got)
        # whatever starts after the BlockOffset is still parsed
        if name == "continuation of nothing":
            assert ipv4(60, 2) in got
        r.expire(100.0)
        assert r.held_bytes == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 40),  # sequence number
            st.integers(0, 1),  # sub-type
            st.integers(0, 0xFFFF),  # BlockOffset
            st.binary(max_size=300),  # DataBlocks (garbage)
        ),
        max_size=30,
    ),
    st.integers(1, 2000),
)
def test_garbage_only_counted_drops(
    items: list[tuple[int, int, int, bytes]], max_bytes: int
) -> None:
    r = Reassembler(max_bytes=max_bytes)
    for i, (seq, subtype, offset, blocks) in enumerate(items):
        header = (
            basic_header(offset)
            if subtype == 0
            else CongestionInfo(block_offset=offset).pack()
        )
        for packet in r.feed(seq, header + blocks, i * 0.1):
            assert aggfrag.valid_inner(packet)
        assert 0 <= r.held_bytes <= max_bytes
    r.expire(1e9)
    assert r.held_bytes == 0 and r.next_timer() is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 5))
def test_mutated_stream(noise: bytes, seq: int) -> None:
    packer = Packer(200)
    payloads = packer.push(ipv4(700, 1)) + packer.push(ipv6(90, 2)) + packer.flush()
    r = Reassembler()
    mutated = bytearray(payloads[seq % len(payloads)])
    for i, b in enumerate(noise[: len(mutated)]):
        mutated[i] ^= b
    payloads[seq % len(payloads)] = bytes(mutated)
    for packet in feed_all(r, payloads):
        assert aggfrag.valid_inner(packet)
    r.expire(1e9)
    assert r.held_bytes == 0


# -- round trips ------------------------------------------------------------


def stream_ranges(packets: list[bytes], payloads: list[bytes]) -> list[set[int]]:
    """For each packet, the indexes of the payloads that carry part of it."""
    bounds, pos = [], 0
    for p in payloads:
        bounds.append((pos, pos + len(p) - 4))
        pos += len(p) - 4
    out, pos = [], 0
    for packet in packets:
        start, end = pos, pos + len(packet)
        out.append({i for i, (a, b) in enumerate(bounds) if a < end and start < b})
        pos = end
    return out


sizes = st.one_of(
    st.integers(24, 1600), st.integers(1600, 9000), st.sampled_from([65535, 24])
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(sizes, st.booleans(), st.booleans()), min_size=1, max_size=25),
    st.integers(5, 1500),
    st.integers(0, 2**32 - 1),
    st.floats(0, 0.3),
    st.floats(0, 0.3),
    st.floats(0, 0.3),
    st.integers(0, 5),
)
def test_round_trip_with_loss_reorder_duplication(
    spec: list[tuple[int, bool, bool]],
    payload_size: int,
    seed: int,
    loss: float,
    reorder: float,
    dup: float,
    window: int,
) -> None:
    assume(sum(size for size, _, _ in spec) < 2000 * (payload_size - 4))
    rng = random.Random(seed)

    # send: packets of random sizes and families, flushes at random points
    packer = Packer(payload_size)
    packets: list[bytes] = []
    payloads: list[bytes] = []
    for tag, (size, v6, flush) in enumerate(spec):
        packet = ipv6(max(size, 44), tag) if v6 else ipv4(size, tag)
        packets.append(packet)
        payloads += packer.push(packet)
        if flush:
            payloads += packer.flush()
    payloads += packer.flush()
    carriers = stream_ranges(packets, payloads)

    # network: loss, duplication, reordering
    arrivals = [
        (seq, p)
        for seq, p in enumerate(payloads, start=100)
        for _ in range(0 if rng.random() < loss else 2 if rng.random() < dup else 1)
    ]
    for i in range(len(arrivals) - 1):
        if rng.random() < reorder:
            j = min(len(arrivals) - 1, i + rng.randint(1, window + 2))
            arrivals[i], arrivals[j] = arrivals[j], arrivals[i]

    # receive
    r = Reassembler(window=window)
    accepted: set[int] = set()
    highest = 0
    delivered: list[bytes] = []
    for seq, payload in arrivals:
        if seq >= highest - window:
            accepted.add(seq - 100)
            highest = max(highest, seq)
        delivered += r.feed(seq, payload, 0.0)
        assert r.held_bytes <= r.max_bytes

    # nothing corrupted, nothing twice, everything whole that could be
    sent = {p: i for i, p in enumerate(packets)}
    assert all(p in sent for p in delivered)
    assert len(set(delivered)) == len(delivered)
    expected = {i for i, c in enumerate(carriers) if c <= accepted}
    assert {sent[p] for p in delivered} == expected
    if not loss and not reorder:
        assert delivered == packets

    # partial packets go when the timer runs out
    r.expire(5.0)
    assert r.held_bytes == 0 and r.next_timer() is None
