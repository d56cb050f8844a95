"""`make flash DEVICE=...`: write the image to a disk, carefully.

Refuses a device that is (or has a partition) mounted or used as swap, the
disk holding the running system's / or /boot, and a device smaller than the
image; then asks the person to type the device name before writing.
A regular file is accepted as the target (a disk image), which is how the
refusal logic is tested without a real disk.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 4 * 2**20
SYSTEM_MOUNTS = ("/", "/boot", "/usr", "/var", "/boot/efi")


class FlashRefused(Exception):
    pass


@dataclass(frozen=True)
class Target:
    path: Path
    size: int
    block: bool
    name: str  # kernel name (sda) of a block device, else ""


def _kernel_name(rdev: int) -> str:
    link = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    try:
        return link.resolve().name
    except OSError:
        return ""


def disk_of(name: str, sys_block: Path = Path("/sys/class/block")) -> str:
    """The whole disk a kernel block name belongs to (sda1 -> sda)."""
    entry = sys_block / name
    if (entry / "partition").exists():
        return entry.resolve().parent.name
    return name


def inspect(path: Path) -> Target:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FlashRefused(f"{path}: {exc.strerror}") from exc
    if stat.S_ISREG(st.st_mode):
        return Target(path, st.st_size, False, "")
    if not stat.S_ISBLK(st.st_mode):
        raise FlashRefused(f"{path} is neither a block device nor a file")
    name = _kernel_name(st.st_rdev)
    try:
        # sysfs counts 512-byte sectors whatever the device's block size
        size = int((Path("/sys/class/block") / name / "size").read_text()) * 512
    except (OSError, ValueError):
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
        except OSError as exc:
            raise FlashRefused(f"{path}: {exc.strerror}") from exc
    return Target(path, size, True, name)


def mounted_disks(mounts: str, disk: Callable[[str], str]) -> dict[str, str]:
    """Whole-disk name -> a mount point on it, from /proc/mounts text."""
    found: dict[str, str] = {}
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].startswith("/dev/"):
            continue
        try:
            name = _kernel_name(os.stat(fields[0]).st_rdev)
        except OSError:
            name = Path(fields[0]).name
        found.setdefault(disk(name), fields[1])
    return found


def swap_disks(swaps: str, disk: Callable[[str], str]) -> set[str]:
    return {
        disk(Path(line.split()[0]).name)
        for line in swaps.splitlines()[1:]
        if line.startswith("/dev/")
    }


def check(
    target: Target,
    image_size: int,
    mounts: str,
    swaps: str = "",
    disk: Callable[[str], str] = disk_of,
) -> None:
    """Raise FlashRefused unless writing the image to target is safe."""
    if target.block:
        whole = disk(target.name)
        used = mounted_disks(mounts, disk)
        if whole in used:
            mount_point = used[whole]
            if mount_point in SYSTEM_MOUNTS:
                raise FlashRefused(
                    f"{target.path} holds the running system ({mount_point})"
                )
            raise FlashRefused(f"{target.path} is mounted on {mount_point}")
        if whole in swap_disks(swaps, disk):
            raise FlashRefused(f"{target.path} is in use as swap")
    else:
        for line in mounts.splitlines():
            fields = line.split()
            if len(fields) >= 2 and Path(fields[0]) == target.path:
                raise FlashRefused(f"{target.path} is mounted on {fields[1]}")
    if target.block and target.size < image_size:
        raise FlashRefused(
            f"{target.path} has {target.size} bytes, the image {image_size}"
        )


def confirm(target: Target, answer: str) -> bool:
    return answer.strip() == str(target.path)


def write(image: Path, target: Target) -> None:
    total = image.stat().st_size
    done = 0
    flags = os.O_WRONLY | (0 if target.block else os.O_CREAT)
    fd = os.open(target.path, flags)
    try:
        with open(image, "rb") as src:
            while chunk := src.read(CHUNK):
                os.write(fd, chunk)
                done += len(chunk)
                print(f"\rflash: {done * 100 // total:3d}%", end="", flush=True)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"\nflash: wrote {total} bytes to {target.path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("device", type=Path)
    parser.add_argument("--yes", action="store_true", help="do not ask")
    args = parser.parse_args(argv)
    try:
        target = inspect(args.device)
        mounts = Path("/proc/mounts").read_text()
        swaps = Path("/proc/swaps").read_text() if Path("/proc/swaps").exists() else ""
        check(target, args.image.stat().st_size, mounts, swaps)
    except FlashRefused as exc:
        print(f"flash: refused: {exc}", file=sys.stderr)
        return 1
    if not args.yes:
        print(f"flash: this ERASES {target.path} ({target.size / 2**30:.1f} GiB).")
        print(f"flash: type {target.path} to go on: ", end="", flush=True)
        if not confirm(target, sys.stdin.readline()):
            print("flash: not confirmed, nothing written", file=sys.stderr)
            return 1
    write(args.image, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
