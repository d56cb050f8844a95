"""Per-tunnel MTU policies: what the tunnel does with an inner packet that does
not fit one envelope (one outer packet on the path).

    virtual-large  (default) AGGFRAG (RFC 9347): packets of any size are packed
                   into and split across ESP payloads and leave the far end
                   whole; the tunnel never refuses a packet for its size.
    clamp-mss      packets travel one per ESP packet; the MSS option of TCP
                   SYN and SYN-ACK is lowered (both directions) so TCP never
                   sends more than fits; other oversize packets as `classic`.
    classic        packets travel one per ESP packet; an oversize IPv4 packet
                   with DF, or IPv6 packet, is dropped and answered with ICMP
                   fragmentation-needed / packet-too-big giving the inner MTU
                   (rate-limited), as RFC 4301 §8 describes.

All three learn the envelope size by probing (datapath/plpmtud.py): probes and
echoes are AGGFRAG all-pad payloads, which every policy accepts on receive, so
both ends must run Moat with any of these policies (or a peer that ignores
them, see plpmtud). The envelope starts at the safe base and grows as probes
are confirmed; status() shows it.

The Datapath calls outbound() per inner packet, inbound() per authenticated
payload, poll() after each received packet, whenever its TUN queue is empty,
and about once a second: poll() returns what is due now (a partly filled
AGGFRAG payload, probes, probe echoes), so packing never waits on a timer.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from typing import Any

from datapath import mss
from datapath.aggfrag import NEXT_HEADER_AGGFRAG, Packer, Reassembler
from datapath.icmp import TooBig
from datapath.plpmtud import (
    IPV4_SAFE_MTU,
    IPV6_MIN_MTU,
    Plpmtud,
    echo_payload,
    probe_payload,
)
from datapath.tunnel import MtuContext, register_mtu_policy

log = logging.getLogger(__name__)

NEXT_HEADER_IPV4 = 4
NEXT_HEADER_IPV6 = 41
IPV4_DF = 0x40  # in byte 6 of the IPv4 header
REASSEMBLERS_KEPT = 4  # inbound SAs at once: current, and old ones retiring

Payloads = list[tuple[bytes, int]]


class EnvelopePolicy:
    """What every policy shares: probing the envelope, answering probes,
    AGGFRAG reassembly per inbound SA."""

    name = ""

    def __init__(self, ctx: MtuContext) -> None:
        self.ctx = ctx
        self.overhead = ctx.outer_mtu - ctx.esp_space  # outer IP (+UDP) header
        base = IPV6_MIN_MTU if self.overhead >= 40 else IPV4_SAFE_MTU
        self.plp = Plpmtud(base=min(base, ctx.outer_mtu), max_size=ctx.outer_mtu)
        self.envelope = self.plp.plpmtu
        self._reassemblers: dict[int, Reassembler] = {}
        self._due: Payloads = []  # echoes to send with the next poll
        self.counters: collections.Counter[str] = collections.Counter()

    # sizes

    @property
    def payload_room(self) -> int:
        """Largest ESP payload that fits the current envelope."""
        return int(self.ctx.out_sa.max_payload(self.envelope - self.overhead))

    @property
    def inner_mtu(self) -> int:
        return self.payload_room

    def _envelope_changed(self) -> None:
        """Hook: the envelope size moved."""

    # datapath hook

    def inbound(
        self, next_header: int, payload: bytes, seq: int, now: float, spi: int = 0
    ) -> Iterable[bytes]:
        if next_header != NEXT_HEADER_AGGFRAG:
            if next_header in (NEXT_HEADER_IPV4, NEXT_HEADER_IPV6):
                return [self._inbound_packet(payload)]
            self.counters[f"rx_next_header_{next_header}"] += 1
            return []
        packets = self._reassembler(spi).feed(seq, payload, now)
        for info in self._reassembler(spi).take_feedback():
            echo = echo_payload(info)
            if echo is not None:
                self._due.append((echo, NEXT_HEADER_AGGFRAG))
                self.counters["echo_sent"] += 1
            if info.techo:
                self.plp.on_echo(info.techo, now)
        if self.plp.plpmtu != self.envelope:
            self._set_envelope(self.plp.plpmtu)
        return [self._inbound_packet(p) for p in packets]

    def _inbound_packet(self, packet: bytes) -> bytes:
        return packet

    def poll(self, now: float) -> Payloads:
        out = self._flush()
        if self._due:
            out += self._due
            self._due = []
        if now >= self.plp.next_timer():
            probe = self.plp.poll(now)
            if probe is not None:
                room = self.ctx.out_sa.max_payload(probe.size - self.overhead)
                out.append((probe_payload(probe, room), NEXT_HEADER_AGGFRAG))
        for r in self._reassemblers.values():
            when = r.next_timer()
            if when is not None and now >= when:
                r.expire(now)
        if self.plp.plpmtu != self.envelope:
            self._set_envelope(self.plp.plpmtu)
        return out

    def _flush(self) -> Payloads:
        return []

    def next_timer(self) -> float:
        """When poll() has work: a probe or a reassembly drop timer."""
        when = self.plp.next_timer()
        for r in self._reassemblers.values():
            expiry = r.next_timer()
            if expiry is not None:
                when = min(when, expiry)
        return when

    def on_emsgsize(self, size: int, now: float) -> None:
        """An outer packet of `size` bytes could not be sent (EMSGSIZE)."""
        self.plp.on_emsgsize(size, None, now)
        if self.plp.plpmtu != self.envelope:
            self._set_envelope(self.plp.plpmtu)

    def switch_out(self, ctx: MtuContext) -> None:
        """A new outbound SA (rekey); poll() was drained on the old one."""
        self.ctx = ctx
        self._set_envelope(self.envelope)

    def status(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "envelope": self.envelope,
            "inner_mtu": self.inner_mtu,
            "path_mtu": self.plp.status(),
            "reassembly": {
                f"{spi:#x}": r.status() for spi, r in self._reassemblers.items()
            },
            "counters": dict(self.counters),
        }

    # steps

    def _set_envelope(self, size: int) -> None:
        log.info("peer %s: envelope %d -> %d", self.ctx.peer, self.envelope, size)
        self.envelope = size
        self._envelope_changed()

    def _reassembler(self, spi: int) -> Reassembler:
        r = self._reassemblers.get(spi)
        if r is None:
            while len(self._reassemblers) >= REASSEMBLERS_KEPT:
                del self._reassemblers[next(iter(self._reassemblers))]
            sel = self.ctx.selectors
            r = Reassembler(permits=sel.permits_inbound if sel else None)
            self._reassemblers[spi] = r
        return r


class VirtualLarge(EnvelopePolicy):
    """AGGFRAG: every inner packet crosses, whatever its size."""

    name = "virtual-large"

    def __init__(self, ctx: MtuContext) -> None:
        super().__init__(ctx)
        self.packer = Packer(self.payload_room)
        self._carry: Payloads = []  # payloads emitted by a resize

    @property
    def inner_mtu(self) -> int:
        return 0xFFFF

    def outbound(self, packet: bytes, next_header: int, now: float) -> Payloads:
        del next_header, now
        return [(p, NEXT_HEADER_AGGFRAG) for p in self.packer.push(packet)]

    def _flush(self) -> Payloads:
        out, self._carry = self._carry, []
        return out + [(p, NEXT_HEADER_AGGFRAG) for p in self.packer.flush()]

    def _envelope_changed(self) -> None:
        self._carry += [
            (p, NEXT_HEADER_AGGFRAG) for p in self.packer.resize(self.payload_room)
        ]

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["packer"] = dict(self.packer.counters)
        return out


class Classic(EnvelopePolicy):
    """One packet per ESP packet; too big and DF: ICMP with the inner MTU."""

    name = "classic"

    def __init__(self, ctx: MtuContext) -> None:
        super().__init__(ctx)
        self.too_big = TooBig()

    def outbound(self, packet: bytes, next_header: int, now: float) -> Payloads:
        if len(packet) <= self.inner_mtu:
            return [(self._outbound_packet(packet), next_header)]
        self.counters["tx_too_big"] += 1
        reply = self.too_big.reply(packet, self.inner_mtu, now)
        if reply is not None:
            self.ctx.to_tun(reply)
        # TODO: IPv4 without DF should be fragmented (RFC 791) instead of dropped
        return []

    def _outbound_packet(self, packet: bytes) -> bytes:
        return packet

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["icmp"] = dict(self.too_big.counters)
        return out


class ClampMss(Classic):
    """Classic, plus the MSS of SYN and SYN-ACK lowered to fit the envelope."""

    name = "clamp-mss"

    def _mss(self, packet: bytes) -> int:
        return mss.mss_for_mtu(self.inner_mtu, ipv6=packet[0] >> 4 == 6)

    def _outbound_packet(self, packet: bytes) -> bytes:
        return self._clamp(packet)

    def _inbound_packet(self, packet: bytes) -> bytes:
        return self._clamp(packet)

    def _clamp(self, packet: bytes) -> bytes:
        out = mss.clamp(packet, self._mss(packet))
        if out is not packet:
            self.counters["mss_clamped"] += 1
        return out


register_mtu_policy("virtual-large", VirtualLarge)
register_mtu_policy("aggfrag", VirtualLarge)
register_mtu_policy("classic", Classic)
register_mtu_policy("clamp-mss", ClampMss)
