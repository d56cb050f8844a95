"""The Datapath core without I/O: routing, SPI table, rekey, roaming, keepalive."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import IPv6

from datapath.esp import InboundSA, OutboundSA, SAConfig
from datapath.selector import Selectors
from datapath.tunnel import (
    Datapath,
    MtuContext,
    Peer,
    RouteTable,
    esp_space,
    register_mtu_policy,
)
from datapath.udpencap import NAT_KEEPALIVE

net = ipaddress.ip_network
A_NET, B_NET = net("10.1.0.0/24"), net("10.2.0.0/24")
A_ADDR, B_ADDR = ("192.0.2.1", 4500), ("192.0.2.2", 4500)


def sa_pair(spi: int, transform: str = "aes-gcm-128") -> tuple[SAConfig, SAConfig]:
    cfg = SAConfig(spi, transform, os.urandom(20))
    return cfg, cfg


def make_peer(
    name: str,
    out_cfg: SAConfig,
    in_cfg: SAConfig,
    endpoint: tuple[str, int],
    local: Iterable[Any],
    remote: Iterable[Any],
    **kw: Any,
) -> Peer:
    local, remote = list(local), list(remote)
    return Peer(
        name,
        OutboundSA(out_cfg),
        InboundSA(in_cfg, Selectors(local, remote)),
        endpoint,
        local_subnets=local,
        remote_subnets=remote,
        **kw,
    )


class Link:
    """Datapath A (10.1.0.0/24) and B (10.2.0.0/24) with one SA pair each way."""

    def __init__(self) -> None:
        self.ab = SAConfig(0x1001, "aes-gcm-128", os.urandom(20))
        self.ba = SAConfig(0x2001, "aes-gcm-128", os.urandom(20))
        self.a = Datapath(rekey_grace=5)
        self.b = Datapath(rekey_grace=5)
        self.a.add_peer(make_peer("b", self.ab, self.ba, B_ADDR, [A_NET], [B_NET]))
        self.b.add_peer(make_peer("a", self.ba, self.ab, A_ADDR, [B_NET], [A_NET]))

    def send(
        self, src: Datapath, dst: Datapath, packet: bytes, now: float = 1.0
    ) -> list[bytes]:
        src.outbound(packet, now)
        out = []
        for peer in src.dirty:
            out.extend(peer.tx_queue)
            src.sent(peer, now)
        src.dirty.clear()
        addr = A_ADDR if src is self.a else B_ADDR
        for esp in out:
            dst.inbound(esp, addr, now)
        got = list(dst.tun_queue)
        dst.tun_queue.clear()
        return got


def ping(src: str, dst: str, payload: bytes = b"x" * 32) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP() / payload)


def test_packets_cross_both_ways() -> None:
    link = Link()
    p = ping("10.1.0.5", "10.2.0.9")
    assert link.send(link.a, link.b, p) == [p]
    q = ping("10.2.0.9", "10.1.0.5")
    assert link.send(link.b, link.a, q) == [q]
    assert link.a.peers["b"].tx_packets == 1 and link.a.peers["b"].rx_packets == 1


def test_no_route_and_malformed_are_counted() -> None:
    link = Link()
    assert link.send(link.a, link.b, ping("10.1.0.5", "10.3.0.1")) == []
    assert link.a.counters["tx_no_route"] == 1
    link.a.outbound(b"\x45\x00", 1.0)
    link.a.outbound(b"\x00" * 40, 1.0)
    assert link.a.counters["tx_malformed"] == 2


def test_selector_violation_is_dropped() -> None:
    link = Link()
    # a (10.1/24) sends a packet whose source b does not accept from a
    spoofed = ping("10.7.0.1", "10.2.0.9")
    assert link.send(link.a, link.b, spoofed) == []
    assert link.b.peers["a"].counters["rx_selector"] == 1


def test_unknown_spi_and_runts_are_counted() -> None:
    link = Link()
    link.b.inbound(b"\x00\x00\x99\x99" + b"\x00" * 40, A_ADDR, 1.0)
    link.b.inbound(b"\x01\x02", A_ADDR, 1.0)
    assert link.b.counters["rx_unknown_spi"] == 1
    assert link.b.counters["rx_runt"] == 1


def test_route_table_longest_prefix_match() -> None:
    table = RouteTable()
    peers = {}
    for name, prefix in [
        ("default", "0.0.0.0/0"),
        ("ten", "10.0.0.0/8"),
        ("ten-two", "10.2.0.0/16"),
        ("host", "10.2.3.4/32"),
        ("v6", "fd00::/8"),
        ("v6-long", "fd00:1::/32"),
    ]:
        peers[name] = object.__new__(Peer)
        peers[name].name = name
        table.add(net(prefix), peers[name])

    def lookup(addr: str) -> str:
        peer = table.lookup(ipaddress.ip_address(addr).packed)
        return peer.name if peer else "-"

    assert lookup("10.2.3.4") == "host"
    assert lookup("10.2.3.5") == "ten-two"
    assert lookup("10.9.0.1") == "ten"
    assert lookup("192.0.2.1") == "default"
    assert lookup("fd00:1::5") == "v6-long"
    assert lookup("fd00:2::5") == "v6"
    assert lookup("2001:db8::1") == "-"
    table.remove_peer(peers["ten-two"])
    assert lookup("10.2.3.5") == "ten"  # the cache was cleared
    assert ("10.0.0.0/8", "ten") in table.routes()


def test_ipv6_inner_packets() -> None:
    ab = SAConfig(0x1001, "chacha20-poly1305", os.urandom(36))
    ba = SAConfig(0x2001, "chacha20-poly1305", os.urandom(36))
    a_net, b_net = net("fd00:a::/64"), net("fd00:b::/64")
    a, b = Datapath(), Datapath()
    a.add_peer(make_peer("b", ab, ba, B_ADDR, [a_net], [b_net]))
    b.add_peer(make_peer("a", ba, ab, A_ADDR, [b_net], [a_net]))
    p = bytes(IPv6(src="fd00:a::1", dst="fd00:b::2") / b"hello")
    a.outbound(p, 1.0)
    (esp,) = a.peers["b"].tx_queue
    b.inbound(esp, A_ADDR, 1.0)
    assert b.tun_queue == [p]


def test_roaming_only_on_authenticated_newer_packets() -> None:
    link = Link()
    new_addr = ("198.51.100.9", 31000)
    esps = []
    for i in range(3):
        link.a.outbound(ping("10.1.0.5", "10.2.0.9", bytes([i]) * 8), 1.0)
    esps = list(link.a.peers["b"].tx_queue)
    peer_a = link.b.peers["a"]

    # a forged packet (bad ICV) from a new address moves nothing
    forged = bytearray(esps[2])
    forged[-1] ^= 1
    link.b.inbound(bytes(forged), new_addr, 1.0)
    assert peer_a.endpoint == A_ADDR

    # packet 3 from the new address is authenticated and newest: move
    link.b.inbound(esps[2], new_addr, 1.0)
    assert peer_a.endpoint == new_addr
    # packet 2 from the old address is authentic but older: stay
    link.b.inbound(esps[1], A_ADDR, 1.0)
    assert peer_a.endpoint == new_addr
    # a replay of packet 3 from yet another address is dropped: stay
    link.b.inbound(esps[2], ("203.0.113.1", 4500), 1.0)
    assert peer_a.endpoint == new_addr
    assert peer_a.counters["roamed"] == 1
    assert peer_a.counters["rx_replay"] == 1


def test_roam_hook_called() -> None:
    calls = []
    link = Link()
    link.b.on_roam = lambda peer, old, new: calls.append((peer.name, old, new))
    link.a.outbound(ping("10.1.0.5", "10.2.0.9"), 1.0)
    link.b.inbound(link.a.peers["b"].tx_queue[0], ("192.0.2.77", 4501), 1.0)
    assert calls == [("a", A_ADDR, ("192.0.2.77", 4501))]


def test_rekey_make_before_break() -> None:
    link = Link()
    p = ping("10.1.0.5", "10.2.0.9")
    q = ping("10.2.0.9", "10.1.0.5")
    ab2 = SAConfig(0x1002, "aes-gcm-128", os.urandom(20))
    ba2 = SAConfig(0x2002, "aes-gcm-128", os.urandom(20))
    sel_a = Selectors([A_NET], [B_NET])
    sel_b = Selectors([B_NET], [A_NET])

    # a reloads first: it still sends on the old SA, accepts both
    link.a.rekey("b", OutboundSA(ab2), InboundSA(ba2, sel_a), now=10.0)
    assert link.send(link.a, link.b, p, 10.1) == [p]
    assert link.a.peers["b"].out_sa.cfg.spi == 0x1001
    assert link.send(link.b, link.a, q, 10.2) == [q]

    # b reloads; its first packet on the new SA tells a to switch
    link.b.rekey("a", OutboundSA(ba2), InboundSA(ab2, sel_b), now=11.0)
    assert link.b.peers["a"].out_sa.cfg.spi == 0x2001  # pending
    # b's pending switch times out after the grace (5 s)
    link.b.poll(16.5)
    assert link.b.peers["a"].out_sa.cfg.spi == 0x2002
    assert link.send(link.b, link.a, q, 16.6) == [q]
    assert link.a.peers["b"].out_sa.cfg.spi == 0x1002  # switched on first use
    assert link.send(link.a, link.b, p, 16.7) == [p]

    # old inbound SAs are retired after another grace period
    assert {0x2001, 0x2002} <= set(link.a.spis)
    link.a.poll(16.6 + 5.1)
    assert 0x2001 not in link.a.spis and 0x2002 in link.a.spis
    assert link.send(link.b, link.a, q, 22.0) == [q]


def test_rekey_rejects_spi_of_another_peer() -> None:
    link = Link()
    link.a.add_peer(
        make_peer(
            "c",
            SAConfig(0x3001, "aes-gcm-128", os.urandom(20)),
            SAConfig(0x3002, "aes-gcm-128", os.urandom(20)),
            ("192.0.2.3", 4500),
            [A_NET],
            [net("10.3.0.0/24")],
        )
    )
    with pytest.raises(ValueError, match="in use by c"):
        link.a.rekey(
            "b", None, InboundSA(SAConfig(0x3002, "aes-gcm-128", b"k" * 20)), 1
        )


def test_peers_added_removed_replaced() -> None:
    link = Link()
    dp = link.a
    peer_b = dp.peers["b"]
    dp.remove_peer("b")
    assert dp.routes.lookup(ipaddress.ip_address("10.2.0.1").packed) is None
    assert 0x2001 not in dp.spis
    dp.add_peer(peer_b)
    with pytest.raises(ValueError, match="exists"):
        dp.add_peer(peer_b)
    replacement = make_peer(
        "b",
        SAConfig(0x1005, "aes-gcm-128", os.urandom(20)),
        SAConfig(0x2005, "aes-gcm-128", os.urandom(20)),
        B_ADDR,
        [A_NET],
        [B_NET],
    )
    dp.replace_peer(replacement)
    assert dp.peers["b"] is replacement
    assert set(dp.spis) == {0x2005}


def test_many_peers_share_one_datapath() -> None:
    dp = Datapath()
    for i in range(500):
        dp.add_peer(
            make_peer(
                f"moat{i}",
                SAConfig(0x10000 + i, "aes-gcm-128", os.urandom(20)),
                SAConfig(0x20000 + i, "aes-gcm-128", os.urandom(20)),
                (f"198.18.{i // 256}.{i % 256}", 4500),
                [net("10.0.0.0/8")],
                [net(f"172.16.{i // 256}.{i % 256}/32")],
            )
        )
    dp.outbound(ping("10.0.0.1", "172.16.1.44"), 1.0)
    assert [p.name for p in dp.dirty] == ["moat300"]


def test_keepalive_when_idle_only_for_udp() -> None:
    link = Link()
    peer = link.a.peers["b"]
    link.a.poll(5.0)
    assert peer.tx_queue == []
    link.a.poll(20.0)
    assert peer.tx_queue == [NAT_KEEPALIVE] and link.a.dirty == [peer]
    link.a.sent(peer, 20.0)
    link.a.dirty.clear()
    link.a.poll(30.0)
    assert peer.tx_queue == []
    peer.encapsulation = "esp"
    link.a.poll(100.0)
    assert peer.tx_queue == []


def test_status_is_json() -> None:
    link = Link()
    link.send(link.a, link.b, ping("10.1.0.5", "10.2.0.9"))
    status = json.loads(json.dumps(link.b.status()))
    peer = status["peers"]["a"]
    assert peer["in_sas"][0]["spi"] == 0x1001
    assert peer["in_sas"][0]["counters"]["ok"] == 1
    assert peer["rx_packets"] == 1
    assert ["10.1.0.0/24", "a"] in status["routes"]


def test_inner_mtu_matches_the_overhead_table() -> None:
    # datapath.md §2.5, outer MTU 1500
    cases = [
        ("aes-gcm-128", "udp", 4, 1438),
        ("aes-gcm-128", "esp", 4, 1446),
        ("aes-gcm-128", "udp", 6, 1418),
        ("aes-cbc-hmac-sha256", "udp", 4, 1422),
        ("aes-cbc-hmac-sha256", "esp", 4, 1438),
        ("3des-cbc-hmac-sha1", "udp", 4, 1438),
    ]
    for transform, encap, version, want in cases:
        key_len, auth = {
            "aes-gcm-128": (20, 0),
            "aes-cbc-hmac-sha256": (16, 32),
            "3des-cbc-hmac-sha1": (24, 20),
        }[transform]
        sa = OutboundSA(
            SAConfig(0x1001, transform, os.urandom(key_len), os.urandom(auth))
        )
        assert sa.max_payload(esp_space(1500, version, encap)) == want, (
            transform,
            encap,
        )


class Recorder:
    """A stand-in MTU policy that records what the hook hands it."""

    def __init__(self, ctx: MtuContext) -> None:
        self.ctx = ctx
        self.seen: list[tuple[str, int]] = []

    def outbound(
        self, packet: bytes, next_header: int, now: float
    ) -> list[tuple[bytes, int]]:
        self.seen.append(("out", next_header))
        return [(packet, next_header)]

    def inbound(
        self, next_header: int, payload: bytes, seq: int, now: float, spi: int
    ) -> list[bytes]:
        self.seen.append(("in", seq))
        return [payload]

    def poll(self, now: float) -> list[tuple[bytes, int]]:
        return []

    def status(self) -> dict[str, Any]:
        return {"seen": len(self.seen)}


def test_mtu_policy_hook_sits_on_both_paths() -> None:
    register_mtu_policy("test-recorder", Recorder)
    link = Link()
    for dp in (link.a, link.b):
        peer = next(iter(dp.peers.values()))
        peer.mtu_policy_name = "test-recorder"
        dp.replace_peer(peer)
    p = ping("10.1.0.5", "10.2.0.9")
    assert link.send(link.a, link.b, p) == [p]
    policy_a = link.a.peers["b"].mtu_policy
    policy_b = link.b.peers["a"].mtu_policy
    assert isinstance(policy_a, Recorder) and isinstance(policy_b, Recorder)
    assert policy_a.seen == [("out", 4)] and policy_b.seen == [("in", 1)]
    assert policy_a.ctx.inner_mtu == 1438
    assert link.b.status()["peers"]["a"]["policy"] == {"seen": 1}


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_fuzz_receive_path_only_counts(data: bytes, spi_choice: int) -> None:
    link = FUZZ_LINK
    if spi_choice and len(data) >= 4:
        spi = (0x1001, 0x2001, 0x9999)[spi_choice - 1]
        data = spi.to_bytes(4, "big") + data[4:]
    link.b.inbound(data, A_ADDR, 1.0)
    assert link.b.tun_queue == []


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(0, 7), st.booleans())
def test_fuzz_mutated_packets_never_pass(pos: int, bit: int, truncate: bool) -> None:
    link = FUZZ_LINK
    link.a.outbound(ping("10.1.0.5", "10.2.0.9"), 1.0)
    esp = bytearray(link.a.peers["b"].tx_queue.pop())
    link.a.dirty.clear()
    if truncate:
        esp = esp[: pos % len(esp)]
    else:
        esp[pos % len(esp)] ^= 1 << bit
    link.b.inbound(bytes(esp), A_ADDR, 1.0)
    assert link.b.tun_queue == []


FUZZ_LINK = Link()


def test_peer_violations_warn_at_most_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = Link()
    link.a.outbound(ping("10.1.0.5", "10.2.0.9"), 1.0)
    (esp,) = link.a.peers["b"].tx_queue
    bad = bytearray(esp)
    bad[-1] ^= 1
    with caplog.at_level(logging.WARNING, logger="datapath.tunnel"):
        for _ in range(5):
            link.b.inbound(bytes(bad), A_ADDR, 1.0)
        link.b.poll(2.0)
        link.b.inbound(bytes(bad), A_ADDR, 3.0)
        link.b.poll(3.0)  # within the interval: no second warning
        link.b.poll(13.0)  # after it: the one new drop is reported
        link.b.poll(24.0)  # nothing new: silent
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["peer a: dropped 5 rx_icv", "peer a: dropped 1 rx_icv"]
