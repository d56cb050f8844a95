"""Inner packets for AGGFRAG tests: well-formed IP headers, unique bodies."""

from __future__ import annotations

import struct


def ipv4(size: int, tag: int = 0) -> bytes:
    """An IPv4 packet of `size` bytes (>= 20) whose body encodes `tag`."""
    assert 20 <= size <= 0xFFFF
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, size, tag & 0xFFFF, 0x4000, 64, 17, 0,
        bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]),
    )  # fmt: skip
    return header + _body(size - 20, tag)


def ipv6(size: int, tag: int = 0) -> bytes:
    """An IPv6 packet of `size` bytes (>= 40) whose body encodes `tag`."""
    assert 40 <= size <= 0xFFFF
    src, dst = b"\xfd" + bytes(15), b"\xfd" + bytes(14) + b"\x01"
    header = struct.pack("!IHBB16s16s", 0x60000000, size - 40, 17, 64, src, dst)
    return header + _body(size - 40, tag)


def _body(n: int, tag: int) -> bytes:
    seed = struct.pack("!I", tag & 0xFFFFFFFF)
    reps = n // 4 + 1
    return (seed * reps)[:n]
