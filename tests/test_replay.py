"""Anti-replay window (RFC 4303 §3.4.3 with an RFC 6479 ring, ESN App. A)."""

from __future__ import annotations

import pytest

from datapath.errors import EspConfigError
from datapath.replay import DUPLICATE, TOO_OLD, ReplayWindow


def accept(window: ReplayWindow, seq_lo: int) -> int:
    """What the SA does for a packet whose ICV passes."""
    seq = window.check(seq_lo)
    if seq > 0:
        window.update(seq)
    return seq


def test_in_order_and_duplicates() -> None:
    w = ReplayWindow(64, esn=False)
    for n in range(1, 200):
        assert accept(w, n) == n
        assert w.check(n) == DUPLICATE
    assert w.check(199 - 63) == DUPLICATE
    assert w.check(199 - 64) == TOO_OLD
    assert w.check(0) == TOO_OLD


def test_check_does_not_update() -> None:
    w = ReplayWindow(64, esn=False)
    assert w.check(5) == 5
    assert w.check(5) == 5
    assert w.top == 0


@pytest.mark.parametrize("size", [0, -1, 1 << 20])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(EspConfigError, match="replay window"):
        ReplayWindow(size, esn=True)


def test_large_window_4096() -> None:
    w = ReplayWindow(4096, esn=False)
    accept(w, 5000)
    assert w.check(5000 - 4095) == 5000 - 4095
    assert w.check(5000 - 4096) == TOO_OLD
    for n in range(905, 5000, 3):
        assert accept(w, n) == n
    assert w.check(908) == DUPLICATE
    assert w.check(909) == 909


def test_esn_reads_a_low_half_below_the_window_as_wrapped() -> None:
    """RFC 4303 A2.2 case A: below the bottom means the next 2^32 subspace."""
    w = ReplayWindow(4096, esn=True)
    accept(w, 5000)
    assert w.check(5000 - 4096) == (1 << 32) + 5000 - 4096
