"""Trusted time for judging metadata expiry.

A box without an RTC battery may wake up in 1970; one whose clock an attacker
set back would accept stale (frozen) metadata. So:

- when the kernel says the clock is NTP-synchronised (adjtimex state is not
  TIME_ERROR) or the time service left its flag file, the wall clock is
  trusted, and the last-known-time floor on /var is moved up to it;
- otherwise the reference time is max(wall clock, floor, image build time):
  a clock that went backwards can only make metadata look MORE expired.

The floor only ever moves forward.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from moat.durable import atomic_write_text

log = logging.getLogger(__name__)

TIME_ERROR = 5  # adjtimex(2): clock not synchronised


class _Timex(ctypes.Structure):
    # struct timex is 208 bytes on x86_64; modes (first field) = 0 reads only
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 204)]


def kernel_clock_synced() -> bool:
    """True when adjtimex(2) does not report TIME_ERROR (an NTP daemon set it)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        tx = _Timex()
        return bool(libc.adjtimex(ctypes.byref(tx)) != TIME_ERROR)
    except (OSError, AttributeError):
        return False


class TrustedClock:
    def __init__(
        self,
        floor_path: Path,
        build_time: float = 0.0,
        synced: Callable[[], bool] = kernel_clock_synced,
        wall: Callable[[], float] = time.time,
        sync_flag: Path | None = None,
    ) -> None:
        self.floor_path = floor_path
        self.build_time = build_time
        self._synced = synced
        self._wall = wall
        self.sync_flag = sync_flag

    def floor(self) -> float:
        try:
            return max(float(self.floor_path.read_text().strip()), self.build_time)
        except (OSError, ValueError):
            return self.build_time

    def is_synced(self) -> bool:
        if self.sync_flag is not None and self.sync_flag.exists():
            return True
        return self._synced()

    def now(self) -> datetime:
        """The reference time for expiry checks; advances the floor when synced."""
        wall, floor = self._wall(), self.floor()
        if self.is_synced() and wall > floor:
            self.floor_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.floor_path, f"{int(wall)}\n")
            floor = wall
        elif wall < floor:
            log.info("clock behind last known time; judging expiry at the floor")
        return datetime.fromtimestamp(max(wall, floor), UTC)
