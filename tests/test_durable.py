from __future__ import annotations

import os
from pathlib import Path

import pytest

from moat.durable import atomic_write, atomic_write_many


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


def test_atomic_write_many(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"old")
    items = [(tmp_path / name, name.encode() * 3, 0o600) for name in "abc"]
    atomic_write_many(items)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        "a": b"aaa",
        "b": b"bbb",
        "c": b"ccc",
    }
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o600
    # a failure before the renames leaves every old file and no temp file
    bad = [(tmp_path / "a", b"new", 0o600), (tmp_path / "no" / "x", b"", 0o600)]
    with pytest.raises(FileNotFoundError):
        atomic_write_many(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    assert (tmp_path / "a").read_bytes() == b"aaa"
