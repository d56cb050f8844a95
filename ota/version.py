"""Release versions: dotted non-negative integers, compared numerically."""

from __future__ import annotations

import re

from moat.errors import MoatError

VERSION_RE = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")


class VersionError(MoatError):
    """A version string is not dotted integers."""


def parse_version(text: str) -> tuple[int, ...]:
    """`1.2.10` -> (1, 2, 10); trailing zeros do not matter (1.2 == 1.2.0)."""
    if not VERSION_RE.fullmatch(text):
        raise VersionError(f"bad version {text!r} (want dotted numbers like 1.2.0)")
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def is_newer(candidate: str, floor: str) -> bool:
    """True when `candidate` is strictly above `floor` ("-" means no floor)."""
    if floor == "-":
        return True
    return parse_version(candidate) > parse_version(floor)
