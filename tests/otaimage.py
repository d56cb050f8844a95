"""Slot images and update sources for the OTA tests on the real image.

The session's test image (conftest.py `image`) is built with a throwaway TUF
repository whose root it trusts. `variant_slot` builds another slot squashfs
from the same build tree (hard-linked copy, so only the changed files are
new) with another version and, optionally, another board moat.toml in its
initramfs (a second gzip cpio member appended to the initrd: the kernel
unpacks every member, later files win). `publish` signs it into the
repository; `bundle_drive` pads an offline bundle for use as a raw drive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

from firmware.cpio import CpioWriter
from firmware.image import BOARD_NAME, PRODUCT, SQUASHFS_ARGS
from ota.repository import Repository

SECTOR = 512


def bump(version: str, major: int) -> str:
    """`version` with its first number raised by `major` (1.2.3, 1 -> 2.0.0)."""
    first = int(version.split(".")[0])
    return f"{first + major}.0.0"


def _replace(path: Path, data: bytes) -> None:
    # the tree is hard-linked to the base build: never write through a link
    path.unlink()
    path.write_bytes(data)


def variant_slot(
    work: Path,
    out: Path,
    version: str,
    moat_toml: str | None = None,
    ota_settings: dict[str, object] | None = None,
) -> Path:
    """A slot squashfs like the image's, reporting `version`.

    `work` is the image builder's work directory (work/slot is the slot tree).
    Returns `out`; prints how long mksquashfs took."""
    tree = out.with_suffix(".d")
    if tree.exists():
        shutil.rmtree(tree)
    subprocess.run(["cp", "-al", str(work / "slot"), str(tree)], check=True)

    # the version the slot reports (ota.json, moat-release)
    moat_dir = tree / "usr/lib/moat"
    info = json.loads((moat_dir / "ota.json").read_text())
    info["version"] = version
    info.update(ota_settings or {})
    _replace(moat_dir / "ota.json", (json.dumps(info, indent=2) + "\n").encode())
    release = (tree / "usr/lib/moat-release").read_text().splitlines()
    release = [f"VERSION={version}" if r.startswith("VERSION=") else r for r in release]
    _replace(tree / "usr/lib/moat-release", ("\n".join(release) + "\n").encode())

    # another board configuration: an extra initramfs member overrides it
    if moat_toml is not None:
        buf = io.BytesIO()
        cpio = CpioWriter(buf)
        for d in ("etc", "etc/moat"):
            cpio.directory(d)
        cpio.file("etc/moat/moat.toml", moat_toml.encode())
        cpio.close()
        initrd = tree / "boot/initrd.img"
        base = initrd.read_bytes()
        _replace(initrd, base + gzip.compress(buf.getvalue(), mtime=0))

    started = time.monotonic()
    if out.exists():
        out.unlink()
    subprocess.run(
        ["mksquashfs", str(tree), str(out), *SQUASHFS_ARGS, "-quiet", "-no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(tree)
    print(f"slot {version}: mksquashfs {time.monotonic() - started:.1f} s")
    return out


def publish(repo: Path, slot: Path, version: str) -> str:
    return Repository(repo).publish(slot, PRODUCT, BOARD_NAME, version)


def bundle_drive(repo: Path, target: str, out: Path) -> Path:
    """An offline bundle, padded to whole sectors for a raw QEMU drive."""
    Repository(repo).bundle(target, out)
    size = out.stat().st_size
    with open(out, "r+b") as f:
        f.truncate(-(-size // SECTOR) * SECTOR)
    return out


def slot_digest(image: Path, offset: int, length: int) -> str:
    """sha256 of `length` bytes of `image` at `offset` (a slot's content)."""
    h = hashlib.sha256()
    with open(image, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(1 << 20, left))
            assert chunk, "image shorter than expected"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def env_offsets(image: Path, boot_offset: int) -> tuple[int, int]:
    """Byte offsets in `image` of /boot/grub/moatenv0 and moatenv1."""
    fs = f"{image}?offset={boot_offset}"

    def debugfs(request: str) -> str:
        argv = ["debugfs", "-R", request, fs]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    block_size = int(debugfs("stats").split("Block size:")[1].split()[0])
    first = [
        int(debugfs(f"bmap /boot/grub/{name} 0").split()[0])
        for name in ("moatenv0", "moatenv1")
    ]
    return boot_offset + first[0] * block_size, boot_offset + first[1] * block_size
