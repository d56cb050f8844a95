"""The datapath: many peers, one SA database, one route table.

A Datapath carries inner IP packets between a TUN device and ESP peers. It
does no I/O itself: the event loop (datapath/loop.py) hands it packets read
from the TUN device and from the outer sockets, and drains what it queued:

    outbound(packet, now)        TUN -> route (longest prefix match on the inner
                                 destination) -> peer -> MTU policy -> seal
                                 -> peer.tx_queue; peers with queued packets
                                 are listed in `dirty`
    inbound(esp, src, now)       SPI -> inbound SA -> open (length, replay,
                                 ICV, trailer, selectors) -> MTU policy ->
                                 tun_queue; roaming hook
    poll(now)                    NAT keepalives, retiring old SAs, deferred SA
                                 switches, MTU policy timers, drop warnings

One Datapath serves one peer (`moat tunnel`) or thousands (the portal): no
per-peer thread or socket, only dictionaries keyed by SPI and by prefix.

Rekeying is make-before-break (`rekey`): the new inbound SA is installed at
once; the new outbound SA is used as soon as the peer is seen using our new
inbound SA (proof that it has the new keys) or after `rekey_grace` seconds;
old inbound SAs stay installed for another `rekey_grace` seconds so packets
in flight still arrive.

Roaming (RFC 3948 §3, RFC 4555 in spirit): the peer's endpoint changes only
on a packet that passed the ICV and replay checks and is newer than any
packet seen on that SA, never on unauthenticated input.
"""

from __future__ import annotations

import collections
import importlib
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from datapath.esp import (
    NEXT_HEADER_AGGFRAG,
    NEXT_HEADER_IPV4,
    NEXT_HEADER_IPV6,
    Drop,
    InboundSA,
    OutboundSA,
    SequenceExhausted,
)
from datapath.selector import Selectors
from datapath.udpencap import NAT_KEEPALIVE

log = logging.getLogger(__name__)

Address = tuple[str, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENCAPSULATIONS = ("udp", "esp")
IPV4_HEADER_SIZE = 20
IPV6_HEADER_SIZE = 40
UDP_HEADER_SIZE = 8
IPV4_DST = slice(16, 20)
IPV6_DST = slice(24, 40)
ESP_HEADER_SIZE = 8
ROUTE_CACHE_MAX = 65536
WARN_INTERVAL = 10.0  # seconds between peer-violation warnings per peer
_unpack_spi = struct.Struct(">I").unpack_from


# MTU policies ---------------------------------------------------------------


@dataclass
class MtuContext:
    """What an MTU policy is told about the peer it works for."""

    peer: str
    inner_mtu: int  # largest inner packet that fits one outer packet
    esp_space: int  # bytes available for one ESP packet on the outer path
    out_sa: OutboundSA  # max_payload(esp_space) gives the room for a payload
    selectors: Selectors | None  # inbound check of inner packets it reassembles
    to_tun: Callable[[bytes], None]  # sends a packet toward the inner side
    outer_mtu: int = 1500  # configured outer path MTU (the probing ceiling)


class MtuPolicy(Protocol):
    """Per-peer handling of inner packets against the path MTU.

    `outbound` gets each inner packet routed to the peer and returns the ESP
    payloads to seal, with their next header (4, 41 or 144): the packet
    unchanged, an AGGFRAG payload, or nothing while it packs. `inbound` gets
    every authenticated ESP payload (with next header 144: unchecked, it must
    check each inner packet against the selectors; `spi` names the inbound
    SA, whose sequence numbers AGGFRAG reassembly follows) and returns inner
    packets for the TUN device. `poll` runs about once a second, after each
    packet received from the peer and whenever the TUN queue is empty; it
    returns payloads due now (a partly filled AGGFRAG payload, probes).
    Optional: `on_emsgsize(size, now)` (an outer packet was too big for the
    local stack) and `switch_out(ctx)` (new outbound SA after a rekey; without
    it the policy is rebuilt).
    """

    def outbound(
        self, packet: bytes, next_header: int, now: float
    ) -> Iterable[tuple[bytes, int]]: ...

    def inbound(
        self, next_header: int, payload: bytes, seq: int, now: float, spi: int
    ) -> Iterable[bytes]: ...

    def poll(self, now: float) -> Iterable[tuple[bytes, int]]: ...

    def status(self) -> dict[str, Any]: ...


# name -> factory; "plain" needs no object (the TUN MTU keeps packets small)
MTU_POLICIES: dict[str, Callable[[MtuContext], MtuPolicy]] = {}
# name -> module that registers it when imported
MTU_POLICY_MODULES: dict[str, str] = {
    "virtual-large": "datapath.mtu",
    "aggfrag": "datapath.mtu",
    "classic": "datapath.mtu",
    "clamp-mss": "datapath.mtu",
}


def register_mtu_policy(name: str, factory: Callable[[MtuContext], MtuPolicy]) -> None:
    MTU_POLICIES[name] = factory


def mtu_policy_factory(name: str) -> Callable[[MtuContext], MtuPolicy] | None:
    """The factory for policy `name`; None for "plain"; KeyError if unknown."""
    if name == "plain":
        return None
    if name not in MTU_POLICIES and name in MTU_POLICY_MODULES:
        try:
            importlib.import_module(MTU_POLICY_MODULES[name])
        except ImportError:
            pass
    return MTU_POLICIES[name]


def esp_space(outer_mtu: int, ip_version: int, encapsulation: str) -> int:
    """Bytes one ESP packet may take in an outer packet of `outer_mtu`."""
    ip = IPV6_HEADER_SIZE if ip_version == 6 else IPV4_HEADER_SIZE
    udp = UDP_HEADER_SIZE if encapsulation == "udp" else 0
    return outer_mtu - ip - udp


def _delta(before: dict[str, int], after: collections.Counter[str]) -> str:
    changed = [k for k, v in after.items() if v != before.get(k, 0)]
    return ", ".join(changed) if changed else "queued"


# peers ----------------------------------------------------------------------


class _Inbound:
    """An installed inbound SA: its peer and what the roaming hook needs."""

    __slots__ = ("peer", "sa", "highest", "fresh", "retire_at")

    def __init__(self, peer: Peer, sa: InboundSA, fresh: bool = False) -> None:
        self.peer = peer
        self.sa = sa
        self.highest = 0  # newest sequence number that passed every check
        self.fresh = fresh  # new SA not yet used by the peer
        self.retire_at = 0.0  # 0 = current; else removed at this time


class Peer:
    """One remote ESP endpoint with its SA pair and its inner networks."""

    def __init__(
        self,
        name: str,
        out_sa: OutboundSA,
        in_sa: InboundSA,
        endpoint: Address,
        encapsulation: str = "udp",
        local_subnets: Iterable[IPNetwork] = (),
        remote_subnets: Iterable[IPNetwork] = (),
        keepalive: float = 20.0,
        mtu_policy: str = "plain",
        outer_mtu: int = 1500,
    ) -> None:
        if encapsulation not in ENCAPSULATIONS:
            raise ValueError(f"encapsulation {encapsulation!r}")
        self.name = name
        self.out_sa = out_sa
        self.in_sa = in_sa
        self.endpoint = endpoint
        self.encapsulation = encapsulation
        self.local_subnets = tuple(local_subnets)
        self.remote_subnets = tuple(remote_subnets)
        self.keepalive = keepalive
        self.mtu_policy_name = mtu_policy
        self.mtu_policy: MtuPolicy | None = None
        self.outer_mtu = outer_mtu
        self.ip_version = ipaddress.ip_address(endpoint[0]).version

        # send state: the loop drains tx_queue to the socket of `encapsulation`
        self.tx_queue: list[bytes] = []
        self.last_tx = 0.0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self.pending_out: OutboundSA | None = None
        self.pending_deadline = 0.0
        self.rekey_warned = False
        self.counters: collections.Counter[str] = collections.Counter()
        self._warned_counts: dict[str, int] = {}
        self._next_warn = 0.0

    @property
    def inner_mtu(self) -> int:
        space = esp_space(self.outer_mtu, self.ip_version, self.encapsulation)
        return self.out_sa.max_payload(space)

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, {self.endpoint[0]}:{self.endpoint[1]})"


# routes ---------------------------------------------------------------------


class RouteTable:
    """Longest-prefix match from an inner destination address to a peer.

    One dictionary per (IP version, prefix length), keyed by the network
    bits; lookups try the lengths present from longest to shortest, and the
    answer per destination is cached until the table changes.
    """

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, dict[int, Peer]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}
        self._cache: dict[bytes, Peer | None] = {}

    def add(self, prefix: IPNetwork, peer: Peer) -> None:
        by_len = self._tables[prefix.version]
        bits = prefix.max_prefixlen - prefix.prefixlen
        by_len.setdefault(prefix.prefixlen, {})[int(prefix.network_address) >> bits] = (
            peer
        )
        self._lengths[prefix.version] = sorted(by_len, reverse=True)
        self._cache.clear()

    def remove_peer(self, peer: Peer) -> None:
        for version, by_len in self._tables.items():
            for plen in list(by_len):
                table = by_len[plen]
                for key in [k for k, p in table.items() if p is peer]:
                    del table[key]
                if not table:
                    del by_len[plen]
            self._lengths[version] = sorted(by_len, reverse=True)
        self._cache.clear()

    def lookup(self, dst: bytes) -> Peer | None:
        """The peer for a 4- or 16-byte destination address."""
        try:
            return self._cache[dst]
        except KeyError:
            pass
        version = 4 if len(dst) == 4 else 6
        width = len(dst) * 8
        addr = int.from_bytes(dst, "big")
        by_len = self._tables[version]
        peer = None
        for plen in self._lengths[version]:
            peer = by_len[plen].get(addr >> (width - plen))
            if peer is not None:
                break
        if len(self._cache) >= ROUTE_CACHE_MAX:
            self._cache.clear()
        self._cache[dst] = peer
        return peer

    def routes(self) -> list[tuple[str, str]]:
        out = []
        for version, by_len in self._tables.items():
            width = 32 if version == 4 else 128
            for plen, table in by_len.items():
                for key, peer in table.items():
                    addr = ipaddress.ip_address(key << (width - plen) if plen else 0)
                    if version == 6 and addr.version == 4:
                        addr = ipaddress.IPv6Address(int(addr))
                    out.append((f"{addr}/{plen}", peer.name))
        return sorted(out)


# the datapath ---------------------------------------------------------------


class Datapath:
    """ESP datapath for any number of peers (sans-IO: bytes and `now` in)."""

    def __init__(
        self,
        rekey_grace: float = 30.0,
        on_roam: Callable[[Peer, Address, Address], None] | None = None,
        to_tun: Callable[[bytes], None] | None = None,
    ) -> None:
        self.rekey_grace = rekey_grace
        self.on_roam = on_roam
        self.peers: dict[str, Peer] = {}
        self.routes = RouteTable()
        self.spis: dict[int, _Inbound] = {}  # the SA database for receive
        self.dirty: list[Peer] = []  # peers with packets in tx_queue
        self.packing: dict[str, Peer] = {}  # policies that may hold a payload
        self.tun_queue: list[bytes] = []  # inner packets for the TUN device
        self.counters: collections.Counter[str] = collections.Counter()
        self.started = time.time()
        self._to_tun = to_tun or self.tun_queue.append

    def trace_packets(self) -> None:
        """Log every packet at DEBUG (wraps the per-packet methods; when DEBUG
        is off they stay unwrapped, so the hot path has no logging calls)."""
        outbound, inbound = self.outbound, self.inbound

        def traced_outbound(packet: bytes, now: float) -> None:
            before = dict(self.counters)
            outbound(packet, now)
            log.debug("tun -> %d bytes %s", len(packet), _delta(before, self.counters))

        def traced_inbound(esp: bytes, src: Address, now: float) -> None:
            queued = len(self.tun_queue)
            spi = _unpack_spi(esp)[0] if len(esp) >= 4 else None
            inbound(esp, src, now)
            entry = self.spis.get(spi) if spi is not None else None
            log.debug(
                "%s:%d -> %d bytes spi %s: %s",
                src[0],
                src[1],
                len(esp),
                f"{spi:#x}" if spi is not None else "-",
                "to tun" if len(self.tun_queue) > queued else "dropped",
                extra={"peer": entry.peer.name if entry else None},
            )

        self.outbound = traced_outbound  # type: ignore[method-assign]
        self.inbound = traced_inbound  # type: ignore[method-assign]

    # peers and SAs

    def add_peer(self, peer: Peer, now: float = 0.0) -> None:
        """Install a peer, its inbound SA and its routes (remote subnets)."""
        if peer.name in self.peers:
            raise ValueError(f"peer {peer.name!r} exists")
        self._check_spi_free(peer.in_sa)
        self.peers[peer.name] = peer
        self.spis[peer.in_sa.cfg.spi] = _Inbound(peer, peer.in_sa)
        for prefix in peer.remote_subnets:
            self.routes.add(prefix, peer)
        self._attach_policy(peer)
        peer.last_tx = now
        log.info(
            "peer %s up: %s %s:%d, out SPI %#x, in SPI %#x, inner MTU %d",
            peer.name,
            peer.encapsulation,
            peer.endpoint[0],
            peer.endpoint[1],
            peer.out_sa.cfg.spi,
            peer.in_sa.cfg.spi,
            peer.inner_mtu,
        )

    def remove_peer(self, name: str) -> Peer:
        peer = self.peers.pop(name)
        self.routes.remove_peer(peer)
        for spi in [s for s, e in self.spis.items() if e.peer is peer]:
            del self.spis[spi]
        if peer in self.dirty:
            self.dirty.remove(peer)
        peer.tx_queue.clear()
        log.info("peer %s down", name)
        return peer

    def replace_peer(self, peer: Peer, now: float = 0.0) -> None:
        """Swap a peer (same name) for a new definition in one step."""
        old = self.peers.get(peer.name)
        if old is not None:
            self.remove_peer(peer.name)
        try:
            self.add_peer(peer, now)
        except ValueError:
            if old is not None:
                self.add_peer(old, now)
            raise

    def _check_spi_free(self, sa: InboundSA) -> None:
        if sa.cfg.spi in self.spis:
            other = self.spis[sa.cfg.spi].peer.name
            raise ValueError(f"inbound SPI {sa.cfg.spi:#x} is in use by {other}")

    def _attach_policy(self, peer: Peer) -> None:
        factory = mtu_policy_factory(peer.mtu_policy_name)
        if factory is None:
            peer.mtu_policy = None
            return
        peer.mtu_policy = factory(self._context(peer))

    def _context(self, peer: Peer) -> MtuContext:
        space = esp_space(peer.outer_mtu, peer.ip_version, peer.encapsulation)
        return MtuContext(
            peer=peer.name,
            inner_mtu=peer.inner_mtu,
            esp_space=space,
            out_sa=peer.out_sa,
            selectors=peer.in_sa.selectors,
            to_tun=self._to_tun,
            outer_mtu=peer.outer_mtu,
        )

    def rekey(
        self,
        name: str,
        out_sa: OutboundSA | None,
        in_sa: InboundSA | None,
        now: float,
        switch_now: bool = False,
    ) -> None:
        """Make-before-break SA swap for one peer (either SA may be None)."""
        peer = self.peers[name]
        if in_sa is not None:
            spi = in_sa.cfg.spi
            old = self.spis.get(spi)
            if old is not None and old.peer is not peer:
                raise ValueError(f"inbound SPI {spi:#x} is in use by {old.peer.name}")
            # a reused SPI cannot be kept twice: the new SA replaces it at once
            self.spis[spi] = _Inbound(peer, in_sa, fresh=out_sa is not None)
            peer.in_sa = in_sa
        if out_sa is None:
            self._retire_old_inbound(peer, now)
        elif switch_now or in_sa is None:
            self._switch_out(peer, out_sa, now)
        else:
            peer.pending_out = out_sa
            peer.pending_deadline = now + self.rekey_grace
        log.info(
            "peer %s rekeyed: in SPI %s, out SPI %s%s",
            name,
            f"{in_sa.cfg.spi:#x}" if in_sa else "unchanged",
            f"{out_sa.cfg.spi:#x}" if out_sa else "unchanged",
            " (pending until the peer uses the new SA)" if peer.pending_out else "",
        )

    def _switch_out(self, peer: Peer, out_sa: OutboundSA, now: float) -> None:
        old_spi = peer.out_sa.cfg.spi
        policy = peer.mtu_policy
        if policy is not None:
            # pieces of one AGGFRAG packet never span two SAs (RFC 9347 §2.2.3)
            self._policy_poll(peer, now)
        peer.out_sa = out_sa
        peer.pending_out = None
        peer.rekey_warned = False
        if policy is not None:
            switch = getattr(policy, "switch_out", None)
            if switch is None:
                self._attach_policy(peer)
            else:
                switch(self._context(peer))
        self._retire_old_inbound(peer, now)
        log.info("peer %s: outbound SPI %#x -> %#x", peer.name, old_spi, out_sa.cfg.spi)

    def _retire_old_inbound(self, peer: Peer, now: float) -> None:
        """Remove inbound SAs other than the current one after the grace time."""
        for entry in self.spis.values():
            if (
                entry.peer is peer
                and entry.sa is not peer.in_sa
                and not entry.retire_at
            ):
                entry.retire_at = now + self.rekey_grace

    # send: TUN -> peer

    def outbound(self, packet: bytes, now: float) -> None:
        """Route one inner packet and queue its ESP packet(s) for the peer."""
        if len(packet) < IPV4_HEADER_SIZE:
            self.counters["tx_malformed"] += 1
            return
        version = packet[0] >> 4
        if version == 4:
            next_header = NEXT_HEADER_IPV4
            dst = packet[IPV4_DST]
        elif version == 6 and len(packet) >= IPV6_HEADER_SIZE:
            next_header = NEXT_HEADER_IPV6
            dst = packet[IPV6_DST]
        else:
            self.counters["tx_malformed"] += 1
            return
        peer = self.routes.lookup(dst)
        if peer is None:
            self.counters["tx_no_route"] += 1
            return
        peer.tx_bytes += len(packet)

        if peer.mtu_policy is not None:
            for payload, nh in peer.mtu_policy.outbound(packet, next_header, now):
                self._seal(peer, payload, nh)
            self.packing[peer.name] = peer
            return
        try:
            esp = peer.out_sa.seal(packet, next_header)
        except SequenceExhausted:
            peer.counters["tx_sequence_exhausted"] += 1
            return
        queue = peer.tx_queue
        if not queue:
            self.dirty.append(peer)
        queue.append(esp)

    def _seal(self, peer: Peer, payload: bytes, next_header: int) -> None:
        try:
            esp = peer.out_sa.seal(payload, next_header)
        except SequenceExhausted:
            peer.counters["tx_sequence_exhausted"] += 1
            return
        if not peer.tx_queue:
            self.dirty.append(peer)
        peer.tx_queue.append(esp)

    def tun_drained(self, now: float) -> None:
        """The TUN queue is empty: policies send what they hold (no waiting)."""
        for peer in self.packing.values():
            self._policy_poll(peer, now)
        self.packing.clear()

    def _policy_poll(self, peer: Peer, now: float) -> None:
        if peer.mtu_policy is not None:
            for payload, nh in peer.mtu_policy.poll(now):
                self._seal(peer, payload, nh)

    def emsgsize(self, peer: Peer, size: int, now: float) -> None:
        """An outer packet of `size` bytes to `peer` failed with EMSGSIZE."""
        peer.counters["tx_emsgsize"] += 1
        hook = getattr(peer.mtu_policy, "on_emsgsize", None)
        if hook is not None:
            hook(size, now)

    def sent(self, peer: Peer, now: float) -> None:
        """The loop has handed `peer.tx_queue` to the socket."""
        peer.tx_packets += len(peer.tx_queue)
        peer.tx_queue.clear()
        peer.last_tx = now

    # receive: outer socket -> TUN

    def inbound(self, esp: bytes, src: Address, now: float) -> None:
        """Check and open one ESP packet; queue its inner packets for the TUN."""
        if len(esp) < ESP_HEADER_SIZE:
            self.counters["rx_runt"] += 1
            return
        entry = self.spis.get(_unpack_spi(esp)[0])
        if entry is None:
            # RFC 4303 §3.4.2: no SA -> drop, count, never answer
            self.counters["rx_unknown_spi"] += 1
            return
        peer = entry.peer
        opened = entry.sa.open(esp, now)
        if isinstance(opened, Drop):
            peer.counters[f"rx_{opened.value}"] += 1
            return
        next_header, payload, seq = opened

        if peer.mtu_policy is not None:
            self.tun_queue.extend(
                peer.mtu_policy.inbound(
                    next_header, payload, seq, now, entry.sa.cfg.spi
                )
            )
            self._policy_poll(peer, now)
        elif next_header in (NEXT_HEADER_IPV4, NEXT_HEADER_IPV6):
            self.tun_queue.append(payload)
        elif next_header == NEXT_HEADER_AGGFRAG:
            peer.counters["rx_aggfrag_unexpected"] += 1
        else:
            peer.counters[f"rx_next_header_{next_header}"] += 1
        peer.rx_packets += 1
        peer.rx_bytes += len(payload)

        # roaming: only authenticated packets newer than any seen move the peer
        if seq > entry.highest:
            entry.highest = seq
            if src != peer.endpoint:
                self._roam(peer, src)
        if entry.fresh:
            entry.fresh = False
            if peer.pending_out is not None and entry.sa is peer.in_sa:
                self._switch_out(peer, peer.pending_out, now)

    def _roam(self, peer: Peer, src: Address) -> None:
        old = peer.endpoint
        if peer.encapsulation == "esp":
            src = (src[0], 0)
            if src == old:
                return
        peer.endpoint = src
        peer.counters["roamed"] += 1
        log.info("peer %s moved from %s:%d to %s:%d", peer.name, *old, *src)
        if self.on_roam is not None:
            self.on_roam(peer, old, src)

    def non_esp(self, kind: str, peer_addr: Address) -> None:
        """Count a keepalive, IKE or runt datagram seen on the UDP socket."""
        del peer_addr
        self.counters[f"rx_{kind}"] += 1

    # timers

    def poll(self, now: float) -> None:
        """Run periodic work; call about once a second."""
        for peer in self.peers.values():
            # keepalive when idle, RFC 3948 §4
            if (
                peer.encapsulation == "udp"
                and peer.keepalive > 0
                and now - peer.last_tx >= peer.keepalive
                and not peer.tx_queue
            ):
                peer.tx_queue.append(NAT_KEEPALIVE)
                peer.counters["tx_keepalive"] += 1
                self.dirty.append(peer)

            # deferred outbound switch after a rekey
            if peer.pending_out is not None and now >= peer.pending_deadline:
                self._switch_out(peer, peer.pending_out, now)

            if peer.out_sa.needs_rekey and not peer.rekey_warned:
                peer.rekey_warned = True
                log.warning(
                    "peer %s: outbound SA %#x needs rekeying (sequence %d)",
                    peer.name,
                    peer.out_sa.cfg.spi,
                    peer.out_sa.seq,
                )
            self._policy_poll(peer, now)
            if now >= peer._next_warn:
                self._warn_violations(peer, now)

        # retire old inbound SAs (make-before-break grace elapsed)
        for spi, entry in list(self.spis.items()):
            if entry.retire_at and now >= entry.retire_at:
                del self.spis[spi]
                log.info("peer %s: inbound SPI %#x retired", entry.peer.name, spi)

    def next_timer(self) -> float:
        """Earliest time an MTU policy wants poll() (inf if none)."""
        when = float("inf")
        for peer in self.peers.values():
            timer = getattr(peer.mtu_policy, "next_timer", None)
            if timer is not None:
                when = min(when, timer())
        return when

    def _warn_violations(self, peer: Peer, now: float) -> None:
        """One WARNING per peer and interval summarising new drops."""
        counts = self.drop_counts(peer)
        new = {
            k: v - peer._warned_counts.get(k, 0)
            for k, v in counts.items()
            if v > peer._warned_counts.get(k, 0)
        }
        if new:
            peer._warned_counts = counts
            peer._next_warn = now + WARN_INTERVAL
            text = ", ".join(f"{n} {k}" for k, n in sorted(new.items()))
            log.warning("peer %s: dropped %s", peer.name, text)

    def drop_counts(self, peer: Peer) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, value in peer.counters.items():
            if key.startswith("rx_") and key not in ("rx_dummy",):
                out[key] = value
        return out

    # status

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Everything worth showing, JSON-able."""
        now = time.time() if now is None else now
        peers = {}
        for peer in self.peers.values():
            inbound = [
                {
                    "spi": spi,
                    "transform": e.sa.cfg.transform,
                    "esn": e.sa.cfg.esn,
                    "replay_window": e.sa.cfg.replay_window,
                    "highest_seq": e.highest,
                    "current": e.sa is peer.in_sa,
                    "retiring": bool(e.retire_at),
                    "counters": dict(e.sa.counters),
                }
                for spi, e in sorted(self.spis.items())
                if e.peer is peer
            ]
            out = peer.out_sa
            peers[peer.name] = {
                "endpoint": f"{peer.endpoint[0]}:{peer.endpoint[1]}",
                "encapsulation": peer.encapsulation,
                "mtu_policy": peer.mtu_policy_name,
                "inner_mtu": peer.inner_mtu,
                "local_subnets": [str(n) for n in peer.local_subnets],
                "remote_subnets": [str(n) for n in peer.remote_subnets],
                "out_sa": {
                    "spi": out.cfg.spi,
                    "transform": out.cfg.transform,
                    "esn": out.cfg.esn,
                    "seq": out.seq,
                    "needs_rekey": out.needs_rekey,
                },
                "pending_out_spi": (
                    peer.pending_out.cfg.spi if peer.pending_out else None
                ),
                "in_sas": inbound,
                "tx_packets": peer.tx_packets,
                "tx_bytes": peer.tx_bytes,
                "rx_packets": peer.rx_packets,
                "rx_bytes": peer.rx_bytes,
                "counters": dict(peer.counters),
                "policy": peer.mtu_policy.status() if peer.mtu_policy else {},
            }
        return {
            "uptime": round(now - self.started, 1),
            "peers": peers,
            "routes": self.routes.routes(),
            "counters": dict(self.counters),
        }
