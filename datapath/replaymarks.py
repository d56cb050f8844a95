"""Inbound anti-replay state that survives a restart (manual keying).

An inbound SA's replay window (datapath/replay.py) lives in memory. With
manual keys the SA outlives the process: after a restart an empty window
would accept, once more, every packet the peer sent before it. So the
receiver keeps a high-water mark per inbound SA, the highest sequence
number that passed the ICV, and all marks are saved together in one file
(moat.durable.atomic_write: temp + fsync + rename + fsync of the directory):

    {"saved": <unix time>, "running": true,
     "exact": {"<spi hex>-<key fingerprint>": <highest sequence number>},
     "open":  {...the same, for SAs that were still receiving}}

Saving rule (`due`): the file is rewritten when some SA has accepted
SAVE_PACKETS numbers beyond its saved mark, or has accepted anything and
SAVE_SECONDS have passed since the last write. The owner asks `due` about
once a second (the datapath's poll), so between two writes an SA advances
by less than SAVE_PACKETS plus what one poll interval can carry.

Restore rule (`restore`): a mark is exact when its SA had stopped
receiving when it was written (a clean stop: `save(..., clean=True)` after
the datapath stopped; or an SA retired earlier, `note`); the window then
restarts with its right edge at the mark. An "open" mark was written while
the SA was receiving, so after a crash the unsaved tail is unknown but
bounded: the right edge goes to mark + RESTORE_MARGIN, where
RESTORE_MARGIN (2^20) exceeds SAVE_PACKETS (2^16) plus several seconds of
the datapath's fastest rate (well under 2^17 packets a second): every
packet accepted before the crash is left of or on the edge. Everything at
or below the edge counts as seen (ReplayWindow.restore), so none of it is
accepted again; the peer's own packets flow again once it passes the edge,
or at once after it sets up new SAs. An SA that was installed before a
crash but has no mark yet (it received less than SAVE_PACKETS in its first
seconds) restarts at RESTORE_MARGIN: `begin` marks the file "running" at
start, so a missing clean stop is seen; the owner says which SAs are
inherited from before the restart (`restore(sa, inherited=...)`), SAs set
up after it start empty.

Keys of the file carry a hash of the SA's keys, never the keys: a reused
SPI with new keys starts with an empty window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

from datapath.esp import InboundSA
from datapath.replay import SEQ_LO_MASK
from moat.durable import atomic_write

log = logging.getLogger(__name__)

SAVE_PACKETS = 1 << 16  # write when an SA got this far beyond its saved mark
SAVE_SECONDS = 10.0  # ... or after this long, if anything moved at all
RESTORE_MARGIN = 1 << 20  # added to marks after an unclean stop (see above)
ESN_SEQ_MAX = (1 << 64) - 1


def mark_key_for(spi: int, key: bytes, auth_key: bytes = b"") -> str:
    """An SA's name in the file: its SPI and a fingerprint of its keys."""
    digest = hashlib.sha256(
        b"moat-inbound-replay\0" + spi.to_bytes(4, "big") + key + auth_key
    )
    return f"{spi:08x}-{digest.hexdigest()[:16]}"


_KEYS: weakref.WeakKeyDictionary[InboundSA, str] = weakref.WeakKeyDictionary()


def mark_key(sa: InboundSA) -> str:
    """mark_key_for an SA, hashed once per SA (`due` asks every second)."""
    key = _KEYS.get(sa)
    if key is None:
        cfg = sa.cfg
        key = _KEYS[sa] = mark_key_for(cfg.spi, cfg.key, cfg.auth_key)
    return key


class ReplayMarks:
    """High-water marks of inbound SAs, saved together in one file."""

    def __init__(self, path: str | Path, margin: int = RESTORE_MARGIN) -> None:
        self.path = Path(path)
        self.margin = margin
        # key -> (mark, exact): exact marks need no margin on restore
        self.marks: dict[str, tuple[int, bool]] = {}
        self.saved: dict[str, int] = {}  # key -> mark in the file
        self.last_save = 0.0
        self.unclean = False  # the previous run did not stop cleanly
        self.counters: dict[str, int] = {
            "saves": 0, "restored": 0, "restored_with_margin": 0, "save_errors": 0,
        }  # fmt: skip
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # a lost file is a lost mark: say so loudly, keep going
            log.warning("replay marks %s unreadable (%s): windows start empty",
                        self.path, exc)  # fmt: skip
            return
        if not isinstance(doc, dict):
            log.warning("replay marks %s: not a marks file; ignored", self.path)
            return
        self.unclean = doc.get("running") is not False
        for section, exact in (("open", False), ("exact", True)):
            marks = doc.get(section)
            if not isinstance(marks, dict):
                continue
            for key, mark in marks.items():
                if isinstance(mark, int) and not isinstance(mark, bool) and mark >= 0:
                    self.marks[key] = (mark, exact)
                    self.saved[key] = mark
        inexact = sum(1 for _, exact in self.marks.values() if not exact)
        log.info(
            "replay marks: %d SAs from %s, %d written while receiving (+%d each)",
            len(self.marks), self.path, inexact, self.margin,
        )  # fmt: skip

    def begin(self, now: float) -> None:
        """The datapath starts: until `save(clean=True)` the file says so."""
        self.save((), now)

    def restore(self, sa: InboundSA, inherited: bool = True) -> bool:
        """Set the window of an SA being installed from its mark; False if it
        has none. `inherited`: the SA may have received before the restart."""
        entry = self.marks.get(mark_key(sa))
        if entry is None:
            if not (inherited and self.unclean):
                return False
            entry = (0, False)  # may have received up to SAVE_PACKETS unsaved
        mark, exact = entry
        limit = ESN_SEQ_MAX if sa.cfg.esn else SEQ_LO_MASK
        edge = min(mark if exact else mark + self.margin, limit)
        if edge > sa.replay.top:
            sa.replay.restore(edge)
        self.counters["restored"] += 1
        if not exact:
            self.counters["restored_with_margin"] += 1
            log.info("inbound SA %#010x: replay window restarts at %d (mark %d + %d)",
                     sa.cfg.spi, edge, mark, self.margin)  # fmt: skip
        return True

    def note(self, sa: InboundSA) -> None:
        """Remember `sa`'s window edge exactly (it stops receiving now)."""
        key = mark_key(sa)
        old = self.marks.get(key)
        top = sa.replay.top
        if old is not None and old[0] > top and not old[1]:
            return  # never restored: keep the covering mark
        if top or old is not None:
            self.marks[key] = (top, True)

    def forget(self, key: str) -> None:
        """The SA of `key` (mark_key_for) is gone for good; dropped at the next save."""
        self.marks.pop(key, None)

    def due(self, sas: Iterable[InboundSA], now: float) -> bool:
        """Whether the file must be rewritten now (the saving rule above)."""
        moved = False
        for sa in sas:
            top = sa.replay.top
            saved = self.saved.get(mark_key(sa), 0)
            if top - saved >= SAVE_PACKETS:
                return True
            if top > saved:
                moved = True
        return moved and now - self.last_save >= SAVE_SECONDS

    def save(self, sas: Iterable[InboundSA], now: float, clean: bool = False) -> None:
        """Write the marks of the receiving `sas` and of every remembered SA
        in one file; `clean`: the datapath has stopped, the marks are exact."""
        for sa in sas:
            self.marks[mark_key(sa)] = (sa.replay.top, clean)
        exact = {k: m for k, (m, e) in self.marks.items() if e}
        open_ = {k: m for k, (m, e) in self.marks.items() if not e}
        doc = {
            "saved": round(time.time(), 3),
            "running": not clean,
            "exact": exact,
            "open": open_,
        }
        try:
            atomic_write(self.path, json.dumps(doc).encode(), 0o600)
        except OSError as exc:
            self.counters["save_errors"] += 1
            log.warning("replay marks not saved to %s: %s", self.path, exc)
            return
        self.saved = {**exact, **open_}
        self.last_save = now
        self.counters["saves"] += 1
