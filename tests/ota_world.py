"""A TUF repository and a file-backed box, for the OTA tests."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from ota import bootenv
from ota.client import Installer, Source
from ota.clock import TrustedClock
from ota.config import OtaConfig
from ota.repository import DEFAULT_EXPIRY, TOP_ROLES, Repository

SLOT_SIZE = 1 << 20
BOARD = "pc-x86_64"


class World:
    def __init__(
        self,
        base: Path,
        counts: dict[str, int] | None = None,
        thresholds: dict[str, int] | None = None,
        expiry: dict[str, timedelta] | None = None,
    ) -> None:
        self.base = base
        self.repo = Repository(base / "repo")
        self.root_keys = base / "rootkeys"
        self.repo.keygen(
            self.root_keys,
            {r: 1 for r in TOP_ROLES} | (counts or {}),
            {r: 1 for r in TOP_ROLES} | (thresholds or {}),
            DEFAULT_EXPIRY | (expiry or {}),
        )
        box = base / "box"
        box.mkdir()
        self.box = box
        self.old_image = os.urandom(200_000)
        for s in bootenv.SLOTS:
            (box / f"slot{s}").write_bytes(b"\xff" * SLOT_SIZE)
        with open(box / "slota", "r+b") as f:
            f.write(self.old_image)
        (box / "env").write_bytes(bootenv.initial_blocks("a", "1.0.0"))
        shutil.copy(self.repo.root_versions()[0], box / "root.json")
        self.config = OtaConfig(
            product="moat",
            board=BOARD,
            version="1.0.0",
            slots={s: box / f"slot{s}" for s in bootenv.SLOTS},
            bootenv_path=box / "env",
            bootenv_offsets=(0, bootenv.ENVBLK_SIZE),
            state_dir=box / "var",
            trusted_root=box / "root.json",
            running_slot="a",
        )
        self.messages: list[str] = []
        self.wall: Callable[[], float] = time.time
        self.synced = True

    def installer(self) -> Installer:
        clock = TrustedClock(
            self.config.state_dir / "time-floor",
            synced=lambda: self.synced,
            wall=lambda: self.wall(),
        )
        return Installer(self.config, say=self.messages.append, clock=clock)

    def publish(
        self, version: str, board: str = BOARD, size: int = 300_000
    ) -> tuple[Path, bytes]:
        image = os.urandom(size)
        path = self.base / f"image-{version}-{board}"
        path.write_bytes(image)
        name = self.repo.publish(path, "moat", board, version)
        bundle = self.base / f"bundle-{version}-{board}.moat"
        self.repo.bundle(name, bundle)
        return bundle, image

    def install(self, bundle: Path | None) -> str:
        return self.installer().install(Source(self.config.repository_url, bundle))

    def config_json(self, **extra: object) -> dict[str, object]:
        """The box's ota.json, as `moat ota` / `moat console` read it."""
        cfg = self.config
        return {
            "product": cfg.product,
            "board": cfg.board,
            "version": cfg.version,
            "slots": {k: str(v) for k, v in cfg.slots.items()},
            "bootenv": {
                "path": str(cfg.bootenv_path),
                "offsets": list(cfg.bootenv_offsets),
            },
            "state_dir": str(cfg.state_dir),
            "trusted_root": str(cfg.trusted_root),
        } | extra

    def snapshot_box(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in self.box.iterdir() if p.is_file()}

    def state(self) -> bootenv.BootState:
        return bootenv.load(self.config.store()).state


def rewrite_bundle(
    src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]
) -> None:
    """Copy a bundle, passing each member through `edit` (None: drop it)."""
    with (
        tarfile.open(src) as tin,
        tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout,
    ):
        for m in tin.getmembers():
            f = tin.extractfile(m)
            assert f is not None
            data = edit(m.name, f.read())
            if data is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def edit_json(data: bytes, change: Callable[[dict], None]) -> bytes:
    doc = json.loads(data)
    change(doc)
    return json.dumps(doc).encode()
