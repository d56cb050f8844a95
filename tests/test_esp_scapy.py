"""Interop with scapy's SecurityAssociation, an independent ESP implementation.

For every transform, ESN on and off, in tunnel mode: packets we seal must
decrypt under scapy, and packets scapy builds must be accepted by us. With
ESN the sequence numbers sit above 2^32 so the high half really matters.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet, Raw, raw

from datapath.esp import Drop, InboundSA, Opened, OutboundSA
from tests.esp_helpers import SPI, TRANSFORMS, make_config

SCAPY_ALGOS = {
    "aes-gcm-128": ("AES-GCM", None),
    "aes-gcm-256": ("AES-GCM", None),
    "chacha20-poly1305": ("CHACHA20-POLY1305", None),
    "aes-cbc-hmac-sha256": ("AES-CBC", "SHA2-256-128"),
    "3des-cbc-hmac-sha1": ("3DES", "HMAC-SHA1-96"),
}
OUTER_SRC, OUTER_DST = "192.0.2.1", "198.51.100.1"
ESN_HIGH = 5


def scapy_sa(transform: str, esn: bool, nat_t: bool = False) -> SecurityAssociation:
    cfg = make_config(transform, esn)
    crypt_algo, auth_algo = SCAPY_ALGOS[transform]
    auth = {"auth_algo": auth_algo, "auth_key": cfg.auth_key} if auth_algo else {}
    return SecurityAssociation(
        ESP,
        spi=SPI,
        crypt_algo=crypt_algo,
        crypt_key=cfg.key,
        tunnel_header=IP(src=OUTER_SRC, dst=OUTER_DST),
        nat_t_header=UDP(sport=4500, dport=4500) if nat_t else None,
        esn_en=esn,
        esn=ESN_HIGH if esn else 0,
        **auth,
    )


def inner_packets() -> list[Packet]:
    return [
        IP(src="10.1.0.2", dst="10.2.0.2") / ICMP(id=7, seq=1) / Raw(b"x" * 56),
        IP(src="10.1.0.2", dst="10.2.0.2") / UDP(sport=1, dport=2) / Raw(b""),
        IPv6(src="fd00:1::2", dst="fd00:2::2")
        / UDP(sport=3, dport=4)
        / Raw(b"y" * 999),
    ]


def next_header_of(inner: Packet) -> int:
    return 4 if isinstance(inner, IP) else 41


def start_seq(esn: bool) -> int:
    """A sequence number before which both ends agree nothing was sent."""
    return (ESN_HIGH << 32) + 100 if esn else 100


@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_scapy_decrypts_what_we_seal(transform: str, esn: bool) -> None:
    out = OutboundSA(make_config(transform, esn))
    out.seq = start_seq(esn)
    peer = scapy_sa(transform, esn)
    for inner in inner_packets():
        esp_bytes = out.seal(raw(inner), next_header_of(inner))
        wire = IP(raw(IP(src=OUTER_SRC, dst=OUTER_DST, proto=50) / Raw(esp_bytes)))
        assert wire[ESP].seq == out.seq & 0xFFFF_FFFF
        decrypted = peer.decrypt(wire)
        assert raw(decrypted) == raw(inner)


@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_we_accept_what_scapy_seals(transform: str, esn: bool) -> None:
    inb = InboundSA(make_config(transform, esn))
    inb.replay.reset(start_seq(esn))
    peer = scapy_sa(transform, esn, nat_t=True)
    peer.seq_num = (start_seq(esn) + 1) & 0xFFFF_FFFF
    for inner in inner_packets():
        wire = IP(raw(peer.encrypt(inner)))
        assert wire[UDP].dport == 4500
        esp_bytes = raw(wire[UDP].payload)
        result = inb.open(esp_bytes, now=0.0)
        assert isinstance(result, Opened), result
        assert result.payload == raw(inner)
        assert result.next_header == next_header_of(inner)
        assert result.seq == (ESN_HIGH << 32 if esn else 0) + wire[ESP].seq
        # the same packet again is a replay; altered, an ICV failure
        assert inb.open(esp_bytes, now=0.0) is Drop.REPLAY
        altered = bytearray(esp_bytes)
        altered[-1] ^= 0x80
        altered[4:8] = (wire[ESP].seq + 50).to_bytes(4, "big")
        assert inb.open(bytes(altered), now=0.0) is Drop.ICV
    assert inb.counters["ok"] == len(inner_packets())


@pytest.mark.parametrize("transform", ["aes-gcm-128", "aes-cbc-hmac-sha256"])
def test_esn_high_half_really_used(transform: str) -> None:
    """A scapy packet sealed with another ESN high half must fail our ICV."""
    inb = InboundSA(make_config(transform, esn=True))
    inb.replay.reset(start_seq(True))
    peer = scapy_sa(transform, esn=True)
    peer.esn = ESN_HIGH + 1
    peer.seq_num = (start_seq(True) + 1) & 0xFFFF_FFFF
    inner = inner_packets()[0]
    esp_bytes = raw(IP(raw(peer.encrypt(inner)))[ESP])
    assert inb.open(esp_bytes, now=0.0) is Drop.ICV


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_esn_wrap_both_ways(transform: str) -> None:
    """Across 2^32 the high half steps from 0 to 1 on both sides."""
    inner = inner_packets()[0]
    before, after = scapy_sa(transform, esn=True), scapy_sa(transform, esn=True)
    before.esn, after.esn = 0, 1

    # we send: the two last numbers below 2^32, then the first two above
    out = OutboundSA(make_config(transform, esn=True))
    out.seq = (1 << 32) - 3
    for _ in range(4):
        esp_bytes = out.seal(raw(inner), 4)
        peer = before if out.seq < 1 << 32 else after
        wire = IP(raw(IP(src=OUTER_SRC, dst=OUTER_DST, proto=50) / Raw(esp_bytes)))
        assert raw(peer.decrypt(wire)) == raw(inner)

    # scapy sends the same, low halves 0xfffffffe, 0xffffffff, 0, 1
    inb = InboundSA(make_config(transform, esn=True))
    inb.replay.reset((1 << 32) - 3)
    for seq in range((1 << 32) - 2, (1 << 32) + 2):
        peer = before if seq < 1 << 32 else after
        peer.seq_num = seq & 0xFFFF_FFFF
        esp_bytes = raw(IP(raw(peer.encrypt(inner)))[ESP])
        result = inb.open(esp_bytes, now=0.0)
        assert isinstance(result, Opened) and result.seq == seq, result
