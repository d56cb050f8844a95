"""The update repository (admin side): TUF metadata over slot images.

Layout of a repository directory (served as-is over HTTP, e.g. by the portal):

    repo.json                    expiry periods and defaults (not served)
    keys/<role>/<keyid>.pem      online private keys: targets, snapshot, timestamp
    metadata/N.root.json         every root version (clients walk N -> N+1)
    metadata/timestamp.json      short-lived, re-signed often (`moat ota timestamp`)
    metadata/N.snapshot.json     consistent snapshots
    metadata/N.targets.json
    targets/<sha256>.<name>      slot images

Root private keys never live in the repository: `keygen` writes them to a
separate directory meant for offline storage, and only `keygen` and
`rotate-root` need it. A new root is signed by a threshold of the old root
keys and of the new ones, so boxes can walk the chain (TUF spec 5.3).
Each target carries custom metadata {"moat": {"product", "board", "version"}}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from moat.durable import atomic_write
from moat.errors import MoatError
from ota.version import parse_version

log = logging.getLogger(__name__)

TOP_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
DEFAULT_EXPIRY = {
    Root.type: timedelta(days=365),
    Targets.type: timedelta(days=90),
    Snapshot.type: timedelta(days=7),
    Timestamp.type: timedelta(days=1),
}
BUNDLE_INDEX = "moat-bundle.json"
BUNDLE_FORMAT = 1
TARGET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_DURATION_RE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RepositoryError(MoatError):
    """The repository or its keys are missing, inconsistent or unusable."""


def parse_duration(text: str) -> timedelta:
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise RepositoryError(f"bad duration {text!r} (use e.g. 30d, 12h, 90m)")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _write_private_key(directory: Path, signer: CryptoSigner) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{signer.public_key.keyid}.pem"
    atomic_write(path, signer.private_bytes, mode=0o600)
    return path


def _load_signer(directory: Path, key: SSlibKey) -> CryptoSigner | None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = directory / f"{key.keyid}.pem"
    if not path.exists():
        return None
    private = load_pem_private_key(path.read_bytes(), password=None)
    return CryptoSigner(private, key)


@dataclass
class Repository:
    """A repository directory and the signing operations on it."""

    path: Path

    @property
    def metadata_dir(self) -> Path:
        return self.path / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.path / "targets"

    def keys_dir(self, role: str) -> Path:
        return self.path / "keys" / role

    # -- reading -------------------------------------------------------------

    def _latest_versioned(self, role: str) -> Path:
        best: tuple[int, Path] | None = None
        for p in self.metadata_dir.glob(f"*.{role}.json"):
            head = p.name.split(".", 1)[0]
            if head.isdigit() and (best is None or int(head) > best[0]):
                best = (int(head), p)
        if best is None:
            raise RepositoryError(f"{self.metadata_dir}: no {role} metadata")
        return best[1]

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_file(str(self._latest_versioned(Root.type)))

    def targets(self) -> Metadata[Targets]:
        return Metadata[Targets].from_file(str(self._latest_versioned(Targets.type)))

    def snapshot(self) -> Metadata[Snapshot]:
        return Metadata[Snapshot].from_file(str(self._latest_versioned(Snapshot.type)))

    def timestamp(self) -> Metadata[Timestamp]:
        return Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))

    def config(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.path / "repo.json").read_text())
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"{self.path}: not a repository ({exc})") from exc
        return data

    def expiry(self, role: str) -> timedelta:
        return timedelta(seconds=int(self.config()["expiry"][role]))

    def root_versions(self) -> list[Path]:
        paths = []
        for p in self.metadata_dir.glob("*.root.json"):
            head = p.name.split(".", 1)[0]
            if head.isdigit():
                paths.append((int(head), p))
        return [p for _, p in sorted(paths)]

    # -- signing -------------------------------------------------------------

    def _signers(self, role: str, root: Root, key_dir: Path | None = None) -> list:
        keys = [root.get_key(k) for k in root.roles[role].keyids]
        signers = []
        for key in keys:
            signer = _load_signer(key_dir or self.keys_dir(role), key)  # type: ignore[arg-type]
            if signer is not None:
                signers.append(signer)
        if len(signers) < root.roles[role].threshold:
            raise RepositoryError(
                f"{role}: have {len(signers)} of the {root.roles[role].threshold} "
                f"keys needed (looked in {key_dir or self.keys_dir(role)})"
            )
        return signers

    def _sign(self, md: Metadata[Any], signers: list) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _write_versioned(self, md: Metadata[Any]) -> None:
        name = f"{md.signed.version}.{md.signed.type}.json"
        atomic_write(self.metadata_dir / name, md.to_bytes())

    def _resign_online(
        self, targets: Metadata[Targets] | None, now: datetime, bump_targets: bool
    ) -> None:
        """Write targets (if given), then a new snapshot and timestamp."""
        root = self.root().signed
        if targets is not None:
            if bump_targets:
                targets.signed.version += 1
            targets.signed.expires = now + self.expiry(Targets.type)
            self._sign(targets, self._signers(Targets.type, root))
            self._write_versioned(targets)
        else:
            targets = self.targets()

        snapshot = self.snapshot()
        snapshot.signed.version += 1
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        snapshot.signed.expires = now + self.expiry(Snapshot.type)
        self._sign(snapshot, self._signers(Snapshot.type, root))
        self._write_versioned(snapshot)
        self._write_timestamp(snapshot.signed.version, now)

    def _write_timestamp(self, snapshot_version: int, now: datetime) -> None:
        root = self.root().signed
        if (self.metadata_dir / "timestamp.json").exists():
            ts = self.timestamp()
            ts.signed.version += 1
        else:
            ts = Metadata(Timestamp())
        ts.signed.snapshot_meta = MetaFile(version=snapshot_version)
        ts.signed.expires = now + self.expiry(Timestamp.type)
        self._sign(ts, self._signers(Timestamp.type, root))
        atomic_write(self.metadata_dir / "timestamp.json", ts.to_bytes())

    # -- operations ----------------------------------------------------------

    def keygen(
        self,
        root_key_dir: Path,
        counts: dict[str, int],
        thresholds: dict[str, int],
        expiry: dict[str, timedelta],
        now: datetime | None = None,
    ) -> None:
        """Create a new repository: keys for every role, version-1 metadata."""
        now = now or _now()
        if (self.path / "repo.json").exists():
            raise RepositoryError(f"{self.path}: repository exists already")
        for role in TOP_ROLES:
            if not 1 <= thresholds[role] <= counts[role]:
                raise RepositoryError(
                    f"{role}: threshold {thresholds[role]} needs 1..{counts[role]} keys"
                )
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.path / "repo.json",
            json.dumps(
                {"expiry": {r: int(expiry[r].total_seconds()) for r in TOP_ROLES}},
                indent=1,
            ).encode(),
        )

        root = Metadata(Root(expires=now + expiry[Root.type]))
        root.signed.consistent_snapshot = True
        signers: dict[str, list[CryptoSigner]] = {}
        for role in TOP_ROLES:
            signers[role] = []
            for _ in range(counts[role]):
                signer = CryptoSigner.generate_ed25519()
                where = root_key_dir if role == Root.type else self.keys_dir(role)
                _write_private_key(where, signer)
                root.signed.add_key(signer.public_key, role)
                signers[role].append(signer)
            root.signed.roles[role].threshold = thresholds[role]
        self._sign(root, signers[Root.type])
        self._write_versioned(root)

        targets = Metadata(Targets(expires=now + expiry[Targets.type]))
        self._sign(targets, signers[Targets.type])
        self._write_versioned(targets)
        snapshot = Metadata(Snapshot(expires=now + expiry[Snapshot.type]))
        self._sign(snapshot, signers[Snapshot.type])
        self._write_versioned(snapshot)
        self._write_timestamp(snapshot.signed.version, now)
        log.info("created repository %s, root keys in %s", self.path, root_key_dir)

    def publish(
        self,
        image: Path,
        product: str,
        board: str,
        version: str,
        now: datetime | None = None,
    ) -> str:
        """Add `image` as a target; returns the target name."""
        now = now or _now()
        parse_version(version)
        for label, value in (("product", product), ("board", board)):
            if not TARGET_NAME_RE.fullmatch(value):
                raise RepositoryError(f"bad {label} {value!r}")
        name = f"{product}-{board}-{version}.img"
        target = TargetFile.from_file(name, str(image), ["sha256"])
        target.unrecognized_fields["custom"] = {
            "moat": {"product": product, "board": board, "version": version}
        }
        digest = target.hashes["sha256"]
        dest = self.targets_dir / f"{digest}.{name}"
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(image, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)

        targets = self.targets()
        targets.signed.targets[name] = target
        self._resign_online(targets, now, bump_targets=True)
        log.info("published %s (%d bytes, sha256 %s)", name, target.length, digest)
        return name

    def refresh_timestamp(self, now: datetime | None = None) -> None:
        """Re-sign snapshot and timestamp so clients keep seeing fresh metadata."""
        self._resign_online(None, now or _now(), bump_targets=False)

    def rotate_root(
        self,
        old_root_key_dir: Path,
        new_root_key_dir: Path,
        count: int,
        threshold: int,
        rotate: tuple[str, ...] = (),
        now: datetime | None = None,
    ) -> int:
        """Root N+1 with fresh root keys (and optionally fresh online keys)."""
        now = now or _now()
        if not 1 <= threshold <= count:
            raise RepositoryError(f"root threshold {threshold} needs 1..{count} keys")
        old = self.root()
        old_signers = self._signers(Root.type, old.signed, old_root_key_dir)
        new = Metadata[Root].from_bytes(old.to_bytes())
        new.signed.version += 1
        new.signed.expires = now + self.expiry(Root.type)

        for keyid in list(new.signed.roles[Root.type].keyids):
            new.signed.revoke_key(keyid, Root.type)
        new_signers = []
        for _ in range(count):
            signer = CryptoSigner.generate_ed25519()
            _write_private_key(new_root_key_dir, signer)
            new.signed.add_key(signer.public_key, Root.type)
            new_signers.append(signer)
        new.signed.roles[Root.type].threshold = threshold

        for role in rotate:
            if role not in ONLINE_ROLES:
                raise RepositoryError(f"cannot rotate {role!r} here")
            n = len(new.signed.roles[role].keyids)
            for keyid in list(new.signed.roles[role].keyids):
                new.signed.revoke_key(keyid, role)
            for _ in range(n):
                signer = CryptoSigner.generate_ed25519()
                _write_private_key(self.keys_dir(role), signer)
                new.signed.add_key(signer.public_key, role)

        # signed by a threshold of the old AND of the new root keys
        self._sign(new, old_signers + new_signers)
        self._write_versioned(new)
        if rotate:
            self._resign_online(self.targets(), now, bump_targets=True)
        log.info("root rotated to version %d", new.signed.version)
        return new.signed.version

    def bundle(self, target_name: str, out: Path) -> None:
        """One file with every root version, the current metadata and the image."""
        targets = self.targets()
        target = targets.signed.targets.get(target_name)
        if target is None:
            raise RepositoryError(f"no target {target_name!r} in the repository")
        snapshot = self.snapshot()
        members: list[tuple[str, Path]] = [
            (f"metadata/{p.name}", p) for p in self.root_versions()
        ]
        members += [
            ("metadata/timestamp.json", self.metadata_dir / "timestamp.json"),
            (
                f"metadata/{snapshot.signed.version}.snapshot.json",
                self._latest_versioned(Snapshot.type),
            ),
            (
                f"metadata/{targets.signed.version}.targets.json",
                self._latest_versioned(Targets.type),
            ),
        ]
        digest = target.hashes["sha256"]
        members.append(
            (
                f"targets/{digest}.{target_name}",
                self.targets_dir / f"{digest}.{target_name}",
            )
        )
        tmp = out.with_name(f".{out.name}.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            index = json.dumps({"format": BUNDLE_FORMAT, "target": target_name})
            _add_bytes(tar, BUNDLE_INDEX, index.encode())
            for arcname, path in members:
                tar.add(str(path), arcname=arcname, recursive=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def describe_metadata(mds: dict[str, Metadata[Any]], now: datetime) -> list[str]:
    """Human-readable lines about roles, keys, expiry and targets."""
    lines: list[str] = []
    root = mds[Root.type].signed
    for role in TOP_ROLES:
        md = mds.get(role)
        if md is None:
            continue
        signed = md.signed
        r = root.roles[role]
        state = "EXPIRED" if signed.is_expired(now) else "valid"
        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
            sigs = f"{len(md.signatures)} signature(s), threshold {r.threshold} met"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            sigs = f"SIGNATURE CHECK FAILED: {exc}"
        lines.append(
            f"{role:<9} v{signed.version:<4} expires {signed.expires:%Y-%m-%d %H:%M}Z"
            f" ({state}); keys {len(r.keyids)}; {sigs}"
        )
    targets = mds.get(Targets.type)
    if targets is not None:
        for name, t in sorted(targets.signed.targets.items()):
            custom = (t.custom or {}).get("moat", {})
            lines.append(
                f"target {name}: {t.length} bytes sha256 {t.hashes.get('sha256', '?')}"
                f" product={custom.get('product')} board={custom.get('board')}"
                f" version={custom.get('version')}"
            )
    return lines


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
