"""The portal's moat database: a directory, one TOML file per moat.

    DB/portal.toml        portal settings (portal/settings.py)
    DB/moats/<id>.toml    one record per moat (portal/record.py), mode 0600
    DB/keys/<fingerprint> "id type base64" for the ssh key lookup, mode 0644;
                          named by the key's SHA256 fingerprint as sshd's %f
                          prints it, without "SHA256:" and with "/" as "_"
    DB/.index.json        cache of parsed records, keyed by file identity
    DB/.lock              byte-range locks: one byte per id hash, byte 0 for
                          allocation (numbers, subnets)

Every write goes through moat.durable.atomic_write, so a reader or a power
cut sees the old record or the new one. Every record carries a version; an
update names the version it was based on and is refused (StaleRecord) if the
file has moved on since, so two concurrent updates cannot lose one. The
read-compare-write runs under the id's lock.

Loading: parsing TOML costs ~120 us a record (100,000 records: 12 s), so
load_all keeps a JSON cache of the parsed records keyed by (mtime, size,
inode) and parses only files that changed since. Records that fail
validation, or conflict with an earlier one (same number, key, overlapping
subnet, same static address), are reported as problems and skipped.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tomllib
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moat.durable import atomic_write, atomic_write_many, fsync_dir
from moat.errors import MoatError
from portal.record import (
    WILD_DHCP,
    MoatRecord,
    RecordError,
    record_from_dict,
    record_from_trusted,
    record_to_index,
    record_to_toml,
)

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".toml"
INDEX_FORMAT = 2
LOCK_BYTES = 1 << 16  # id hashes spread over this many lock bytes
ALLOCATION_LOCK = 0


class NoSuchMoat(MoatError):
    pass


class StaleRecord(MoatError):
    """The record changed since the caller read it; re-read and retry."""


class Conflict(MoatError):
    """A new or changed record collides with another moat."""


@dataclass
class Snapshot:
    """All valid records, plus the files that were skipped and why."""

    records: dict[str, MoatRecord] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def key_file_name(blob_b64: str) -> str | None:
    """keys/ file name for a base64 key blob (sshd's %k); None if not base64."""
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except ValueError:
        return None
    fingerprint = base64.b64encode(hashlib.sha256(blob).digest()).rstrip(b"=")
    return fingerprint.decode().replace("/", "_")


def record_conflict(rec: MoatRecord, others: Iterable[MoatRecord]) -> str | None:
    """Why `rec` cannot sit beside `others` (each with another id), or None."""
    for other in others:
        if other.id == rec.id:
            continue
        if other.number == rec.number:
            return f"number {rec.number} already used by {other.id}"
        if other.ssh_key == rec.ssh_key:
            return f"ssh key already used by {other.id}"
        if other.subnet.overlaps(rec.subnet):
            return f"subnet {rec.subnet} overlaps {other.id}'s {other.subnet}"
        if rec.wild != WILD_DHCP and other.wild == rec.wild:
            return f"static address {rec.wild} already used by {other.id}"
    return None


def drop_conflicts(
    records: list[MoatRecord],
) -> tuple[list[MoatRecord], dict[str, str]]:
    """Keep the first of each colliding set (by id); O(n log n) for subnets."""
    kept: list[MoatRecord] = []
    problems: dict[str, str] = {}
    numbers: dict[int, str] = {}
    keys: dict[str, str] = {}
    statics: dict[str, str] = {}
    for rec in sorted(records, key=lambda r: r.id):
        why = None
        if rec.number in numbers:
            why = f"number {rec.number} already used by {numbers[rec.number]}"
        elif rec.ssh_key in keys:
            why = f"ssh key already used by {keys[rec.ssh_key]}"
        elif rec.wild != WILD_DHCP and rec.wild in statics:
            why = f"static address {rec.wild} already used by {statics[rec.wild]}"
        if why:
            problems[rec.id] = why
            continue
        numbers[rec.number] = rec.id
        keys[rec.ssh_key] = rec.id
        if rec.wild != WILD_DHCP:
            statics[rec.wild] = rec.id
        kept.append(rec)

    # subnets: sorted by start, a subnet overlapping an earlier one loses
    reach = -1
    owner = ""
    losers: set[str] = set()
    for rec in sorted(kept, key=lambda r: (int(r.subnet.network_address), r.id)):
        if int(rec.subnet.network_address) <= reach:
            losers.add(rec.id)
            problems[rec.id] = f"subnet {rec.subnet} overlaps {owner}'s"
            continue
        reach = int(rec.subnet.broadcast_address)
        owner = rec.id
    return [r for r in kept if r.id not in losers], problems


class Database:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.moats_dir = self.root / "moats"
        self.keys_dir = self.root / "keys"
        self.index_path = self.root / ".index.json"
        self.lock_path = self.root / ".lock"

    def create_layout(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.moats_dir.mkdir(mode=0o700, exist_ok=True)
        self.keys_dir.mkdir(mode=0o755, exist_ok=True)

    def exists(self) -> bool:
        return self.moats_dir.is_dir()

    def path(self, moat_id: str) -> Path:
        return self.moats_dir / f"{moat_id}{RECORD_SUFFIX}"

    # --- locking ---------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, offset: int) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _lock_many(self, offsets: Iterable[int]) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for offset in sorted(set(offsets)):  # one order: no deadlock
                fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            yield
        finally:
            os.close(fd)  # releases every lock

    def lock_id(self, moat_id: str) -> contextlib.AbstractContextManager[None]:
        return self._lock(_id_lock_offset(moat_id))

    def lock_allocation(self) -> contextlib.AbstractContextManager[None]:
        return self._lock(ALLOCATION_LOCK)

    # --- single records --------------------------------------------------------

    def get(self, moat_id: str) -> MoatRecord:
        path = self.path(moat_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NoSuchMoat(f"no moat {moat_id!r} in {self.root}") from None
        return parse_record_file(path.name, data)

    def _write(self, rec: MoatRecord) -> None:
        atomic_write(self.path(rec.id), record_to_toml(rec).encode(), mode=0o600)

    def _write_key(self, rec: MoatRecord) -> None:
        line = f"{rec.id} {rec.ssh_key}\n".encode()
        atomic_write(self._key_path(rec), line, mode=0o644)

    def _key_path(self, rec: MoatRecord) -> Path:
        name = key_file_name(rec.key_blob)
        if name is None:
            raise RecordError(f"{rec.id}.toml", "ssh_key", "not base64")
        return self.keys_dir / name

    def _remove_key(self, rec: MoatRecord) -> None:
        path = self._key_path(rec)
        with contextlib.suppress(FileNotFoundError):
            if path.read_text().split()[0] == rec.id:
                path.unlink()

    def create(self, rec: MoatRecord) -> MoatRecord:
        """Write a new record (version 1); caller holds lock_allocation."""
        new = rec.replace(version=1)
        with self.lock_id(rec.id):
            if self.path(rec.id).exists():
                raise Conflict(f"moat {rec.id!r} already exists")
            self._write(new)
            self._write_key(new)
        log.info("moat %s created (subnet %s)", rec.id, rec.subnet)
        return new

    def update(self, rec: MoatRecord, base_version: int) -> MoatRecord:
        """Compare-and-swap: write `rec` if the file is still at base_version."""
        with self.lock_id(rec.id):
            current = self.get(rec.id)
            if current.version != base_version:
                raise StaleRecord(
                    f"moat {rec.id}: record is at version {current.version},"
                    f" update was based on {base_version}"
                )
            new = rec.replace(version=base_version + 1)
            self._write(new)
            if current.ssh_key != new.ssh_key:
                self._remove_key(current)
                self._write_key(new)
        return new

    def modify_many(
        self, ids: Iterable[str], change: Callable[[MoatRecord], MoatRecord]
    ) -> dict[str, MoatRecord | MoatError]:
        """Read, change and write several records under their locks at once.

        Each record is read under its id's lock (so no concurrent update can
        slip in), `change` gives the new record (or raises MoatError: that
        moat's result), and every new record is written in one group commit
        with its version advanced. The ssh key must not change here.
        """
        wanted = list(dict.fromkeys(ids))
        results: dict[str, MoatRecord | MoatError] = {}
        with self._lock_many(_id_lock_offset(i) for i in wanted):
            for moat_id in wanted:
                try:
                    current = self.get(moat_id)
                    new = change(current)
                    if new.id != moat_id or new.ssh_key != current.ssh_key:
                        raise MoatError(f"moat {moat_id}: id or key may not change")
                    results[moat_id] = new.replace(version=current.version + 1)
                except MoatError as exc:
                    results[moat_id] = exc
            written = [r for r in results.values() if isinstance(r, MoatRecord)]
            atomic_write_many(
                [(self.path(r.id), record_to_toml(r).encode(), 0o600) for r in written]
            )
        return results

    def remove(self, moat_id: str) -> MoatRecord:
        with self.lock_id(moat_id):
            current = self.get(moat_id)
            self._remove_key(current)
            self.path(moat_id).unlink()
            fsync_dir(self.moats_dir)
        log.info("moat %s removed", moat_id)
        return current

    def rebuild_keys(self) -> int:
        """Rewrite keys/ from the valid records (and drop any other file there:
        older layouts, removed moats); returns how many keys it holds."""
        records = self.load_all(write_index=False).records.values()
        wanted = {self._key_path(rec).name: rec for rec in records}
        for entry in os.scandir(self.keys_dir):
            if entry.name not in wanted:
                os.unlink(entry.path)
        for name, rec in wanted.items():
            line = f"{rec.id} {rec.ssh_key}\n".encode()
            try:
                if (self.keys_dir / name).read_bytes() == line:
                    continue
            except FileNotFoundError:
                pass
            self._write_key(rec)
        fsync_dir(self.keys_dir)
        return len(wanted)

    def id_for_key(self, blob_b64: str) -> str | None:
        """The moat whose ssh key blob is `blob_b64` (sshd's %k), if any."""
        name = key_file_name(blob_b64)
        if name is None:
            return None
        try:
            text = (self.keys_dir / name).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        parts = text.split()
        if len(parts) != 3 or parts[2] != blob_b64:
            return None
        return parts[0]

    # --- everything ------------------------------------------------------------

    def _read_index(self) -> dict[str, list[Any]]:
        try:
            index = json.loads(self.index_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            return {}
        entries = index.get("entries")
        return entries if isinstance(entries, dict) else {}

    def load_all(self, write_index: bool = True) -> Snapshot:
        """Every valid record; invalid or conflicting files land in problems."""
        cached = self._read_index()
        entries: dict[str, list[Any]] = {}
        dirty = False
        snap = Snapshot()
        parsed: list[MoatRecord] = []
        try:
            dir_entries = list(os.scandir(self.moats_dir))
        except FileNotFoundError:
            raise NoSuchMoat(f"{self.root} is not a portal database") from None

        # parse what changed since the index was written
        for entry in dir_entries:
            name = entry.name
            if not name.endswith(RECORD_SUFFIX) or name.startswith("."):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            stamp = [st.st_mtime_ns, st.st_size, st.st_ino]
            old = cached.get(name)
            if old is not None and old[:3] == stamp:
                entry_data = old
            else:
                dirty = True
                entry_data = stamp + list(_parse_for_index(Path(entry.path)))
            entries[name] = entry_data
            data, problem = entry_data[3], entry_data[4]
            if problem is None:
                try:
                    parsed.append(record_from_trusted(data))
                except (KeyError, TypeError, ValueError, AttributeError):
                    # a damaged cache entry: read the file itself
                    dirty = True
                    entry_data = stamp + list(_parse_for_index(Path(entry.path)))
                    entries[name] = entry_data
                    problem = entry_data[4]
                    if problem is None:
                        parsed.append(record_from_trusted(entry_data[3]))
            if problem is not None:
                snap.problems[name] = problem
        if set(cached) - set(entries):
            dirty = True

        # cross-record rules
        kept, conflicts = drop_conflicts(parsed)
        for moat_id, why in conflicts.items():
            snap.problems[f"{moat_id}{RECORD_SUFFIX}"] = why
        snap.records = {rec.id: rec for rec in kept}
        for name, why in sorted(snap.problems.items()):
            log.warning("moat record %s skipped: %s", name, why)

        if dirty and write_index:
            self._write_index(entries)
        return snap

    def _write_index(self, entries: dict[str, list[Any]]) -> None:
        data = json.dumps({"format": INDEX_FORMAT, "entries": entries}).encode()
        try:
            atomic_write(self.index_path, data, mode=0o600)
        except OSError as exc:  # a cache: never fatal
            log.warning("could not write %s: %s", self.index_path, exc)


def _id_lock_offset(moat_id: str) -> int:
    return 1 + zlib.crc32(moat_id.encode()) % (LOCK_BYTES - 1)


def parse_record_file(name: str, data: bytes) -> MoatRecord:
    try:
        doc = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(name, "file", f"not valid TOML: {exc}") from None
    rec = record_from_dict(doc, name)
    if f"{rec.id}{RECORD_SUFFIX}" != name:
        raise RecordError(name, "id", f"{rec.id!r} does not match the file name")
    return rec


def _parse_for_index(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(JSON-able record, None) or (None, problem) for the index cache."""
    try:
        rec = parse_record_file(path.name, path.read_bytes())
    except RecordError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"{path.name}: unreadable: {exc.strerror}"
    return record_to_index(rec), None
