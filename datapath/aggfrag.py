"""AGGFRAG payloads (RFC 9347): inner packets aggregated into and fragmented
across ESP payloads (ESP next header 144). Sans-IO.

Why: a tunnel that refuses a packet because it does not fit one envelope
creates an interior MTU minimum that many servers never discover (they expect
ICMP "fragmentation needed", and firewalls eat it). With AGGFRAG the tunnel
never refuses a packet for its size: a packet larger than one envelope is cut
into pieces carried in consecutive ESP packets and put back together at the
far end, so it leaves the tunnel whole, as its DF bit promises ("virtually
large MTU").

Wire format (RFC 9347 §6.1). An AGGFRAG payload is a header followed by
DataBlocks:

    sub-type 0:  Sub-type (1) | Reserved (1) | BlockOffset (2)        4 bytes
    sub-type 1:  the same 4 bytes, P and E flags in the reserved byte,
                 then LossEventRate, RTT/Echo Delay/Transmit Delay, TVal,
                 TEcho                                               24 bytes

DataBlocks are inner IP packets back to back; the IP header is the framing
(IPv4 Total Length, IPv6 Payload Length + 40). A block whose first nibble is 0
is padding that runs to the end of the payload. BlockOffset counts the
DataBlocks bytes at the start of this payload that finish a packet begun
earlier; it may point past the end of this payload (§2.2).

Sender (Packer). Inner packets are appended to the current payload; a packet
that does not fit is split, and each following payload starts with
BlockOffset = bytes of it still to come. Full payloads are handed out at
once; a partly filled one is handed out by flush(), which the caller calls as
soon as its TUN queue is empty, so packing never waits for more packets.
Pieces of one packet must go out in consecutive ESP sequence numbers on one
SA (§2.2.3): call flush() before sealing anything else on the SA (a probe, a
rekey); after flush() no packet is left half sent.

Receiver (Reassembler). Complete inner packets are delivered as soon as their
payload arrives, in payload order (§2.5, first method), so a lost outer packet
never holds up unrelated traffic. Partial packets wait for their neighbours,
keyed by ESP sequence number (which for AGGFRAG goes up by exactly one per
packet, §2.2.3): a piece whose continuation has fallen out of the reorder
window, or has not come within the drop timer, is dropped; all-pad payloads
between pieces are skipped (§2.2.3). Memory held for partial packets is bounded
per SA. Every inconsistency (BlockOffset that disagrees with the inner length,
unknown block types, impossible lengths) is a counted drop, never a crash.
Sub-type 1 (congestion control) headers are skipped for reassembly and handed
to the caller as CongestionInfo; Moat uses their TVal/TEcho echo for path MTU
probing (datapath/plpmtud.py).
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

NEXT_HEADER_AGGFRAG = 144  # ESP next header / IP protocol number (RFC 9347 §7.1)

SUBTYPE_BASIC = 0  # non-congestion-control format (§6.1.1)
SUBTYPE_CONGESTION = 1  # congestion-control format (§6.1.2)
BASIC_HEADER_SIZE = 4
CONGESTION_HEADER_SIZE = 24
MAX_BLOCK_OFFSET = 0xFFFF

BLOCK_PAD = 0x0
BLOCK_IPV4 = 0x4
BLOCK_IPV6 = 0x6
IPV4_HEADER_SIZE = 20
IPV6_HEADER_SIZE = 40
# bytes of a block needed before its length is known (the runt limit)
IPV4_LENGTH_END = 4  # Total Length is bytes 2..3
IPV6_LENGTH_END = 6  # Payload Length is bytes 4..5
MAX_INNER_PACKET = 0xFFFF  # an inner packet must fit the 16-bit BlockOffset

FLAG_P = 0x02  # PLPMTUD probe in progress (§6.1.2)
FLAG_E = 0x01  # LossEventRate includes ECN-CE marks
RTT_MAX = 0x3FFFFF
DELAY_MAX = 0x1FFFFF

# Linux xfrm iptfs defaults (net.core.xfrm_iptfs_reorder_window, _drop_time)
DEFAULT_REORDER_WINDOW = 3
DEFAULT_DROP_TIMEOUT = 1.0
DEFAULT_MAX_BYTES = 1 << 20  # partial-packet memory per SA
FEEDBACK_KEPT = 16  # congestion headers kept until the caller takes them


class AggfragError(ValueError):
    """A local misuse (bad size, bad packet handed to the Packer)."""


class Drop(enum.StrEnum):
    """Why a payload or (part of) an inner packet was dropped."""

    MALFORMED = "malformed"  # payload shorter than its header
    BAD_SUBTYPE = "bad_subtype"  # reserved sub-type (§6.1)
    DUPLICATE = "duplicate"  # sequence number already processed
    TOO_OLD = "too_old"  # sequence number behind the reorder window
    BAD_BLOCK_TYPE = "bad_block_type"  # first nibble not 0, 4 or 6
    BAD_INNER_LENGTH = "bad_inner_length"  # IPv4 length < header, IHL wrong
    OFFSET_MISMATCH = "offset_mismatch"  # BlockOffset disagrees with inner length
    ORPHAN_CONTINUATION = "orphan_continuation"  # continuation of nothing
    PARTIAL_TIMEOUT = "partial_timeout"  # drop timer expired
    PARTIAL_WINDOW = "partial_window"  # continuation fell out of the window
    MEMORY = "memory"  # partial memory per SA exhausted
    SELECTOR = "selector"  # inner packet outside the SA's selectors
    # sender side
    INNER_INVALID = "inner_invalid"  # packet length disagrees with its header
    INNER_TOO_BIG = "inner_too_big"


# -- header codec -----------------------------------------------------------


@dataclass(frozen=True)
class CongestionInfo:
    """The sub-type 1 header fields (RFC 9347 §6.1.2), times in microseconds."""

    block_offset: int = 0
    probe: bool = False  # P bit
    ecn: bool = False  # E bit
    loss_event_rate: int = 0
    rtt: int = 0
    echo_delay: int = 0
    transmit_delay: int = 0
    tval: int = 0
    techo: int = 0

    def pack(self) -> bytes:
        flags = (FLAG_P if self.probe else 0) | (FLAG_E if self.ecn else 0)
        rtt = min(self.rtt, RTT_MAX)
        echo = min(self.echo_delay, DELAY_MAX)
        transmit = min(self.transmit_delay, DELAY_MAX)
        # 22-bit RTT, 21-bit Echo Delay, 21-bit Transmit Delay in 64 bits
        delays = (rtt << 42) | (echo << 21) | transmit
        return struct.pack(
            "!BBHIQII",
            SUBTYPE_CONGESTION,
            flags,
            self.block_offset,
            self.loss_event_rate,
            delays,
            self.tval,
            self.techo,
        )

    @classmethod
    def unpack(cls, header: bytes) -> CongestionInfo:
        if len(header) < CONGESTION_HEADER_SIZE:
            raise AggfragError("congestion header too short")
        _, flags, offset, rate, delays, tval, techo = struct.unpack_from(
            "!BBHIQII", header
        )
        return cls(
            block_offset=offset,
            probe=bool(flags & FLAG_P),
            ecn=bool(flags & FLAG_E),
            loss_event_rate=rate,
            rtt=delays >> 42,
            echo_delay=(delays >> 21) & DELAY_MAX,
            transmit_delay=delays & DELAY_MAX,
            tval=tval,
            techo=techo,
        )


def basic_header(block_offset: int) -> bytes:
    """The 4-byte sub-type 0 header (§6.1.1); Reserved is sent as 0."""
    return struct.pack("!BBH", SUBTYPE_BASIC, 0, block_offset)


def all_pad_payload(size: int, info: CongestionInfo | None = None) -> bytes:
    """An all-pad payload (BlockOffset 0, one pad block) of exactly `size` bytes.

    With `info` the header is sub-type 1 (used for probes and their echoes);
    receivers treat it as transparent between the pieces of a packet (§2.2.3).
    """
    header = basic_header(0) if info is None else info.pack()
    if size < len(header) + 1:
        raise AggfragError(f"all-pad payload needs at least {len(header) + 1} bytes")
    return header + bytes(size - len(header))


def inner_length(block: bytes | bytearray | memoryview) -> int | None:
    """Length of the inner packet starting `block`, None if the header is cut.

    Raises AggfragError for a block type that is neither IPv4 nor IPv6.
    """
    if not block:
        return None
    kind = block[0] >> 4
    if kind == BLOCK_IPV4:
        if len(block) < IPV4_LENGTH_END:
            return None
        return int.from_bytes(block[2:4], "big")
    if kind == BLOCK_IPV6:
        if len(block) < IPV6_LENGTH_END:
            return None
        return int.from_bytes(block[4:6], "big") + IPV6_HEADER_SIZE
    raise AggfragError(f"block type {kind}")


def valid_inner(packet: bytes | bytearray) -> bool:
    """The header framing is sane: IPv4 IHL and Total Length agree with the bytes."""
    if not packet:
        return False
    kind = packet[0] >> 4
    if kind == BLOCK_IPV4:
        if len(packet) < IPV4_HEADER_SIZE:
            return False
        ihl = (packet[0] & 0x0F) * 4
        total = int.from_bytes(packet[2:4], "big")
        return ihl >= IPV4_HEADER_SIZE and ihl <= total == len(packet)
    if kind == BLOCK_IPV6:
        return len(packet) >= IPV6_HEADER_SIZE and int.from_bytes(
            packet[4:6], "big"
        ) + IPV6_HEADER_SIZE == len(packet)
    return False


# -- sender -----------------------------------------------------------------


class Packer:
    """Packs inner packets into AGGFRAG payloads of at most `payload_size` bytes.

    `payload_size` is the whole AGGFRAG payload (header included), i.e. what
    the ESP SA can carry in one envelope (`OutboundSA.max_payload`). With
    `pad=True` every payload is padded to exactly that size (traffic flow
    security style); otherwise a flushed payload is only as long as its data.
    """

    def __init__(self, payload_size: int, *, pad: bool = False) -> None:
        self._check_size(payload_size)
        self.payload_size = payload_size
        self.pad = pad
        self._blocks = bytearray()  # DataBlocks of the payload being filled
        self._offset = 0  # BlockOffset of the payload being filled
        self.counters: collections.Counter[str] = collections.Counter()

    @staticmethod
    def _check_size(size: int) -> None:
        if size < BASIC_HEADER_SIZE + 1:
            raise AggfragError(f"payload size {size} leaves no room for data")

    @property
    def capacity(self) -> int:
        """DataBlocks bytes per payload."""
        return self.payload_size - BASIC_HEADER_SIZE

    @property
    def pending(self) -> int:
        """Bytes waiting in the payload being filled (0: nothing to flush)."""
        return len(self._blocks)

    def push(self, packet: bytes) -> list[bytes]:
        """Queue one inner packet; returns the payloads that became full."""
        if len(packet) > MAX_INNER_PACKET:
            self.counters[Drop.INNER_TOO_BIG] += 1
            return []
        if not valid_inner(packet):
            self.counters[Drop.INNER_INVALID] += 1
            return []
        self.counters["packets"] += 1
        out: list[bytes] = []
        view = memoryview(packet)
        while True:
            space = self.capacity - len(self._blocks)
            if len(view) <= space:
                self._blocks += view
                if len(self._blocks) == self.capacity:
                    out.append(self._emit(0))
                return out

            # split: what fits ends this payload, the rest opens the next ones
            self._blocks += view[:space]
            view = view[space:]
            out.append(self._emit(len(view)))
            self.counters["fragments"] += 1

    def flush(self) -> list[bytes]:
        """Hand out the partly filled payload now (call when the TUN queue is empty)."""
        if not self._blocks:
            return []
        return [self._emit(0)]

    def resize(self, payload_size: int) -> list[bytes]:
        """Use a new payload size from the next payload on; flushes first."""
        self._check_size(payload_size)
        out = self.flush()
        self.payload_size = payload_size
        return out

    def _emit(self, next_offset: int) -> bytes:
        payload = basic_header(self._offset) + self._blocks
        if self.pad and len(payload) < self.payload_size:
            payload += bytes(self.payload_size - len(payload))  # pad block
        self._blocks = bytearray()
        self._offset = next_offset
        self.counters["payloads"] += 1
        return bytes(payload)


# -- receiver ---------------------------------------------------------------


class _Partial:
    """An inner packet whose first bytes arrived; waits for payload `next_seq`."""

    __slots__ = ("buf", "next_seq", "since")

    def __init__(self, buf: bytearray, next_seq: int, since: float) -> None:
        self.buf = buf
        self.next_seq = next_seq
        self.since = since  # time of the last progress (drop timer start)


class _Lead:
    """What a payload says about its start: continuation bytes or none.

    kind: "pad" (all-pad payload, transparent), "clean" (BlockOffset 0, a new
    block starts), "cont" (BlockOffset > 0; `data` holds the continuation bytes
    present, `offset` the BlockOffset, `through` True when the continuation
    runs on into the next payload).
    """

    __slots__ = ("kind", "offset", "data", "through", "arrived")

    def __init__(
        self, kind: str, offset: int, data: bytes, through: bool, arrived: float
    ) -> None:
        self.kind = kind
        self.offset = offset
        self.data = data
        self.through = through
        self.arrived = arrived


_PAD = "pad"
_CLEAN = "clean"
_CONT = "cont"
_USED = "used"


class Reassembler:
    """Turns the AGGFRAG payloads of one inbound SA back into inner packets.

    feed(seq, payload, now) returns the inner packets completed by this
    payload; call expire(now) when next_timer() is due. `permits` (the SA's
    inbound selector check) is applied to every inner packet.
    """

    def __init__(
        self,
        window: int = DEFAULT_REORDER_WINDOW,
        drop_timeout: float = DEFAULT_DROP_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        permits: Callable[[bytes], bool] | None = None,
    ) -> None:
        if window < 0 or drop_timeout <= 0 or max_bytes <= 0:
            raise AggfragError("window >= 0, drop_timeout > 0, max_bytes > 0")
        self.window = window
        self.drop_timeout = drop_timeout
        self.max_bytes = max_bytes
        self.permits = permits
        self.highest = 0  # highest sequence number accepted (0: none yet)
        self._leads: dict[int, _Lead] = {}  # by seq, inside the window
        self._partials: dict[int, _Partial] = {}  # by the seq they wait for
        self.held_bytes = 0  # bytes held in partials and early continuations
        # sub-type 1 headers seen, newest last (bounded: the caller may not read)
        self.feedback: collections.deque[CongestionInfo] = collections.deque(
            maxlen=FEEDBACK_KEPT
        )
        self.counters: collections.Counter[str] = collections.Counter()

    # -- public -------------------------------------------------------------

    def feed(self, seq: int, payload: bytes, now: float) -> list[bytes]:
        """Process the AGGFRAG payload of ESP packet `seq`."""
        out: list[bytes] = []
        if self.held_bytes or self._partials:
            self.expire(now)

        # window and duplicates (RFC 9347 §2.2.3)
        if seq < self.highest:
            self.counters["reordered"] += 1  # arrived after a later one
        if seq < self.highest - self.window:
            self._drop(Drop.TOO_OLD)
            return out
        if seq in self._leads:
            self._drop(Drop.DUPLICATE)
            return out

        # header
        parsed = self._parse_header(payload)
        if parsed is None:
            return out
        offset, blocks = parsed
        self.counters["payloads"] += 1
        if seq > self.highest:
            self.highest = seq
            self._slide()

        # continuation bytes at the start
        cont_len = min(offset, len(blocks))
        if offset == 0 and blocks and blocks[0] >> 4 == BLOCK_PAD:
            lead = _Lead(_PAD, 0, b"", False, now)
        elif offset == 0:
            lead = _Lead(_CLEAN, 0, b"", False, now)
        else:
            lead = _Lead(
                _CONT, offset, bytes(blocks[:cont_len]), offset > cont_len, now
            )
        self._leads[seq] = lead
        if lead.kind == _CONT:
            self.held_bytes += len(lead.data)
        if seq in self._partials:
            self._advance(seq, now, out)
        self._check_orphan(seq)

        # new blocks after the continuation
        if offset < len(blocks):
            self._parse_blocks(seq, blocks, offset, now, out)
        self._check_orphan(seq + 1)
        if self.held_bytes > self.max_bytes:
            self._enforce_memory()
        return out

    def expire(self, now: float) -> None:
        """Drop partial packets whose drop timer ran out."""
        for key, partial in list(self._partials.items()):
            if now - partial.since >= self.drop_timeout:
                self._discard_partial(key, Drop.PARTIAL_TIMEOUT)
        for seq, lead in list(self._leads.items()):
            if lead.kind == _CONT and now - lead.arrived >= self.drop_timeout:
                self._release_lead(seq, Drop.PARTIAL_TIMEOUT)

    def next_timer(self) -> float | None:
        """When expire() next has work to do, or None."""
        times = [p.since for p in self._partials.values()]
        times += [x.arrived for x in self._leads.values() if x.kind == _CONT]
        return min(times) + self.drop_timeout if times else None

    def take_feedback(self) -> list[CongestionInfo]:
        out = list(self.feedback)
        self.feedback.clear()
        return out

    def status(self) -> dict[str, object]:
        return {
            "highest_seq": self.highest,
            "partials": len(self._partials),
            "held_bytes": self.held_bytes,
            "counters": dict(self.counters),
        }

    # -- steps --------------------------------------------------------------

    def _parse_header(self, payload: bytes) -> tuple[int, memoryview] | None:
        if not payload:
            self._drop(Drop.MALFORMED)
            return None
        subtype = payload[0]
        if subtype == SUBTYPE_BASIC:
            if len(payload) < BASIC_HEADER_SIZE:
                self._drop(Drop.MALFORMED)
                return None
            # Reserved is ignored on receipt (§6.1.1)
            offset = int.from_bytes(payload[2:4], "big")
            return offset, memoryview(payload)[BASIC_HEADER_SIZE:]
        if subtype == SUBTYPE_CONGESTION:
            if len(payload) < CONGESTION_HEADER_SIZE:
                self._drop(Drop.MALFORMED)
                return None
            info = CongestionInfo.unpack(payload)
            self.feedback.append(info)
            self.counters["congestion_headers"] += 1
            return info.block_offset, memoryview(payload)[CONGESTION_HEADER_SIZE:]
        self._drop(Drop.BAD_SUBTYPE)
        return None

    def _parse_blocks(
        self, seq: int, blocks: memoryview, pos: int, now: float, out: list[bytes]
    ) -> None:
        while pos < len(blocks):
            kind = blocks[pos] >> 4
            if kind == BLOCK_PAD:
                return  # padding runs to the end (§6.1.3.3)
            try:
                length = inner_length(blocks[pos : pos + IPV6_LENGTH_END])
            except AggfragError:
                self._drop(Drop.BAD_BLOCK_TYPE)
                return
            if length is not None and length < IPV4_HEADER_SIZE:
                self._drop(Drop.BAD_INNER_LENGTH)
                return
            if length is None or length > len(blocks) - pos:
                # the packet (maybe even its length field: a runt) goes on
                self._start_partial(seq, bytearray(blocks[pos:]), now, out)
                return
            packet = bytes(blocks[pos : pos + length])
            if not valid_inner(packet):
                # the framing itself is wrong: nothing after it can be trusted
                self._drop(Drop.BAD_INNER_LENGTH)
                return
            self._deliver(packet, out)
            pos += length

    def _start_partial(
        self, seq: int, buf: bytearray, now: float, out: list[bytes]
    ) -> None:
        key = seq + 1
        if key in self._partials:  # cannot happen with one payload per seq
            self._discard_partial(key, Drop.OFFSET_MISMATCH)
        self._partials[key] = _Partial(buf, key, now)
        self.held_bytes += len(buf)
        self._advance(key, now, out)

    def _advance(self, seq: int, now: float, out: list[bytes]) -> None:
        """Join the partial waiting for `seq` with what payload `seq` brought."""
        while True:
            partial = self._partials.get(seq)
            lead = self._leads.get(seq)
            if partial is None or lead is None:
                return
            if lead.kind == _PAD:  # skipped between pieces (§2.2.3)
                self._move_partial(seq, seq + 1, now)
                seq += 1
                continue
            if lead.kind != _CONT:
                # the next payload starts a new block but our packet is unfinished
                self._discard_partial(seq, Drop.OFFSET_MISMATCH)
                return
            if not self._append(partial, lead):
                self._discard_partial(seq, Drop.OFFSET_MISMATCH)
                self._release_lead(seq, None)
                return
            self._release_lead(seq, None)
            lead.kind = _USED
            if lead.through:
                self._move_partial(seq, seq + 1, now)
                seq += 1
                continue

            # the packet is complete
            del self._partials[seq]
            self.held_bytes -= len(partial.buf)
            packet = bytes(partial.buf)
            if valid_inner(packet):
                self.counters["reassembled"] += 1
                self._deliver(packet, out)
            else:
                self._drop(Drop.BAD_INNER_LENGTH)
            return

    def _append(self, partial: _Partial, lead: _Lead) -> bool:
        """Append a continuation; False if BlockOffset disagrees with the length."""
        have = len(partial.buf)
        try:
            # a runt learns its length from the first continuation bytes
            head = bytes(partial.buf[:IPV6_LENGTH_END])
            if len(head) < IPV6_LENGTH_END:
                head += lead.data[: IPV6_LENGTH_END - len(head)]
            total = inner_length(head)
        except AggfragError:
            self._drop(Drop.BAD_BLOCK_TYPE)
            return False
        if total is None:
            # still no length: only possible if this piece runs on
            ok = lead.through and lead.offset > len(lead.data)
        else:
            # BlockOffset must equal the bytes still missing (§2.2.3)
            ok = total - have == lead.offset and total >= IPV4_HEADER_SIZE
        if not ok:
            return False
        partial.buf += lead.data
        self.held_bytes += len(lead.data)
        return True

    def _check_orphan(self, seq: int) -> None:
        """Drop continuation bytes of `seq` if payload seq-1 left nothing open."""
        lead = self._leads.get(seq)
        if lead is None or lead.kind != _CONT:
            return
        before = self._leads.get(seq - 1)
        if (
            before is not None
            and before.kind in (_CLEAN, _USED)  # processed, not waiting itself
            and seq not in self._partials
        ):
            self._release_lead(seq, Drop.ORPHAN_CONTINUATION)

    def _move_partial(self, old: int, new: int, now: float) -> None:
        partial = self._partials.pop(old)
        if new in self._partials:
            self._discard_partial(new, Drop.OFFSET_MISMATCH)
        partial.next_seq = new
        partial.since = now
        self._partials[new] = partial

    def _slide(self) -> None:
        """The window moved: forget what fell behind it."""
        floor = self.highest - self.window
        if self._partials:
            for key in [k for k in self._partials if k < floor]:
                self._discard_partial(key, Drop.PARTIAL_WINDOW)
        # leads are (nearly) in arrival order; a late one inserted behind
        # newer ones goes once those before it are gone (TOO_OLD covers it)
        leads = self._leads
        while leads:
            seq = next(iter(leads))
            if seq >= floor:
                break
            self._release_lead(seq, Drop.PARTIAL_WINDOW)
            del leads[seq]

    def _enforce_memory(self) -> None:
        """Drop the oldest partial data until the SA is within max_bytes."""
        while self.held_bytes > self.max_bytes:
            items: list[tuple[float, int, bool]] = [
                (p.since, k, True) for k, p in self._partials.items()
            ]
            items += [
                (x.arrived, s, False) for s, x in self._leads.items() if x.kind == _CONT
            ]
            if not items:  # accounting bug guard; never loop forever
                log.error("held_bytes %d with nothing held", self.held_bytes)
                self.held_bytes = 0
                return
            _, key, is_partial = min(items)
            if is_partial:
                self._discard_partial(key, Drop.MEMORY)
            else:
                self._release_lead(key, Drop.MEMORY)

    def _discard_partial(self, key: int, reason: Drop) -> None:
        partial = self._partials.pop(key)
        self.held_bytes -= len(partial.buf)
        self._drop(reason)

    def _release_lead(self, seq: int, reason: Drop | None) -> None:
        """Forget the continuation bytes of payload `seq` (used or dropped)."""
        lead = self._leads[seq]
        if lead.kind != _CONT:
            return
        self.held_bytes -= len(lead.data)
        lead.data = b""
        lead.kind = _USED
        if reason is not None:
            self._drop(reason)

    def _deliver(self, packet: bytes, out: list[bytes]) -> None:
        if self.permits is not None and not self.permits(packet):
            self._drop(Drop.SELECTOR)
            return
        self.counters["delivered"] += 1
        out.append(packet)

    def _drop(self, reason: Drop) -> None:
        self.counters[reason] += 1
        log.debug("aggfrag drop: %s", reason)
