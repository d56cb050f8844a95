"""System slots A and B: where an image is streamed, hashed and read back.

A slot is a fixed-size region (a partition on the box, a file in tests).
Writing goes through `SlotWriter`, which hashes every byte it writes, so the
image is verified against its signed hashes as it streams, and `readback`
hashes what actually landed on the medium.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20


class SlotError(Exception):
    """A slot cannot hold or return an image."""


class Slot:
    """One slot, backed by a block device or a regular file of fixed size."""

    def __init__(self, name: str, path: str | os.PathLike[str]) -> None:
        self.name = name
        self.path = Path(path)

    def capacity(self) -> int:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    def write_stream(
        self, chunks: Iterable[bytes], length: int, algorithms: Iterable[str]
    ) -> dict[str, str]:
        """Write exactly `length` bytes from `chunks`; return their digests.

        Stops reading after `length` bytes (endless-data attack) and fails if
        the stream is shorter. The data is fsynced before returning.
        """
        if length > self.capacity():
            raise SlotError(
                f"image is {length} bytes, slot {self.name} holds {self.capacity()}"
            )
        hashers = {alg: hashlib.new(alg) for alg in algorithms}
        written = 0
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for chunk in chunks:
                take = chunk[: length - written]
                view = memoryview(take)
                while view:
                    n = os.pwrite(fd, view, written)
                    view = view[n:]
                    written += n
                for h in hashers.values():
                    h.update(take)
                if written >= length:
                    break
            os.fsync(fd)
        finally:
            os.close(fd)
        if written != length:
            raise SlotError(f"image stream ended after {written} of {length} bytes")
        return {alg: h.hexdigest() for alg, h in hashers.items()}

    def readback(self, length: int, algorithms: Iterable[str]) -> dict[str, str]:
        """Digests of the first `length` bytes as stored in the slot."""
        hashers = {alg: hashlib.new(alg) for alg in algorithms}
        with open(self.path, "rb") as f:
            left = length
            while left:
                chunk = f.read(min(CHUNK_SIZE, left))
                if not chunk:
                    raise SlotError(f"slot {self.name} is shorter than {length}")
                for h in hashers.values():
                    h.update(chunk)
                left -= len(chunk)
        return {alg: h.hexdigest() for alg, h in hashers.items()}

    def invalidate(self) -> None:
        """Overwrite the image header so nothing mistakes the slot for a system."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\0" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
