"""Outbound sequence high-water marks: a restart never reuses a nonce."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datapath.esp import OutboundSA, SAConfig
from datapath.seqstore import LOW_WATER, RESERVE, SequenceStore
from moat.errors import MoatError

KEY = os.urandom(20)


def sa(key: bytes = KEY, spi: int = 0x1001) -> OutboundSA:
    return OutboundSA(SAConfig(spi, "aes-gcm-128", key))


def test_restart_continues_after_the_reserved_block(tmp_path: Path) -> None:
    first = sa()
    SequenceStore(tmp_path).attach(first)
    for _ in range(5):
        first.seal(b"\x45" + bytes(19), 4)
    # "restart": a new SA object with the same key continues after the mark
    second = sa()
    SequenceStore(tmp_path).attach(second)
    assert second.seq == RESERVE
    assert second.seal(b"\x45" + bytes(19), 4) != first.seal(b"\x45" + bytes(19), 4)
    (path,) = tmp_path.iterdir()
    assert path.read_text() == f"{2 * RESERVE}\n"
    assert KEY.hex() not in path.name and KEY.hex() not in path.read_text()


def test_new_key_or_spi_starts_at_one(tmp_path: Path) -> None:
    store = SequenceStore(tmp_path)
    store.attach(sa())
    for other in (sa(key=os.urandom(20)), sa(spi=0x1002)):
        store.attach(other)
        assert other.seq == 0
    assert len(list(tmp_path.iterdir())) == 3


def test_poll_reserves_before_the_block_runs_out(tmp_path: Path) -> None:
    store = SequenceStore(tmp_path)
    out = sa()
    store.attach(out)
    out.seq = RESERVE - LOW_WATER - 1
    store.poll(out)
    assert store.reserved[id(out)] == RESERVE
    out.seq = RESERVE - LOW_WATER + 1
    store.poll(out)
    assert store.reserved[id(out)] == out.seq + RESERVE
    assert store.path(out).read_text() == f"{out.seq + RESERVE}\n"


def test_corrupt_mark_is_an_error_not_a_reset(tmp_path: Path) -> None:
    store = SequenceStore(tmp_path)
    out = sa()
    store.path(out).write_text("garbage\n")
    with pytest.raises(MoatError, match="unreadable sequence mark"):
        store.attach(out)
