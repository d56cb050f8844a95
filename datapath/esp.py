"""Sans-IO ESP in tunnel mode (RFC 4303): outbound and inbound SAs, SADB.

An OutboundSA turns an inner packet into an ESP packet (SPI through ICV,
what goes after the UDP header or the outer IP header); an InboundSA turns
an ESP packet back into the inner packet, or into a drop reason. Neither
touches a socket or a clock; `now` is passed in.

Receive order (RFC 4303 §3.4, RFC 4301 §5.2):

    1. length, whole cipher blocks         -> Drop.MALFORMED
    2. SA by SPI (SADB)                    -> Drop.UNKNOWN_SPI
    3. replay pre-check, ESN inference     -> Drop.REPLAY / REPLAY_WINDOW
    4. ICV (AEAD open, or HMAC then CBC)   -> Drop.ICV
    5. replay window update (only now)
    6. trailer: pad length, padding 1,2,.. -> Drop.BAD_PADDING
       next header 4/41/144, 59 = dummy    -> Drop.BAD_NEXT_HEADER / DUMMY
    7. inner IP header, then selectors     -> Drop.BAD_INNER / SELECTOR

Every drop is counted in `counters` under its reason; wire input never
raises. Next header 144 (AGGFRAG, RFC 9347) payloads are returned as they
are: the reassembler checks each inner packet against `sa.selectors`.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from datapath.errors import EspConfigError, EspError, SequenceExhausted
from datapath.replay import DUPLICATE, MAX_WINDOW_SIZE, ReplayWindow
from datapath.selector import IPV4_HEADER_SIZE, IPV6_HEADER_SIZE, Selectors
from datapath.transform import (
    ESP_HEADER_SIZE,
    ESP_TRAILER_SIZE,
    PADDING,
    TRANSFORMS,
    make_transform,
)

__all__ = [
    "NEXT_HEADER_AGGFRAG",
    "NEXT_HEADER_IPV4",
    "NEXT_HEADER_IPV6",
    "NEXT_HEADER_NONE",
    "SADB",
    "TRANSFORMS",
    "Drop",
    "EspConfigError",
    "EspError",
    "InboundSA",
    "Opened",
    "OutboundSA",
    "SAConfig",
    "SequenceExhausted",
]

log = logging.getLogger(__name__)

NEXT_HEADER_IPV4 = 4
NEXT_HEADER_IPV6 = 41
NEXT_HEADER_NONE = 59  # dummy packet, discarded silently (RFC 4303 §2.6)
NEXT_HEADER_AGGFRAG = 144  # RFC 9347

SEQ_LIMIT = (1 << 32) - 1  # last sequence number without ESN
ESN_SEQ_LIMIT = (1 << 64) - 1  # last sequence number with ESN
# needs_rekey by default once this fraction of the space is left
SOFT_LIMIT_MARGIN = 1 / 16

_UINT32 = struct.Struct(">I")
_HEADER = struct.Struct(">II")  # SPI, seq_lo
_SPI_OFFSET = 0


class Drop(enum.StrEnum):
    """Why a received packet was dropped (the key of its counter)."""

    MALFORMED = "malformed"  # too short, or not a whole number of blocks
    UNKNOWN_SPI = "unknown_spi"
    REPLAY = "replay"  # inside the window, already received
    REPLAY_WINDOW = "replay_window"  # left of the window
    ICV = "icv"  # integrity check failed (or wrong ESN guess)
    BAD_PADDING = "bad_padding"  # pad length too long or not 1, 2, 3, ...
    BAD_NEXT_HEADER = "bad_next_header"
    BAD_INNER = "bad_inner"  # inner IP header missing or of the wrong version
    SELECTOR = "selector"  # inner addresses outside the SA's selectors
    DUMMY = "dummy"  # next header 59: silent, not an error (RFC 4303 §2.6)


class Opened(NamedTuple):
    """A packet that passed every check."""

    next_header: int
    payload: bytes
    seq: int  # the full (64-bit with ESN) sequence number


_new_opened = tuple.__new__  # skips NamedTuple's Python-level __new__

# pad length -> the padding and pad length bytes a trailer must end with
_PADDING_TAILS = tuple(PADDING[:n] + bytes((n,)) for n in range(256))

# next header -> (IP version, minimum header size) of the inner packet
_INNER_HEADERS = {
    NEXT_HEADER_IPV4: (4, IPV4_HEADER_SIZE),
    NEXT_HEADER_IPV6: (6, IPV6_HEADER_SIZE),
}


@dataclass(frozen=True)
class SAConfig:
    """Manual keying parameters of one SA (one direction).

    For AEAD transforms `key` is the cipher key followed by the 4-byte salt
    (RFC 4106 §8.1, RFC 7634 §2), as Linux `ip xfrm` takes it; for the CBC
    transforms `key` is the cipher key and `auth_key` the HMAC key.
    """

    spi: int
    transform: str
    key: bytes
    auth_key: bytes = b""
    replay_window: int = 1024
    esn: bool = True

    def __post_init__(self) -> None:
        # SPI 0 is never sent: RFC 3948's non-ESP marker relies on it
        if not 1 <= self.spi <= 0xFFFF_FFFF:
            raise EspConfigError(f"spi must be 1..0xffffffff, got {self.spi:#x}")
        if self.transform not in TRANSFORMS:
            known = ", ".join(sorted(TRANSFORMS))
            raise EspConfigError(
                f"unknown transform {self.transform!r} (known: {known})"
            )
        for name in ("key", "auth_key"):
            if not isinstance(getattr(self, name), bytes):
                raise EspConfigError(f"{name} must be bytes (decode hex first)")
        if not 1 <= self.replay_window <= MAX_WINDOW_SIZE:
            raise EspConfigError(
                f"replay_window must be 1..{MAX_WINDOW_SIZE}, got {self.replay_window}"
            )

    def __repr__(self) -> str:  # never print key material
        return (
            f"SAConfig(spi={self.spi:#010x}, transform={self.transform!r}, "
            f"replay_window={self.replay_window}, esn={self.esn})"
        )


class OutboundSA:
    """Sending half of an SA: seals payloads with increasing sequence numbers."""

    def __init__(self, cfg: SAConfig, soft_limit: int | None = None) -> None:
        self.cfg = cfg
        self.spi = cfg.spi
        self.transform = make_transform(
            cfg.transform, cfg.spi, cfg.key, cfg.auth_key, cfg.esn
        )
        self.seq = 0  # last sequence number used; the first packet gets 1
        self.seq_limit = ESN_SEQ_LIMIT if cfg.esn else SEQ_LIMIT
        if soft_limit is None:
            soft_limit = self.seq_limit - int(self.seq_limit * SOFT_LIMIT_MARGIN)
        self.soft_limit = min(soft_limit, self.seq_limit)
        self.counters: collections.Counter[str] = collections.Counter()
        self._seal = self.transform.seal
        log.info(
            "outbound SA %#010x created: %s, esn %s",
            cfg.spi,
            cfg.transform,
            "on" if cfg.esn else "off",
        )

    @property
    def needs_rekey(self) -> bool:
        """True once the soft limit is reached: set up a new SA soon."""
        return self.seq >= self.soft_limit

    def overhead(self, payload_len: int) -> int:
        """Bytes `seal()` adds to a payload of `payload_len` bytes."""
        return self.transform.overhead(payload_len)

    def max_payload(self, esp_space: int) -> int:
        """The largest payload whose ESP packet fits in `esp_space` bytes."""
        return self.transform.max_payload(esp_space)

    def seal(self, payload: bytes, next_header: int) -> bytes:
        """The ESP packet carrying `payload`; SequenceExhausted at the limit."""
        if next_header >> 8:  # not 0..255 (negative numbers too)
            raise EspError(f"next header {next_header} is not a byte")
        seq = self.seq + 1
        if seq > self.seq_limit:
            raise self._exhausted()
        self.seq = seq
        if seq == self.soft_limit:
            log.info("outbound SA %#010x reached its soft limit", self.spi)
        return self._seal(seq, payload, next_header)

    def _exhausted(self) -> SequenceExhausted:
        # RFC 4303 §3.3.3: never cycle the counter; an auditable event
        if not self.counters["seq_exhausted"]:
            log.info("outbound SA %#010x exhausted its sequence numbers", self.spi)
        self.counters["seq_exhausted"] += 1
        return SequenceExhausted(
            f"SA {self.spi:#010x} used its last sequence number {self.seq}"
        )


class InboundSA:
    """Receiving half of an SA: checks and opens ESP packets."""

    def __init__(self, cfg: SAConfig, selectors: Selectors | None = None) -> None:
        self.cfg = cfg
        self.spi = cfg.spi
        self.transform = make_transform(
            cfg.transform, cfg.spi, cfg.key, cfg.auth_key, cfg.esn
        )
        self.replay = ReplayWindow(cfg.replay_window, cfg.esn)
        self.selectors = selectors
        self.ok = 0  # packets that passed every check
        self.last_received: float | None = None  # `now` of the last good packet
        self._drops: collections.Counter[str] = collections.Counter()
        transform = self.transform
        self._min_size = transform.min_packet_size
        # header, IV and ICV around the encrypted part, whose length must be
        # a whole number of cipher blocks (RFC 4303 §2.4)
        self._unencrypted = ESP_HEADER_SIZE + transform.iv_size + transform.icv_size
        self._block_size = transform.block_size
        self._open_transform = self.transform.open
        log.info(
            "inbound SA %#010x created: %s, esn %s, replay window %d, selectors %s",
            cfg.spi,
            cfg.transform,
            "on" if cfg.esn else "off",
            cfg.replay_window,
            selectors,
        )

    @property
    def counters(self) -> collections.Counter[str]:
        """Drops by reason, and "ok" (a snapshot)."""
        counters = collections.Counter(self._drops)
        counters["ok"] = self.ok
        return counters

    def _drop(self, reason: Drop) -> Drop:
        self._drops[reason] += 1
        return reason

    def open(self, packet: bytes, now: float) -> Opened | Drop:
        """The inner payload of an ESP packet, or why it was dropped."""
        size = len(packet)
        if size < self._min_size or (size - self._unencrypted) % self._block_size:
            return self._drop(Drop.MALFORMED)
        spi, seq_lo = _HEADER.unpack_from(packet)
        if spi != self.spi:  # the AEAD ESN AAD is built from self.spi
            return self._drop(Drop.UNKNOWN_SPI)

        # replay pre-check (RFC 4303 §3.4.3)
        replay = self.replay
        seq = replay.check(seq_lo)
        if seq < 0:
            return self._drop(Drop.REPLAY if seq == DUPLICATE else Drop.REPLAY_WINDOW)

        # integrity, then decryption (RFC 4303 §3.4.4)
        plaintext = self._open_transform(packet, seq)
        if not plaintext:  # None, or MALFORMED (not whole cipher blocks)
            return self._drop(Drop.ICV if plaintext is None else Drop.MALFORMED)
        replay.update(seq)

        # trailer: padding 1, 2, 3, ..., pad length (RFC 4303 §2.4, §2.5);
        # a pad length longer than the plaintext fails the same test
        pad_length = plaintext[-2]
        if not plaintext.endswith(_PADDING_TAILS[pad_length], 0, -1):
            return self._drop(Drop.BAD_PADDING)
        next_header = plaintext[-1]
        payload = plaintext[: len(plaintext) - ESP_TRAILER_SIZE - pad_length]

        # next header, inner header, selectors (RFC 4301 §5.2)
        inner = _INNER_HEADERS.get(next_header)
        if inner is not None:
            version, min_size = inner
            if len(payload) < min_size or payload[0] >> 4 != version:
                return self._drop(Drop.BAD_INNER)
            selectors = self.selectors
            if selectors is not None and not selectors.permits_inbound(payload):
                return self._drop(Drop.SELECTOR)
        elif next_header == NEXT_HEADER_NONE:
            return self._drop(Drop.DUMMY)
        elif next_header != NEXT_HEADER_AGGFRAG:
            return self._drop(Drop.BAD_NEXT_HEADER)

        self.ok += 1
        self.last_received = now
        return _new_opened(Opened, (next_header, payload, seq))


class SADB:
    """Inbound SAs by SPI (RFC 4303 §3.4.2)."""

    def __init__(self) -> None:
        self._by_spi: dict[int, InboundSA] = {}
        # drops before an SA is known; each SA counts its own
        self.counters: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._by_spi)

    def __iter__(self) -> Iterator[InboundSA]:
        return iter(list(self._by_spi.values()))

    def add(self, sa: InboundSA) -> None:
        if sa.spi in self._by_spi:
            raise EspConfigError(f"inbound SPI {sa.spi:#010x} is already in use")
        self._by_spi[sa.spi] = sa

    def remove(self, spi: int) -> InboundSA | None:
        return self._by_spi.pop(spi, None)

    def get(self, spi: int) -> InboundSA | None:
        return self._by_spi.get(spi)

    def open(self, packet: bytes, now: float) -> tuple[InboundSA | None, Opened | Drop]:
        """Find the SA by SPI and open the packet with it."""
        if len(packet) < ESP_HEADER_SIZE:
            self.counters[Drop.MALFORMED] += 1
            return None, Drop.MALFORMED
        (spi,) = _UINT32.unpack_from(packet, _SPI_OFFSET)
        sa = self._by_spi.get(spi)
        if sa is None:
            self.counters[Drop.UNKNOWN_SPI] += 1
            return None, Drop.UNKNOWN_SPI
        return sa, sa.open(packet, now)

    def total_counters(self) -> collections.Counter[str]:
        """SADB drops plus the counters of every SA now in it."""
        total = collections.Counter(self.counters)
        for sa in self._by_spi.values():
            total.update(sa.counters)
        return total
