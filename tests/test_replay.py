"""Anti-replay window (RFC 4303 §3.4.3 with an RFC 6479 ring, ESN App. A).

Two numbered tables of cases (in the style of the Linux kernel / wireguard-go
replay tests: each row feeds one sequence number to the window, in order, and
says what must happen) and a hypothesis comparison against a plain set-based
model of the RFC rules, with and without ESN, across 2^32.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.errors import EspConfigError
from datapath.replay import DUPLICATE, MAX_WINDOW_SIZE, TOO_OLD, ReplayWindow

W = 64  # window size of the tables
SEQ_LO = (1 << 32) - 1
ACCEPT = 0  # marker in the tables: check() must return the full number


def receive(window: ReplayWindow, seq_lo: int, icv_ok: bool = True) -> int:
    """What the SA does: pre-check, then update only if the ICV passed."""
    seq = window.check(seq_lo)
    if seq > 0 and icv_ok:
        window.update(seq)
    return seq


# (row, sequence number, expected): without ESN the wire value is the number
TABLE = [
    (1, 1, ACCEPT),
    (2, 1, DUPLICATE),
    (3, 9, ACCEPT),
    (4, 8, ACCEPT),  # out of order, inside the window
    (5, 7, ACCEPT),
    (6, 7, DUPLICATE),
    (7, W + 1, ACCEPT),  # window is now 2 .. W+1
    (8, W, ACCEPT),
    (9, W, DUPLICATE),
    (10, 2, ACCEPT),  # the bottom edge
    (11, 2, DUPLICATE),
    (12, 1, TOO_OLD),  # just left of the window
    (13, W + 17, ACCEPT),  # slide by 16: window 18 .. W+17
    (14, 3, TOO_OLD),
    (15, 17, TOO_OLD),
    (16, 18, ACCEPT),
    (17, 4 * W, ACCEPT),  # jump further than the window: all bits cleared
    (18, 3 * W + 1, ACCEPT),  # new bottom edge
    (19, 3 * W, TOO_OLD),
    (20, W + 17, TOO_OLD),  # was seen, now far left anyway
    (21, 4 * W - 1, ACCEPT),
    (22, 4 * W - 1, DUPLICATE),
    (23, 4 * W, DUPLICATE),  # the top itself
    (24, 0, TOO_OLD),  # sequence number 0 is never valid (RFC 4303 §3.3.3)
    (25, SEQ_LO, ACCEPT),  # the last number a 32-bit SA may use
    (26, SEQ_LO, DUPLICATE),
    (27, SEQ_LO - W, TOO_OLD),
    (28, SEQ_LO - W + 1, ACCEPT),
]


def test_table() -> None:
    window = ReplayWindow(W, esn=False)
    for row, seq, expected in TABLE:
        result = receive(window, seq)
        assert result == (seq if expected == ACCEPT else expected), f"row {row}"


# (row, low half on the wire, expected full number or DUPLICATE/TOO_OLD,
#  ICV passes); the window starts at top = 2^32 - 10
ESN_START = (1 << 32) - 10
ESN_TABLE = [
    (1, SEQ_LO - 7, (1 << 32) - 8, True),
    (2, 2, (1 << 32) + 2, True),  # case A, below the bottom: wrapped forward
    (3, SEQ_LO - 6, (1 << 32) - 7, True),  # case B: previous subspace
    (4, SEQ_LO - 7, DUPLICATE, True),
    (5, 0, 1 << 32, True),  # low half 0 is valid with ESN
    (6, 0, DUPLICATE, True),
    (7, 1, (1 << 32) + 1, True),
    # case B, below the bottom: read as this subspace, far right; a forger
    # gets this far, but its ICV fails and the window stays put
    (8, SEQ_LO - W + 3, (1 << 32) + SEQ_LO - W + 3, False),
    (9, SEQ_LO - W + 4, (1 << 32) - W + 3, True),  # the bottom edge
    (10, 3, (1 << 32) + 3, True),
    (11, W + 5, (1 << 32) + W + 5, True),  # window back inside one subspace
    (12, SEQ_LO, (2 << 32) - 1, False),  # case A, above the bottom: far right
    (13, 5, (2 << 32) + 5, False),  # case A, below the bottom: wrapped forward
    (14, 6, (1 << 32) + 6, True),  # the bottom edge
    (15, 6, DUPLICATE, True),
    (16, 4, (2 << 32) + 4, False),
]


def test_esn_table() -> None:
    window = ReplayWindow(W, esn=True, top=ESN_START)
    for row, seq_lo, expected, icv_ok in ESN_TABLE:
        assert receive(window, seq_lo, icv_ok) == expected, f"row {row}"
    assert window.top == (1 << 32) + W + 5


def test_esn_refuses_numbers_before_the_start() -> None:
    window = ReplayWindow(W, esn=True)
    assert window.check(SEQ_LO) == TOO_OLD  # would be 2^32 - 1 below zero
    assert window.check(0) == TOO_OLD
    assert window.check(1) == 1


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("size", [1, 64, 100, 4096])
def test_long_in_order_stream(size: int, esn: bool) -> None:
    """Every number once, in order, across many ring turns (and 2^32)."""
    start = (1 << 32) - 5000 if esn else 0
    window = ReplayWindow(size, esn, top=start)
    for seq in range(start + 1, start + 10_000):
        assert receive(window, seq & SEQ_LO) == seq
        assert window.check(seq & SEQ_LO) == DUPLICATE
        assert window.check((seq - size) & SEQ_LO) in (TOO_OLD, seq - size + (1 << 32))


@pytest.mark.parametrize("size", [64, 100, 1000])
def test_gaps_left_by_an_earlier_ring_turn(size: int) -> None:
    """A gap must read as unseen even where the ring slot was used before.

    The set of skipped numbers shifts every 128, so each ring slot is
    reused with bits that a previous turn set at other positions.
    """
    window = ReplayWindow(size, esn=False)
    received = set()
    for seq in range(1, 20 * size):
        if seq % 5 == (seq // 128) % 5:
            continue  # lost on the way, for now
        assert receive(window, seq) == seq
        received.add(seq)
        late = seq - size // 2
        if late > 0 and late not in received:
            assert window.check(late) == late, (seq, late)


def test_window_of_one() -> None:
    window = ReplayWindow(1, esn=False)
    assert receive(window, 10) == 10
    assert window.check(10) == DUPLICATE
    assert window.check(9) == TOO_OLD
    assert receive(window, 11) == 11


def test_check_does_not_update() -> None:
    window = ReplayWindow(W, esn=False)
    assert window.check(5) == 5
    assert window.check(5) == 5
    assert window.top == 0


@pytest.mark.parametrize("size", [0, -1, MAX_WINDOW_SIZE + 1])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(EspConfigError, match="replay window"):
        ReplayWindow(size, esn=True)


@pytest.mark.parametrize("size", [2, 31, 32, 63, 64, 65, 1000, 4096, 8192])
def test_window_sizes(size: int) -> None:
    """Exactly `size` numbers fit, whatever the ring's word count."""
    window = ReplayWindow(size, esn=False)
    top = 3 * size + 77
    receive(window, top)
    assert window.check(top - size + 1) == top - size + 1
    assert window.check(top - size) == TOO_OLD
    for seq in range(top - size + 1, top, 3):
        assert receive(window, seq) == seq
    for seq in range(top - size + 1, top + 1):
        expected = DUPLICATE if (seq - (top - size + 1)) % 3 == 0 or seq == top else seq
        assert window.check(seq) == expected


class Model:
    """RFC 4303 §3.4.3 as a set: the obviously right, slow version."""

    def __init__(self, size: int, esn: bool, top: int) -> None:
        self.size, self.esn, self.top = size, esn, top
        self.seen = {top} if top else set()

    def accepts(self, seq: int) -> bool:
        """Whether the true number `seq` passes check + ICV (App. A2.2)."""
        if seq < 1 or seq in self.seen or seq <= self.top - self.size:
            return False
        # ESN: the receiver can only infer numbers within 2^32 of the bottom
        return not self.esn or seq < self.top - self.size + 1 + (1 << 32)

    def update(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = max(self.top, seq)


steps = st.lists(
    st.tuples(
        st.one_of(
            st.integers(-3, 3),
            st.integers(1, 70),
            st.integers(-300, 300),
            st.integers(-(1 << 33), 1 << 33),
        ),
        st.booleans(),  # whether the packet is genuine (its ICV passes)
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([1, 32, 64, 100, 1024, 4096]),
    esn=st.booleans(),
    start=st.sampled_from([0, 1, 1000, (1 << 32) - 50, (1 << 32) + 5, (7 << 32) - 3]),
    steps=steps,
)
def test_matches_set_model(
    size: int, esn: bool, start: int, steps: list[tuple[int, bool]]
) -> None:
    if not esn:
        start = min(start, SEQ_LO)
    window = ReplayWindow(size, esn, top=start)
    model = Model(size, esn, start)
    limit = (1 << 64) - 1 if esn else SEQ_LO
    seq = start
    for delta, genuine in steps:
        seq = min(max(seq + delta, 0), limit)
        checked = window.check(seq & SEQ_LO)
        # the ICV verifies only if the inferred number is the true one
        passes = checked == seq and genuine
        assert passes == (model.accepts(seq) and genuine), (seq, checked)
        if passes:
            window.update(seq)
            model.update(seq)
        assert window.top == model.top
