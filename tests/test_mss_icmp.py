"""TCP MSS clamping and too-big ICMP replies, checked by scapy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Packet, Raw

from datapath import mss
from datapath.icmp import NoReply, TokenBucket, TooBig


def tcp_checksum_ok(raw: bytes) -> bool:
    """scapy recomputes the TCP checksum and gets the one in the packet."""
    cls = IP if raw[0] >> 4 == 4 else IPv6
    pkt = cls(raw)
    got = pkt[TCP].chksum
    del pkt[TCP].chksum
    return bool(cls(bytes(pkt))[TCP].chksum == got)


def mss_of(raw: bytes) -> int | None:
    pkt = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    return dict(pkt[TCP].options).get("MSS")


def syn(
    v6: bool = False, flags: str = "S", options: list | None = None, ext: bool = False
) -> bytes:
    opts = options if options is not None else [("MSS", 8960), ("SAckOK", b"")]
    tcp = TCP(sport=40000, dport=80, flags=flags, options=opts)
    if v6:
        ip: Packet = IPv6(src="fd00::1", dst="fd00::2")
        if ext:
            ip = ip / IPv6ExtHdrHopByHop()
        return bytes(ip / tcp)
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2") / tcp)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("flags", ["S", "SA"])
@pytest.mark.parametrize(
    "options",
    [
        [("MSS", 8960)],
        [("NOP", None), ("MSS", 8960)],  # MSS value at an odd offset
        [("SAckOK", b""), ("Timestamp", (1, 2)), ("NOP", None), ("MSS", 65495)],
        [("NOP", None), ("NOP", None), ("NOP", None), ("MSS", 1460), ("WScale", 7)],
    ],
)
def test_clamp_syn_both_ways(v6: bool, flags: str, options: list) -> None:
    raw = syn(v6, flags, options)
    out = mss.clamp(raw, 1360)
    assert mss_of(out) == 1360
    assert tcp_checksum_ok(out)
    assert len(out) == len(raw)


def test_clamp_ipv6_with_extension_header() -> None:
    out = mss.clamp(syn(True, ext=True), 1200)
    assert mss_of(out) == 1200 and tcp_checksum_ok(out)


@pytest.mark.parametrize(
    "raw",
    [
        syn(options=[("MSS", 1000)]),  # already small: never raised
        syn(flags="A"),  # not a SYN
        syn(options=[("SAckOK", b"")]),  # no MSS option
        bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / Raw(b"x" * 40)),
        bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=10, proto=6) / Raw(b"x" * 40)),
        bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment() / TCP()),
        syn()[:30],  # truncated
        b"",
        b"\x45",
    ],
)
def test_clamp_leaves_other_packets_alone(raw: bytes) -> None:
    assert mss.clamp(raw, 1200) == raw


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 3), st.booleans())
def test_clamp_property(value: int, target: int, nops: int, v6: bool) -> None:
    raw = syn(v6, options=[("NOP", None)] * nops + [("MSS", value)])
    out = mss.clamp(raw, target)
    assert mss_of(out) == min(value, target)
    assert tcp_checksum_ok(out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 2000))
def test_clamp_garbage_never_crashes(raw: bytes, target: int) -> None:
    out = mss.clamp(raw, target)
    assert len(out) == len(raw)


def test_mss_for_mtu() -> None:
    assert mss.mss_for_mtu(1400, ipv6=False) == 1360
    assert mss.mss_for_mtu(1400, ipv6=True) == 1340


# -- ICMP too big ------------------------------------------------------------


def big_v4(df: bool = True, **kw: object) -> bytes:
    fields: dict[str, object] = {"src": "192.168.1.10", "dst": "10.9.0.5"}
    fields.update(kw)
    ip = IP(flags="DF" if df else 0, **fields)
    return bytes(ip / UDP(sport=5000, dport=6000) / Raw(b"a" * 1472))


def big_v6(**kw: object) -> bytes:
    fields: dict[str, object] = {"src": "fd01::10", "dst": "fd09::5"}
    fields.update(kw)
    return bytes(IPv6(**fields) / UDP() / Raw(b"a" * 1452))


def test_frag_needed_ipv4() -> None:
    tb = TooBig(local_v4="192.168.1.1")
    packet = big_v4()
    raw = tb.reply(packet, 1400, now=0.0)
    assert raw is not None
    reply = IP(raw)
    assert reply.src == "192.168.1.1" and reply.dst == "192.168.1.10"
    assert reply[ICMP].type == 3 and reply[ICMP].code == 4
    assert reply[ICMP].nexthopmtu == 1400
    assert reply[IPerror].dst == "10.9.0.5"
    assert len(raw) <= 576
    # checksums as scapy computes them
    again = IP(raw)
    del again.chksum, again[ICMP].chksum
    rebuilt = IP(bytes(again))
    assert rebuilt.chksum == reply.chksum and rebuilt[ICMP].chksum == reply[ICMP].chksum


def test_packet_too_big_ipv6() -> None:
    tb = TooBig(local_v6="fd01::1")
    raw = tb.reply(big_v6(), 1400, now=0.0)
    assert raw is not None
    reply = IPv6(raw)
    assert reply.dst == "fd01::10"
    assert reply[ICMPv6PacketTooBig].mtu == 1400
    assert len(raw) <= 1280
    cksum = reply[ICMPv6PacketTooBig].cksum
    del reply[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(reply))[ICMPv6PacketTooBig].cksum == cksum
    # below 1280 an IPv6 MTU cannot be reported
    raw = TooBig(local_v6="fd01::1").reply(big_v6(), 600, now=0.0)
    assert raw is not None and IPv6(raw)[ICMPv6PacketTooBig].mtu == 1280


@pytest.mark.parametrize(
    "packet,reason",
    [
        (big_v4(df=False), NoReply.NO_DF),
        (big_v4(frag=100), NoReply.FRAGMENT),
        (
            bytes(
                IP(src="192.168.1.10", dst="10.9.0.5", flags="DF")
                / ICMP(type=3, code=1)
                / Raw(b"x" * 1500)
            ),
            NoReply.ICMP_ERROR,
        ),
        (big_v4(dst="224.0.0.9"), NoReply.MULTICAST),
        (big_v4(dst="255.255.255.255"), NoReply.MULTICAST),
        (big_v4(src="0.0.0.0"), NoReply.BAD_SOURCE),
        (big_v6(dst="ff02::1"), NoReply.MULTICAST),
        (
            bytes(
                IPv6(src="fd01::10", dst="fd09::5")
                / IPv6ExtHdrFragment(offset=10)
                / Raw(b"x" * 1500)
            ),
            NoReply.FRAGMENT,
        ),
        (
            bytes(
                IPv6(src="fd01::10", dst="fd09::5")
                / ICMPv6PacketTooBig()
                / Raw(b"x" * 1500)
            ),
            NoReply.ICMP_ERROR,
        ),
        (bytes(IP(flags="DF") / Raw(b"x" * 100)), NoReply.FITS),
        (b"\x45\x00", NoReply.MALFORMED),
    ],
)
def test_never_answered(packet: bytes, reason: NoReply) -> None:
    tb = TooBig(local_v4="192.168.1.1", local_v6="fd01::1")
    assert tb.reply(packet, 1400, now=0.0) is None
    assert tb.counters[reason] == 1


def test_icmpv6_echo_request_is_answered() -> None:
    packet = bytes(
        IPv6(src="fd01::10", dst="fd09::5") / ICMPv6EchoRequest(data=b"x" * 1500)
    )
    assert TooBig(local_v6="fd01::1").reply(packet, 1400, 0.0) is not None


def test_rate_limited() -> None:
    tb = TooBig(local_v4="192.168.1.1", rate=2.0, burst=3)
    sent = [tb.reply(big_v4(), 1400, now=0.0) is not None for _ in range(10)]
    assert sent.count(True) == 3
    assert tb.counters[NoReply.RATE_LIMITED] == 7
    assert tb.reply(big_v4(), 1400, now=0.5) is not None  # one token back
    assert tb.reply(big_v4(), 1400, now=0.5) is None


def test_token_bucket_never_exceeds_burst() -> None:
    bucket = TokenBucket(100.0, 2)
    assert bucket.allow(0.0) and bucket.allow(0.0) and not bucket.allow(0.0)
    assert bucket.allow(1000.0) and bucket.allow(1000.0) and not bucket.allow(1000.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3000))
def test_too_big_garbage_never_crashes(raw: bytes, mtu: int) -> None:
    tb = TooBig(local_v4="192.168.1.1", local_v6="fd01::1")
    reply = tb.reply(raw, mtu, 0.0)
    if reply is not None:
        assert reply[0] >> 4 in (4, 6)
