from __future__ import annotations

import os
from pathlib import Path

import pytest

from moat.durable import atomic_write


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "leases"
    atomic_write(target, b"old")
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["leases"]


def test_failed_write_leaves_old_content_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "zone"
    atomic_write(target, b"good")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(target, b"bad")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["zone"]
