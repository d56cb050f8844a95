"""Anti-replay window for inbound ESP SAs (RFC 4303 §3.4.3, RFC 6479).

State: `top`, the highest sequence number that has passed integrity, and a
bitmap of which of `top - size + 1 .. top` have been seen. Receive uses it
in two steps:

    seq = window.check(seq_lo)   # before the ICV: cheap, kills duplicates
    ...verify the ICV with seq...
    window.update(seq)           # only after the ICV passed (§3.4.3)

so a forged packet can never move the window.

The bitmap is a ring of 64-bit words (RFC 6479): sequence number s always
lives in word (s // 64) mod N, bit s mod 64. Moving `top` forward only
clears the words it skips, so nothing is ever shifted and the cost per
packet does not depend on the window size. N is a power of two with at
least one spare word beyond the configured size, so the bits of the window
never share a word with bits that are about to be cleared.

With extended sequence numbers (ESN) only the low 32 bits are on the wire;
`check` infers the high 32 bits from the window position (RFC 4303
Appendix A2.2). A wrong guess makes the ICV fail, and the packet is then
dropped as an integrity failure, which is what the RFC intends.
"""

from __future__ import annotations

from datapath.errors import EspConfigError

WORD_BITS = 64
WORD_SHIFT = 6  # log2(WORD_BITS)
BIT_MASK = WORD_BITS - 1
SEQ_LO_BITS = 32
SEQ_LO_MASK = (1 << SEQ_LO_BITS) - 1
SEQ_HI_MAX = SEQ_LO_MASK
ALL_SEEN = (1 << WORD_BITS) - 1
MAX_WINDOW_SIZE = 1 << 16  # FIXME: arbitrary bound; memory is size/8 bytes

# check() results other than a sequence number (which is always >= 1)
DUPLICATE = -1  # inside the window and already seen
TOO_OLD = -2  # left of the window (or sequence number 0)


def _ring_words(size: int) -> int:
    """Power-of-two word count holding `size` bits plus one spare word."""
    needed = -(-size // WORD_BITS) + 1
    return 1 << (needed - 1).bit_length()


class ReplayWindow:
    """Sliding anti-replay window of `size` sequence numbers."""

    def __init__(self, size: int, esn: bool, top: int = 0) -> None:
        if not 1 <= size <= MAX_WINDOW_SIZE:
            raise EspConfigError(
                f"replay window must be 1..{MAX_WINDOW_SIZE}, got {size}"
            )
        self.size = size
        self.esn = esn
        nwords = _ring_words(size)
        self._ring_mask = nwords - 1
        self._words = [0] * nwords
        self.top = 0
        if top:
            self.reset(top)

    def reset(self, top: int) -> None:
        """Forget everything; `top` counts as the highest number seen."""
        self._words = [0] * len(self._words)
        self.top = top
        self._set_seen(top)

    def restore(self, top: int) -> None:
        """Restart the window after a restart: every number <= `top` is seen.

        Unlike `reset`, which only marks `top` itself, nothing at or below
        `top` is accepted afterwards, so packets received before a restart
        (whose bits were lost) cannot be replayed once. Bits above `top` in
        its word stay clear (the ring invariant `update` relies on).
        """
        self.top = top
        words = self._words
        for i in range(len(words)):
            words[i] = ALL_SEEN
        top_word = (top >> WORD_SHIFT) & self._ring_mask
        words[top_word] = ALL_SEEN >> (BIT_MASK - (top & BIT_MASK))

    def _set_seen(self, seq: int) -> None:
        self._words[(seq >> WORD_SHIFT) & self._ring_mask] |= 1 << (seq & BIT_MASK)

    def check(self, seq_lo: int) -> int:
        """Pre-check a received low sequence half, before the ICV.

        Returns the full sequence number to verify the ICV with (with ESN
        the inferred one), or DUPLICATE / TOO_OLD. Changes nothing.
        """
        top = self.top
        if not self.esn:
            seq = seq_lo
        elif seq_lo > (top_lo := top & SEQ_LO_MASK) >= self.size - 1:
            # the common case: window in one subspace (case A below), packet
            # to its right in the same subspace
            return top - top_lo + seq_lo
        else:
            seq = self.infer_seq(seq_lo)

        if seq > top:
            return seq
        if seq + self.size <= top or seq <= 0:
            # sequence number 0 is never sent (RFC 4303 §3.3.3)
            return TOO_OLD
        if self._words[(seq >> WORD_SHIFT) & self._ring_mask] >> (seq & BIT_MASK) & 1:
            return DUPLICATE
        return seq

    def infer_seq(self, seq_lo: int) -> int:
        """The full sequence number for a received low half (ESN), or TOO_OLD.

        RFC 4303 A2.2: when the window lies within one 2^32 subspace (case
        A), a low half below its bottom means the counter wrapped forward;
        when the window straddles a wrap (case B), a low half at or above the
        bottom belongs to the previous subspace.
        """
        top = self.top
        top_hi = top >> SEQ_LO_BITS
        bottom_lo = (top - self.size + 1) & SEQ_LO_MASK
        if top & SEQ_LO_MASK >= self.size - 1:  # case A
            seq_hi = top_hi if seq_lo >= bottom_lo else top_hi + 1
        else:  # case B
            seq_hi = top_hi - 1 if seq_lo >= bottom_lo else top_hi
        if not 0 <= seq_hi <= SEQ_HI_MAX:
            return TOO_OLD
        return seq_hi << SEQ_LO_BITS | seq_lo

    def update(self, seq: int) -> None:
        """Record `seq` (from `check`) as seen, after its ICV has passed."""
        top = self.top
        if seq > top:
            if seq >> WORD_SHIFT != top >> WORD_SHIFT:
                self._advance(top >> WORD_SHIFT, seq >> WORD_SHIFT)
            self.top = seq
        self._words[(seq >> WORD_SHIFT) & self._ring_mask] |= 1 << (seq & BIT_MASK)

    def _advance(self, top_word: int, new_word: int) -> None:
        """Clear the ring words that the top moves into (RFC 6479 §2)."""
        words = self._words
        skipped = new_word - top_word
        if skipped > self._ring_mask:
            for i in range(len(words)):
                words[i] = 0
            return
        mask = self._ring_mask
        for word in range(top_word + 1, new_word + 1):
            words[word & mask] = 0

    def seen(self, seq: int) -> bool:
        """Whether full sequence number `seq` counts as received (for tests)."""
        if seq > self.top:
            return False
        if seq + self.size <= self.top or seq <= 0:
            return True
        word = self._words[(seq >> WORD_SHIFT) & self._ring_mask]
        return bool(word >> (seq & BIT_MASK) & 1)
