"""MTU policies inside the Datapath (sans-IO): two datapaths joined by a
simulated path that silently drops outer packets above its MTU (no ICMP), and
AGGFRAG ESP packets decrypted by scapy."""

from __future__ import annotations

import ipaddress
import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw

from datapath import aggfrag
from datapath.esp import InboundSA, OutboundSA, SAConfig
from datapath.selector import Selectors
from datapath.tunnel import Datapath, Peer

A_NET = ipaddress.ip_network("10.1.0.0/24")
B_NET = ipaddress.ip_network("10.2.0.0/24")
A_ADDR, B_ADDR = ("192.0.2.1", 4500), ("192.0.2.2", 4500)
OUTER_OVERHEAD = 28  # IPv4 + UDP


class PolicyLink:
    """Datapaths A and B with `policy`, over a path of `path_mtu` bytes."""

    def __init__(self, policy: str, path_mtu: int, outer_mtu: int = 1500) -> None:
        self.path_mtu = path_mtu
        self.ab = SAConfig(0x1001, "aes-gcm-128", os.urandom(20))
        self.ba = SAConfig(0x2001, "aes-gcm-128", os.urandom(20))
        self.a, self.b = Datapath(), Datapath()
        for dp, name, out_cfg, in_cfg, addr, local, remote in (
            (self.a, "b", self.ab, self.ba, B_ADDR, A_NET, B_NET),
            (self.b, "a", self.ba, self.ab, A_ADDR, B_NET, A_NET),
        ):
            dp.add_peer(
                Peer(
                    name,
                    OutboundSA(out_cfg),
                    InboundSA(in_cfg, Selectors([local], [remote])),
                    addr,
                    local_subnets=[local],
                    remote_subnets=[remote],
                    mtu_policy=policy,
                    outer_mtu=outer_mtu,
                )
            )
        self.now = 0.0
        self.wire: list[bytes] = []  # every ESP packet A sent, for scapy

    def pump(self, seconds: float = 0.0) -> None:
        """Move queued packets both ways until quiet; advance the clock."""
        end = self.now + seconds
        while True:
            moved = False
            for src, dst, addr in ((self.a, self.b, A_ADDR), (self.b, self.a, B_ADDR)):
                src.tun_drained(self.now)
                for peer in list(src.dirty):
                    for esp in peer.tx_queue:
                        if src is self.a:
                            self.wire.append(esp)
                        if len(esp) + OUTER_OVERHEAD <= self.path_mtu:
                            dst.inbound(esp, addr, self.now)
                        moved = True
                    src.sent(peer, self.now)
                src.dirty.clear()
            if moved:
                continue
            if self.now >= end:
                return
            self.now = min(end, self.now + 0.05)
            self.a.poll(self.now)
            self.b.poll(self.now)

    def send(self, packet: bytes) -> list[bytes]:
        self.a.outbound(packet, self.now)
        self.pump()
        got = list(self.b.tun_queue)
        self.b.tun_queue.clear()
        return got

    def envelope(self, dp: Datapath) -> int:
        status = dp.status()["peers"]
        (peer,) = status.values()
        return int(peer["policy"]["envelope"])


def udp_df(size: int) -> bytes:
    pkt = IP(src="10.1.0.5", dst="10.2.0.9", flags="DF") / UDP(sport=1, dport=2)
    return bytes(pkt / Raw(os.urandom(size - 28)))


@pytest.mark.parametrize("size", [1500, 9000, 65535])
def test_virtual_large_carries_any_size_over_576(size: int) -> None:
    link = PolicyLink("virtual-large", path_mtu=576)
    packet = udp_df(size)
    assert link.send(packet) == [packet]


def test_probing_learns_interior_mtu_without_icmp() -> None:
    link = PolicyLink("virtual-large", path_mtu=1280)
    link.pump(30.0)
    for dp in (link.a, link.b):
        # the envelope is the probed size; the ESP packet built for it is
        # up to 3 bytes shorter (4-byte alignment)
        assert 1280 - 8 <= link.envelope(dp) <= 1280 + 3
    # data now uses the learned envelope: the largest fits, none is lost
    link.wire.clear()
    packet = udp_df(5000)
    assert link.send(packet) == [packet]
    largest = max(len(e) for e in link.wire) + OUTER_OVERHEAD
    assert 1280 - 8 - 3 <= largest <= 1280


def test_small_packets_go_at_once_no_timer() -> None:
    link = PolicyLink("virtual-large", path_mtu=1500)
    ping = bytes(IP(src="10.1.0.5", dst="10.2.0.9") / ICMP() / b"hi")
    # no clock advance at all: the payload leaves when the TUN queue is empty
    assert link.send(ping) == [ping]


def test_selectors_checked_per_reassembled_packet() -> None:
    link = PolicyLink("virtual-large", path_mtu=1500)
    spoofed = bytes(IP(src="10.7.0.5", dst="10.2.0.9") / UDP() / Raw(b"x" * 3000))
    link.a.outbound(bytes(IP(src="10.1.0.5", dst="10.2.0.9") / UDP()), 0.0)
    # A's peer table routes by destination only: push the spoofed one directly
    peer = link.a.peers["b"]
    assert peer.mtu_policy is not None
    for payload, nh in peer.mtu_policy.outbound(spoofed, 4, 0.0):
        link.a._seal(peer, payload, nh)
    link.pump()
    got = link.b.tun_queue
    assert all(IP(p).src == "10.1.0.5" for p in got) and len(got) == 1


def test_classic_answers_icmp_with_inner_mtu() -> None:
    link = PolicyLink("classic", path_mtu=1500)
    link.pump(5.0)
    packet = udp_df(1500)
    assert link.send(packet) == []
    (reply,) = [IP(p) for p in link.a.tun_queue]
    assert reply[ICMP].type == 3 and reply[ICMP].code == 4
    assert reply[ICMP].nexthopmtu == link.a.peers["b"].inner_mtu == 1438
    assert reply.dst == "10.1.0.5"


def test_clamp_mss_rewrites_syn_and_synack() -> None:
    link = PolicyLink("clamp-mss", path_mtu=1500)
    link.pump(5.0)
    syn = IP(src="10.1.0.5", dst="10.2.0.9") / TCP(flags="S", options=[("MSS", 8960)])
    (got,) = link.send(bytes(syn))
    assert dict(IP(got)[TCP].options)["MSS"] == 1438 - 40
    synack = IP(src="10.2.0.9", dst="10.1.0.5") / TCP(
        flags="SA", options=[("MSS", 65495)]
    )
    link.b.outbound(bytes(synack), link.now)
    link.pump()
    (back,) = link.a.tun_queue
    assert dict(IP(back)[TCP].options)["MSS"] == 1438 - 40


def test_aggfrag_esp_decrypts_under_scapy() -> None:
    # scapy has no AGGFRAG layer, but a transport-mode SA over protocol 144
    # gives the same wire format: ESP(next header 144) after the outer header
    link = PolicyLink("virtual-large", path_mtu=1500)
    inner = [udp_df(3000), udp_df(100), udp_df(40)]
    for packet in inner:
        link.a.outbound(packet, link.now)
    link.pump()
    key = link.ab.key
    sa = SecurityAssociation(
        ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=key, esn_en=True
    )
    payloads = []
    for esp in link.wire:
        outer = IP(src="192.0.2.1", dst="192.0.2.2", proto=50) / ESP(esp)
        plain = sa.decrypt(IP(bytes(outer)))
        assert plain[IP].proto == aggfrag.NEXT_HEADER_AGGFRAG
        payloads.append((outer[ESP].seq, bytes(plain[IP].payload)))
    # the decrypted stream parses into the same inner packets
    r = aggfrag.Reassembler()
    got = [p for seq, payload in payloads for p in r.feed(seq, payload, 0.0)]
    assert got == inner


def test_rekey_mid_stream_keeps_pieces_on_one_sa() -> None:
    # a payload half filled on the old SA is flushed there before the switch;
    # the receiver reassembles per inbound SA (sequence numbers restart at 1)
    link = PolicyLink("virtual-large", path_mtu=1500)
    link.pump(2.0)
    before = [udp_df(700), udp_df(5000)]
    for packet in before:
        link.a.outbound(packet, link.now)  # the TUN queue is not empty yet
    new = SAConfig(0x3001, "aes-gcm-128", os.urandom(20))
    link.b.rekey("a", None, InboundSA(new, Selectors([B_NET], [A_NET])), link.now)
    link.a.rekey("b", OutboundSA(new), None, link.now, switch_now=True)
    after = udp_df(3000)
    link.a.outbound(after, link.now)
    link.pump()
    assert link.b.tun_queue == [*before, after]
    policy = link.b.status()["peers"]["a"]["policy"]
    assert set(policy["reassembly"]) == {"0x1001", "0x3001"}
