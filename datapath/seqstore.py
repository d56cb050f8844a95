"""Outbound sequence numbers that survive a restart (manual keying).

With manual keys a restarted tunnel would start its outbound SA at sequence
number 1 again, and AES-GCM / ChaCha20-Poly1305 derive the nonce from it: the
same key would encrypt under the same nonces twice (RFC 4106 §8.1; the peer's
replay window would also drop the repeats). So the sender reserves blocks of
sequence numbers in a file before using them, like a high-water mark:

    <state_dir>/out-<spi>-<key fingerprint>.seq   holds N: numbers <= N may
                                                   have been used

At start the SA continues after N, and a new block is written (durably)
before the current one runs low. A crash wastes at most one block; the peer
sees a forward jump, which ESP allows. The file name carries a hash of the
key, never the key; a new key starts a new file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from datapath.esp import OutboundSA
from moat.durable import atomic_write_text
from moat.errors import MoatError

log = logging.getLogger(__name__)

RESERVE = 1 << 24  # sequence numbers per reservation (~3 min at 100 kpps)
LOW_WATER = RESERVE // 2  # reserve again when fewer than this are left


def fingerprint(sa: OutboundSA) -> str:
    cfg = sa.cfg
    digest = hashlib.sha256(
        b"moat-outbound-seq\0" + cfg.spi.to_bytes(4, "big") + cfg.key + cfg.auth_key
    )
    return digest.hexdigest()[:16]


class SequenceStore:
    """High-water marks of outbound SAs in one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MoatError(f"state_dir {self.dir}: {exc.strerror}") from None
        self.reserved: dict[int, int] = {}  # id(sa) -> reserved up to

    def path(self, sa: OutboundSA) -> Path:
        return self.dir / f"out-{sa.cfg.spi:08x}-{fingerprint(sa)}.seq"

    def attach(self, sa: OutboundSA) -> None:
        """Continue `sa` after its stored mark, and reserve the next block."""
        path = self.path(sa)
        try:
            mark = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            mark = 0
        except (OSError, ValueError) as exc:
            raise MoatError(f"{path}: unreadable sequence mark ({exc})") from None
        if mark > sa.seq:
            log.info(
                "outbound SA %#010x continues after sequence %d (restart)",
                sa.cfg.spi,
                mark,
            )
            sa.seq = mark
        self._reserve(sa)

    def _reserve(self, sa: OutboundSA) -> None:
        mark = min(sa.seq + RESERVE, sa.seq_limit)
        atomic_write_text(self.path(sa), f"{mark}\n", mode=0o600)
        self.reserved[id(sa)] = mark

    def poll(self, sa: OutboundSA) -> None:
        """Reserve the next block when the current one runs low."""
        reserved = self.reserved.get(id(sa))
        if reserved is None:
            self.attach(sa)
        elif reserved - sa.seq < LOW_WATER and reserved < sa.seq_limit:
            self._reserve(sa)
