"""Fuzzing the receive path: random and mutated datagrams into SADB.open.

The invariant: wire input never raises, every packet ends as exactly one
counted outcome, and nothing but a packet we sealed ever comes out.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapath.esp import SADB, Drop, InboundSA, Opened, OutboundSA
from datapath.selector import Selectors
from datapath.udpencap import Kind, classify
from tests.esp_helpers import TRANSFORMS, ipv4_packet, make_config

FUZZ_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def make_db(esn: bool) -> tuple[SADB, dict[int, OutboundSA], set[bytes]]:
    """One SA of every transform (SPIs 0x100, 0x101, ...), and sealed payloads."""
    db = SADB()
    senders = {}
    payloads: set[bytes] = set()
    selectors = Selectors(["10.2.0.0/16"], ["10.1.0.0/16"])
    for n, transform in enumerate(TRANSFORMS):
        cfg = make_config(transform, esn=esn, window=64, spi=0x100 + n)
        db.add(InboundSA(cfg, selectors))
        senders[cfg.spi] = OutboundSA(cfg)
    return db, senders, payloads


def total_outcomes(db: SADB) -> int:
    return sum(db.total_counters().values())


def check_outcome(result: Opened | Drop, payloads: set[bytes]) -> None:
    if isinstance(result, Opened):
        assert result.payload in payloads
    else:
        assert isinstance(result, Drop)


spis = st.sampled_from([0x100, 0x101, 0x102, 0x103, 0x104, 0, 0xFFFFFFFF])


@FUZZ_SETTINGS
@given(
    esn=st.booleans(),
    datagrams=st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.tuples(spis, st.binary(max_size=200)).map(
                lambda t: t[0].to_bytes(4, "big") + t[1]
            ),
        ),
        max_size=20,
    ),
)
def test_random_datagrams_are_counted_drops(esn: bool, datagrams: list[bytes]) -> None:
    db, _, payloads = make_db(esn)
    for datagram in datagrams:
        _, result = db.open(datagram, now=0.0)
        assert isinstance(result, Drop)
        classify(datagram)
    assert total_outcomes(db) == len(datagrams)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 40), st.integers(0, 255)),
    st.tuples(st.just("splice"), st.integers(0, 10_000), st.integers(0, 10_000)),
    st.tuples(st.just("replay"), st.just(0), st.just(0)),
)


def mutate(packet: bytes, other: bytes, how: tuple[str, int, int]) -> bytes:
    kind, a, b = how
    if kind == "flip":
        i = a % len(packet)
        return packet[:i] + bytes([packet[i] ^ b]) + packet[i + 1 :]
    if kind == "truncate":
        return packet[: a % len(packet)]
    if kind == "extend":
        return packet + bytes([b]) * a
    if kind == "splice":  # head of one packet, tail of another
        return packet[: a % len(packet)] + other[b % len(other) :]
    return packet


@FUZZ_SETTINGS
@given(
    esn=st.booleans(),
    plan=st.lists(
        st.tuples(
            st.integers(0, len(TRANSFORMS) - 1),
            st.binary(max_size=300),
            st.sampled_from([4, 41, 59, 144, 6]),
            mutation,
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_mutated_packets_never_escape(
    esn: bool, plan: list[tuple[int, bytes, int, tuple[str, int, int]]]
) -> None:
    db, senders, payloads = make_db(esn)
    sent: list[bytes] = []
    for index, body, next_header, how in plan:
        sender = senders[0x100 + index]
        inner = ipv4_packet(payload=body) if next_header == 4 else body
        payloads.add(inner)
        packet = sender.seal(inner, next_header)
        other = sent[-1] if sent else packet
        sent.append(packet)
        for datagram in (mutate(packet, other, how), packet):
            _, result = db.open(datagram, now=0.0)
            check_outcome(result, payloads)
    assert total_outcomes(db) == 2 * len(plan)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_prefix_and_every_bit(transform: str) -> None:
    """Byte-at-a-time: each prefix, and each single-bit flip, is a drop."""
    cfg = make_config(transform, esn=True)
    packet = OutboundSA(cfg).seal(ipv4_packet(), 4)
    db = SADB()
    db.add(InboundSA(cfg))
    for n in range(len(packet)):
        assert isinstance(db.open(packet[:n], 0.0)[1], Drop)
    for i in range(len(packet)):
        for bit in range(8):
            altered = bytearray(packet)
            altered[i] ^= 1 << bit
            assert isinstance(db.open(bytes(altered), 0.0)[1], Drop)
    assert isinstance(db.open(packet, 0.0)[1], Opened)
    assert total_outcomes(db) == len(packet) * 9 + 1


@settings(deadline=None)  # timing varies on a shared machine
@given(st.binary(max_size=64))
def test_classify_total(datagram: bytes) -> None:
    assert isinstance(classify(datagram), Kind)
