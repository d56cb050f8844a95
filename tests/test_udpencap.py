"""RFC 3948 classification of UDP/4500 payloads, checked against scapy's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.ipsec import ESP, NON_ESP
from scapy.layers.ipsec import NAT_KEEPALIVE as ScapyKeepalive

from datapath.udpencap import NAT_KEEPALIVE, NON_ESP_MARKER, Kind, classify


@pytest.mark.parametrize(
    ("datagram", "kind"),
    [
        (b"\xff", Kind.KEEPALIVE),
        (NON_ESP_MARKER + b"\x11" * 24, Kind.IKE),
        (NON_ESP_MARKER, Kind.IKE),
        (b"\0\0\0\1" + b"\0" * 20, Kind.ESP),
        (b"\x12\x34\x56\x78\0\0\0\1", Kind.ESP),
        (b"", Kind.RUNT),
        (b"\xfe", Kind.RUNT),
        (b"\xff\xff", Kind.RUNT),
        (b"\x12\x34\x56\x78\0\0\0", Kind.RUNT),
    ],
)
def test_classify(datagram: bytes, kind: Kind) -> None:
    assert classify(datagram) is kind


def test_constants() -> None:
    assert NAT_KEEPALIVE == b"\xff"
    assert bytes(4) == NON_ESP_MARKER


@settings(deadline=None)  # timing varies on a shared machine
@given(st.binary(min_size=8, max_size=64))
def test_agrees_with_scapy_dispatch(datagram: bytes) -> None:
    """scapy's ESP dispatch hook makes the same keepalive/IKE/ESP split."""
    layer = ESP(datagram)
    kind = classify(datagram)
    if isinstance(layer, NON_ESP):
        assert kind is Kind.IKE
    elif isinstance(layer, ScapyKeepalive):
        assert kind is Kind.KEEPALIVE
    else:
        assert kind is Kind.ESP


def test_scapy_keepalive() -> None:
    assert isinstance(ESP(NAT_KEEPALIVE), ScapyKeepalive)
    assert classify(NAT_KEEPALIVE) is Kind.KEEPALIVE
