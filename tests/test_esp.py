"""ESP SA behaviour: round trips, receive order, drop reasons, limits."""

from __future__ import annotations

import pytest

from datapath import esp
from datapath.esp import (
    NEXT_HEADER_AGGFRAG,
    NEXT_HEADER_IPV4,
    NEXT_HEADER_NONE,
    SADB,
    Drop,
    EspConfigError,
    InboundSA,
    Opened,
    OutboundSA,
    SAConfig,
    SequenceExhausted,
)
from datapath.selector import Selectors
from tests.esp_helpers import TRANSFORMS, ipv4_packet, make_config, make_pair


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_round_trip_every_size(transform: str, esn: bool) -> None:
    out, inb = make_pair(transform, esn)
    for size in range(0, 70):
        inner = ipv4_packet(payload=bytes(range(size)))
        packet = out.seal(inner, NEXT_HEADER_IPV4)
        assert len(packet) == len(inner) + out.overhead(len(inner))
        opened = inb.open(packet, now=1.0)
        assert opened == Opened(NEXT_HEADER_IPV4, inner, out.seq)
    assert inb.counters["ok"] == 70
    assert inb.last_received == 1.0


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_max_payload_fits(transform: str) -> None:
    out, _ = make_pair(transform)
    for space in range(60, 1500, 7):
        best = out.max_payload(space)
        assert best + out.overhead(best) <= space
        assert best + 1 + out.overhead(best + 1) > space


def test_gcm_overhead_matches_rfc_accounting() -> None:
    out, _ = make_pair("aes-gcm-128")
    # 1500 - 20 (IPv4) - 8 (UDP) leaves 1472 for ESP: inner MTU 1438
    assert out.max_payload(1472) == 1438


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_sequence_numbers_start_at_one(transform: str) -> None:
    out, inb = make_pair(transform)
    out.seal(ipv4_packet(), NEXT_HEADER_IPV4)
    assert out.seq == 1
    result = inb.open(out.seal(ipv4_packet(), NEXT_HEADER_IPV4), 0.0)
    assert isinstance(result, Opened) and result.seq == 2


def test_replayed_packet_is_dropped() -> None:
    out, inb = make_pair("aes-gcm-128")
    packet = out.seal(ipv4_packet(), NEXT_HEADER_IPV4)
    assert isinstance(inb.open(packet, 0.0), Opened)
    assert inb.open(packet, 0.0) is Drop.REPLAY
    assert inb.counters[Drop.REPLAY] == 1


def test_forged_packet_does_not_move_window() -> None:
    out, inb = make_pair("aes-gcm-128", esn=False)
    packet = bytearray(out.seal(ipv4_packet(), NEXT_HEADER_IPV4))
    packet[4:8] = (1000).to_bytes(4, "big")  # far right of the window
    assert inb.open(bytes(packet), 0.0) is Drop.ICV
    assert inb.replay.top == 0
    assert isinstance(inb.open(out.seal(ipv4_packet(), 4), 0.0), Opened)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_altered_byte_is_rejected(transform: str) -> None:
    out, _ = make_pair(transform)
    packet = out.seal(ipv4_packet(), NEXT_HEADER_IPV4)
    for i in range(len(packet)):
        _, inb = make_pair(transform)
        altered = bytearray(packet)
        altered[i] ^= 0x01
        result = inb.open(bytes(altered), 0.0)
        assert isinstance(result, Drop), i
        # a changed SPI names another SA; a changed sequence number may
        # also fall left of the window
        expected = Drop.UNKNOWN_SPI if i < 4 else Drop.ICV
        assert result in (expected, Drop.REPLAY_WINDOW), (i, result)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_truncated_packets_are_malformed_or_icv(transform: str) -> None:
    out, inb = make_pair(transform)
    packet = out.seal(ipv4_packet(), NEXT_HEADER_IPV4)
    for n in range(len(packet)):
        result = inb.open(packet[:n], 0.0)
        assert result in (Drop.MALFORMED, Drop.ICV), n
    assert inb.counters["ok"] == 0


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_dummy_packet_dropped_silently(transform: str) -> None:
    out, inb = make_pair(transform)
    assert inb.open(out.seal(b"", NEXT_HEADER_NONE), 0.0) is Drop.DUMMY
    assert inb.counters[Drop.DUMMY] == 1


@pytest.mark.parametrize("next_header", [0, 6, 17, 50, 60, 143, 145, 255])
def test_unknown_next_header(next_header: int) -> None:
    out, inb = make_pair("aes-gcm-128")
    assert inb.open(out.seal(ipv4_packet(), next_header), 0.0) is Drop.BAD_NEXT_HEADER


def test_aggfrag_payload_returned_unchecked() -> None:
    out, inb = make_pair("aes-gcm-128")
    inb.selectors = Selectors(["10.2.0.0/16"], ["10.1.0.0/16"])
    payload = b"\0\0" + b"anything"
    result = inb.open(out.seal(payload, NEXT_HEADER_AGGFRAG), 0.0)
    assert result == Opened(NEXT_HEADER_AGGFRAG, payload, 1)


def test_inner_header_must_match_next_header() -> None:
    out, inb = make_pair("aes-gcm-128")
    assert inb.open(out.seal(ipv4_packet(), 41), 0.0) is Drop.BAD_INNER
    assert inb.open(out.seal(b"\x45" * 10, 4), 0.0) is Drop.BAD_INNER


def test_selectors_checked_after_decryption() -> None:
    cfg = make_config("aes-gcm-128")
    out = OutboundSA(cfg)
    inb = InboundSA(cfg, Selectors(local=["10.2.0.0/16"], remote=["10.1.0.0/16"]))
    ok = ipv4_packet("10.1.3.4", "10.2.9.9")
    spoofed = ipv4_packet("192.0.2.1", "10.2.9.9")
    wrong_dst = ipv4_packet("10.1.3.4", "10.3.0.1")
    assert isinstance(inb.open(out.seal(ok, 4), 0.0), Opened)
    assert inb.open(out.seal(spoofed, 4), 0.0) is Drop.SELECTOR
    assert inb.open(out.seal(wrong_dst, 4), 0.0) is Drop.SELECTOR
    assert inb.counters[Drop.SELECTOR] == 2


def test_sender_refuses_to_wrap_without_esn() -> None:
    out, inb = make_pair("aes-gcm-128", esn=False)
    out.seq = esp.SEQ_LIMIT - 1
    inb.replay.reset(esp.SEQ_LIMIT - 2)
    assert isinstance(inb.open(out.seal(ipv4_packet(), 4), 0.0), Opened)
    assert out.seq == esp.SEQ_LIMIT
    assert out.needs_rekey
    with pytest.raises(SequenceExhausted):
        out.seal(ipv4_packet(), 4)
    assert out.seq == esp.SEQ_LIMIT
    assert out.counters["seq_exhausted"] == 1


def test_sender_refuses_to_wrap_with_esn() -> None:
    out, _ = make_pair("chacha20-poly1305", esn=True)
    out.seq = esp.ESN_SEQ_LIMIT
    with pytest.raises(SequenceExhausted):
        out.seal(ipv4_packet(), 4)


def test_soft_limit() -> None:
    cfg = make_config("aes-gcm-128")
    out = OutboundSA(cfg, soft_limit=3)
    for _ in range(2):
        out.seal(b"", NEXT_HEADER_NONE)
        assert not out.needs_rekey
    out.seal(b"", NEXT_HEADER_NONE)
    assert out.needs_rekey


def test_esn_crosses_two_to_the_32() -> None:
    out, inb = make_pair("aes-gcm-256", esn=True, window=64)
    out.seq = (1 << 32) - 3
    inb.replay.reset((1 << 32) - 3)
    seqs = []
    for _ in range(6):
        result = inb.open(out.seal(ipv4_packet(), 4), 0.0)
        assert isinstance(result, Opened)
        seqs.append(result.seq)
    assert seqs == [(1 << 32) + n for n in range(-2, 4)]


def test_sadb_routes_by_spi() -> None:
    db = SADB()
    cfg_a = make_config("aes-gcm-128", spi=0x100)
    cfg_b = make_config("chacha20-poly1305", spi=0x200)
    sa_a, sa_b = InboundSA(cfg_a), InboundSA(cfg_b)
    db.add(sa_a)
    db.add(sa_b)
    with pytest.raises(EspConfigError):
        db.add(InboundSA(cfg_a))
    packet = OutboundSA(cfg_b).seal(ipv4_packet(), 4)
    sa, result = db.open(packet, 0.0)
    assert sa is sa_b and isinstance(result, Opened)
    stranger = OutboundSA(make_config("aes-gcm-128", spi=0x300)).seal(b"", 59)
    assert db.open(stranger, 0.0) == (None, Drop.UNKNOWN_SPI)
    assert db.open(b"\1\2\3", 0.0) == (None, Drop.MALFORMED)
    assert db.get(0x100) is sa_a
    assert db.remove(0x100) is sa_a and db.get(0x100) is None
    totals = db.total_counters()
    assert totals[Drop.UNKNOWN_SPI] == 1 and totals["ok"] == 1


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("spi", {"spi": 0}),
        ("spi", {"spi": 1 << 32}),
        ("transform", {"transform": "rot13"}),
        ("replay_window", {"replay_window": 0}),
        ("key", {"key": "00" * 20}),
        ("auth_key", {"auth_key": None}),
    ],
)
def test_bad_config_named(field: str, kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "spi": 1000,
        "transform": "aes-gcm-128",
        "key": bytes(20),
    }
    base.update(kwargs)
    with pytest.raises(EspConfigError, match=field):
        SAConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("transform", "key", "auth_key"),
    [
        ("aes-gcm-128", bytes(16), b""),  # salt missing
        ("aes-gcm-256", bytes(36), bytes(32)),  # AEAD takes no auth key
        ("chacha20-poly1305", bytes(32), b""),
        ("aes-cbc-hmac-sha256", bytes(20), bytes(32)),
        ("aes-cbc-hmac-sha256", bytes(16), bytes(20)),
        ("3des-cbc-hmac-sha1", bytes(24), bytes(20)),  # degenerate 3DES key
    ],
)
def test_bad_key_material(transform: str, key: bytes, auth_key: bytes) -> None:
    cfg = SAConfig(spi=1000, transform=transform, key=key, auth_key=auth_key)
    with pytest.raises(EspConfigError, match=transform):
        OutboundSA(cfg)


def test_config_repr_hides_keys() -> None:
    cfg = make_config("aes-cbc-hmac-sha256")
    assert cfg.key.hex() not in repr(cfg)


@pytest.mark.parametrize("next_header", [-1, 256, 4 + 256])
def test_seal_refuses_a_next_header_that_is_not_a_byte(next_header: int) -> None:
    out, _ = make_pair("aes-gcm-128")
    with pytest.raises(esp.EspError, match="next header"):
        out.seal(b"", next_header)
    assert out.seq == 0


@pytest.mark.parametrize(
    "transform", ["aes-gcm-128", "aes-gcm-256", "chacha20-poly1305"]
)
def test_aead_iv_is_the_64_bit_sequence_number(transform: str) -> None:
    """RFC 4106 §3.1 / RFC 7634 §2: unique IVs; here IV = seq, so no repeats."""
    out, _ = make_pair(transform, esn=True)
    out.seq = (3 << 32) - 2
    ivs = set()
    for _ in range(4):
        packet = out.seal(ipv4_packet(), 4)
        assert packet[8:16] == out.seq.to_bytes(8, "big")
        assert packet[4:8] == (out.seq & 0xFFFF_FFFF).to_bytes(4, "big")
        ivs.add(packet[8:16])
    assert len(ivs) == 4


@pytest.mark.parametrize("transform", ["aes-cbc-hmac-sha256", "3des-cbc-hmac-sha1"])
def test_cbc_ivs_differ(transform: str) -> None:
    """RFC 3602 §2.3: CBC needs unpredictable IVs; at least they never repeat."""
    out, inb = make_pair(transform)
    iv_size = out.transform.iv_size
    packets = [out.seal(b"same payload", 59) for _ in range(50)]
    assert len({p[8 : 8 + iv_size] for p in packets}) == 50
    assert len({p[8 + iv_size :] for p in packets}) == 50
    assert all(inb.open(p, 0.0) is Drop.DUMMY for p in packets)


@pytest.mark.parametrize("transform", ["aes-cbc-hmac-sha256", "3des-cbc-hmac-sha1"])
def test_partial_cipher_block_is_malformed_before_replay(transform: str) -> None:
    out, inb = make_pair(transform)
    packet = out.seal(ipv4_packet(), 4)
    assert isinstance(inb.open(packet, 0.0), Opened)
    # the same (replayed) packet one byte short: a length error comes first
    assert inb.open(packet[:-1], 0.0) is Drop.MALFORMED
    assert inb.transform.open(packet[:-1], 1) == b""
    assert inb.open(packet, 0.0) is Drop.REPLAY
