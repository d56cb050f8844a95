"""Freeze the `moat` program with PyInstaller (`make payload`).

Every verb module is imported lazily by moat.cli, so PyInstaller's import
analysis cannot see them: they are named as hidden imports, derived from
moat.cli.VERBS, and every submodule of the project's packages is collected, so
a verb added by a new row is frozen without touching this file.

The result is a onedir tree (the default: it runs straight from read-only /usr,
nothing is unpacked at start) or, for comparison, a onefile program.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from moat.cli import VERBS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("moat", "datapath", "services", "portal", "ota")
ENTRY = Path(__file__).with_name("payload_entry.py")
NAME = "moat"

# never needed on the box, large, or host-only tooling
EXCLUDES = (
    "tkinter",
    "_tkinter",
    "idlelib",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "test",
    "unittest",
    "pytest",
    "_pytest",
    "hypothesis",
    "mypy",
    "setuptools",
    "pip",
    "PyInstaller",
    # interactive line editing and East Asian codecs: unused on the box
    "readline",
    "_codecs_cn",
    "_codecs_hk",
    "_codecs_iso2022",
    "_codecs_jp",
    "_codecs_kr",
    "_codecs_tw",
)


def hidden_imports() -> list[str]:
    """The verb modules moat.cli imports by name at run time."""
    return sorted({module for module, _ in VERBS.values()})


def pyinstaller_argv(out: Path, onefile: bool) -> list[str]:
    work = out / "work"
    argv = [
        sys.executable,
        "-m",
        "PyInstaller",
        "--noconfirm",
        "--clean",
        "--log-level=WARN",
        "--name",
        NAME,
        "--onefile" if onefile else "--onedir",
        "--distpath",
        str(out / "dist"),
        "--workpath",
        str(work),
        "--specpath",
        str(work),
        "--paths",
        str(REPO),
        "--strip",
    ]
    for package in PACKAGES:
        argv += ["--collect-submodules", package]
    for module in hidden_imports():
        argv += ["--hidden-import", module]
    for module in EXCLUDES:
        argv += ["--exclude-module", module]
    return [*argv, str(ENTRY)]


def build(out: Path, onefile: bool = False) -> Path:
    """Freeze into out/dist; return the program (onefile) or its directory."""
    target = out / "dist" / NAME
    if target.exists():
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    kind = "onefile" if onefile else "onedir"
    print(f"payload: PyInstaller {kind}, {len(hidden_imports())} verb modules ...")
    started = time.monotonic()
    subprocess.run(pyinstaller_argv(out, onefile), check=True, cwd=REPO)
    size = du(target)
    took = time.monotonic() - started
    print(f"payload: {target} ({size / 2**20:.1f} MiB) in {took:.0f} s")
    return target


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "payload")
    parser.add_argument("--onefile", action="store_true", help="one file, unpacked")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    build(args.out, args.onefile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
