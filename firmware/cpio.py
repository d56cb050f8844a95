"""A newc cpio writer for the initramfs: every entry owned by root, fixed
times, device nodes without needing root on the build host."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
MTIME = 0


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self.ino,
            mode,
            0,  # uid
            0,  # gid
            1,  # nlink
            MTIME,
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        header = NEWC_MAGIC + b"".join(b"%08x" % f for f in fields)
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, b"", (0, 0))

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data, (0, 0))

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode(), (0, 0))

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, b"", (major, minor))

    def tree(self, root: Path) -> None:
        """Add every entry below root, parents before children."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(dirpath) / name
                rel = str(path.relative_to(root))
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(rel, os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    self.directory(rel, stat.S_IMODE(st.st_mode))
                else:
                    self.file(rel, path.read_bytes(), stat.S_IMODE(st.st_mode))

    def close(self) -> None:
        self._entry(TRAILER, 0, b"", (0, 0))
