"""Freeze the `moat` program with PyInstaller (`make payload`).

Every verb module is imported lazily by moat.cli, so PyInstaller's import
analysis cannot see them: they are named as hidden imports, derived from
moat.cli.VERBS, and every submodule of the project's packages is collected, so
a verb added by a new row is frozen without touching this file.

The result is a onedir tree (the default: it runs straight from read-only /usr,
nothing is unpacked at start) or, for comparison, a onefile program.

Size (the slot squashfs is xz-compressed, so what counts is the xz size):
the Python modules are stored uncompressed in the program's archive (zlib
data would not compress again), modules and binaries nothing on the box
imports are left out (EXCLUDES, PRUNE), and every build ends with the frozen
check: `moat VERB --help` for every verb and an import of every module of
the project's packages, run from the frozen tree, so a left-out part that is
needed fails the build instead of the box.
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
    # cffi's Python side builds bindings; cryptography needs only the
    # _cffi_backend extension and pycryptodome falls back to ctypes
    "cffi",
    "pycparser",
    "distutils",
    # TLS: nothing on the box speaks it (urllib3, http.client, smtplib and
    # asyncio import ssl only if it is there); help() and XML-RPC
    "ssl",
    "_ssl",
    "pydoc",
    "xmlrpc",
    # pycryptodome: only its ciphers (DES3) and their modes are used
    "Crypto.PublicKey",
    "Crypto.Math",
    "Crypto.Signature",
    "Crypto.IO",
)

# binaries PyInstaller's hooks collect whatever is imported: the extensions
# of the excluded pycryptodome packages (only their modules load them) and
# the TLS library (only _ssl links it)
PRUNE = (
    "_internal/Crypto/PublicKey/*.so",
    "_internal/Crypto/Math/*.so",
    "_internal/libssl.so.*",
)
# zlib level for the modules in the program's archive: 0 stores them, and
# the slot's xz compresses them far better than zlib would
ARCHIVE_ZLIB_LEVEL = "0"
# the frozen check: every submodule of these is imported
CHECK_ENV = "MOAT_FROZEN_CHECK"


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
    env = dict(os.environ)
    if not onefile:
        env["PYINSTALLER_ZLIB_COMPRESSION_LEVEL"] = ARCHIVE_ZLIB_LEVEL
    subprocess.run(pyinstaller_argv(out, onefile), check=True, cwd=REPO, env=env)
    if not onefile:
        pruned = prune(target)
        print(f"payload: pruned {pruned / 2**20:.1f} MiB of unused binaries")
        frozen_check(target / NAME)
    size = du(target)
    took = time.monotonic() - started
    print(f"payload: {target} ({size / 2**20:.1f} MiB) in {took:.0f} s")
    print("payload: largest files:")
    for path, nbytes in largest(target, 8):
        print(f"  {nbytes / 2**20:6.2f} MiB  {path}")
    return target


def prune(tree: Path) -> int:
    """Delete the PRUNE binaries from a onedir tree; the bytes freed."""
    freed = 0
    for pattern in PRUNE:
        for path in tree.glob(pattern):
            freed += path.stat().st_size
            path.unlink()
    return freed


class FrozenCheckFailed(RuntimeError):
    pass


def frozen_check(program: Path) -> int:
    """Run every verb's --help and import every project module in the
    frozen program; the number of modules imported."""
    for verb in VERBS:
        done = subprocess.run(
            [str(program), verb, "--help"], capture_output=True, text=True
        )
        if done.returncode != 0 or "usage:" not in done.stdout:
            raise FrozenCheckFailed(
                f"frozen `moat {verb} --help` failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-800:]}"
            )
    env = {**os.environ, CHECK_ENV: ",".join(PACKAGES)}
    done = subprocess.run([str(program)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise FrozenCheckFailed(
            f"frozen import check failed: {(done.stderr or done.stdout)[-800:]}"
        )
    count = int(done.stdout.split()[0])
    print(f"payload: frozen check: {len(VERBS)} verbs' --help, {count} modules")
    return count


def largest(tree: Path, count: int) -> list[tuple[str, int]]:
    files = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
    files.sort(key=lambda p: p.stat().st_size, reverse=True)
    return [(str(p.relative_to(tree)), p.stat().st_size) for p in files[:count]]


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
