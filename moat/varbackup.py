"""The read-only backup of /var: two banks on a raw partition.

Layout of the backup partition (or any file standing in for it): two banks
of equal size, each a 4096-byte header followed by its payload, a gzip'd tar
of /var. A header holds

    magic "MOATVAR1" | sequence u64 | payload length u64 | payload SHA-256
    | written-at u64 (unix time) | header SHA-256 over the fields before it

A commit writes into the bank that does not hold the newest valid backup:
payload first, fsync, then the header, fsync. A power cut at any moment
leaves the newest valid backup untouched (the bank being written fails its
hash check), so restoring always finds the last completed commit, or the one
before it. Restore picks the valid bank with the highest sequence number.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from moat.errors import MoatError

log = logging.getLogger(__name__)

MAGIC = b"MOATVAR1"
HEADER_SIZE = 4096
BANKS = 2
FIELDS = struct.Struct(">8sQQ32sQ")
HEADER_DIGEST_SIZE = 32
# not worth keeping across a restore: volatile or regenerated
EXCLUDE = ("lost+found", "log", "tmp", "run", "cache")


class VarBackupError(MoatError):
    pass


@dataclass(frozen=True)
class Header:
    sequence: int
    length: int
    digest: bytes
    written_at: int

    def encode(self) -> bytes:
        fields = FIELDS.pack(
            MAGIC, self.sequence, self.length, self.digest, self.written_at
        )
        header = fields + hashlib.sha256(fields).digest()
        return header + b"\0" * (HEADER_SIZE - len(header))

    @classmethod
    def decode(cls, block: bytes) -> Header | None:
        """The header in block, or None if it is blank, torn or foreign."""
        end = FIELDS.size + HEADER_DIGEST_SIZE
        if len(block) < end:
            return None
        fields, digest = block[: FIELDS.size], block[FIELDS.size : end]
        if hashlib.sha256(fields).digest() != digest:
            return None
        magic, sequence, length, payload_digest, written_at = FIELDS.unpack(fields)
        if magic != MAGIC:
            return None
        return cls(sequence, length, payload_digest, written_at)


@dataclass(frozen=True)
class Bank:
    index: int
    offset: int
    size: int
    header: Header | None
    valid: bool  # header and payload hash both check out


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _read_at(fd: int, offset: int, size: int) -> bytes:
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _write_at(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def banks(fd: int) -> list[Bank]:
    bank_size = device_size(fd) // BANKS // HEADER_SIZE * HEADER_SIZE
    if bank_size <= HEADER_SIZE:
        raise VarBackupError("backup device too small for two banks")
    result = []
    for index in range(BANKS):
        offset = index * bank_size
        header = Header.decode(_read_at(fd, offset, HEADER_SIZE))
        valid = False
        if header is not None and header.length <= bank_size - HEADER_SIZE:
            payload = _read_at(fd, offset + HEADER_SIZE, header.length)
            valid = hashlib.sha256(payload).digest() == header.digest
        result.append(Bank(index, offset, bank_size, header, valid))
    return result


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove_tree(child)
        path.rmdir()
    else:
        path.unlink()


def newest(all_banks: list[Bank]) -> Bank | None:
    good = [b for b in all_banks if b.valid and b.header is not None]
    return max(good, key=lambda b: b.header.sequence if b.header else 0, default=None)


def pack_tree(root: Path) -> bytes:
    """A gzip'd tar of root's contents, without the EXCLUDE entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for entry in sorted(root.iterdir()):
            if entry.name in EXCLUDE:
                continue
            tar.add(entry, arcname=entry.name)
    return buf.getvalue()


def write_backup(fd: int, payload: bytes, now: float | None = None) -> Bank:
    """Commit payload to the bank not holding the newest backup."""
    all_banks = banks(fd)
    current = newest(all_banks)
    target = all_banks[0] if current is None else all_banks[1 - current.index]
    room = target.size - HEADER_SIZE
    if len(payload) > room:
        raise VarBackupError(
            f"/var backup of {len(payload)} bytes does not fit a bank ({room})"
        )
    sequence = current.header.sequence + 1 if current and current.header else 1
    header = Header(
        sequence,
        len(payload),
        hashlib.sha256(payload).digest(),
        int(time.time() if now is None else now),
    )

    # payload first, header last: the header is the commit
    _write_at(fd, target.offset + HEADER_SIZE, payload)
    os.fsync(fd)
    _write_at(fd, target.offset, header.encode())
    os.fsync(fd)
    return Bank(target.index, target.offset, target.size, header, True)


def read_backup(fd: int) -> tuple[Bank, bytes]:
    bank = newest(banks(fd))
    if bank is None or bank.header is None:
        raise VarBackupError("no valid /var backup in either bank")
    return bank, _read_at(fd, bank.offset + HEADER_SIZE, bank.header.length)


def commit(var: Path, device: Path) -> Bank:
    payload = pack_tree(var)
    fd = os.open(device, os.O_RDWR)
    try:
        return write_backup(fd, payload)
    finally:
        os.close(fd)


def restore(device: Path, target: Path, replace: bool = False) -> Bank:
    """Unpack the newest valid backup into target (an empty /var at boot).

    replace: first remove what target holds beyond the EXCLUDE entries, so
    files made or changed since the backup are gone or back as they were (the
    backup is read and checked before anything is removed)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        bank, payload = read_backup(fd)
    finally:
        os.close(fd)
    if replace:
        for entry in sorted(target.iterdir()):
            if entry.name not in EXCLUDE:
                _remove_tree(entry)
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
        tar.extractall(target, filter="tar")
    os.sync()
    return bank
