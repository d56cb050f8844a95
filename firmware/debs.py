"""Debian binary packages: download once into a cache, unpack into a tree.

`apt-get download` fetches the exact versions the build host's apt lists
name (Debian 12, the same as the host that freezes the payload, so the
payload's glibc needs are met). The cache survives between builds
(build/debs, or $MOAT_DEB_CACHE), so a repeated build downloads nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from firmware.layout import REPO

CACHE = Path(os.environ.get("MOAT_DEB_CACHE", REPO / "build" / "debs"))
KERNEL_META = "linux-image-amd64"


class DebError(RuntimeError):
    pass


def _apt(*argv: str, cwd: Path | None = None) -> str:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(
        ["apt-get", "-q", *argv],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise DebError(f"apt-get {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def candidate(package: str) -> str:
    """The version apt would install (empty if unknown: run apt-get update)."""
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"Candidate:\s*(\S+)", out)
    return match.group(1) if match and match.group(1) != "(none)" else ""


def kernel_package() -> str:
    """The versioned image package linux-image-amd64 depends on."""
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_META], capture_output=True, text=True
    ).stdout
    match = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not match:
        raise DebError(f"cannot resolve {KERNEL_META}: is apt-get update done?")
    return match.group(1)


def resolve(packages: list[str]) -> list[str]:
    return [kernel_package() if p == KERNEL_META else p for p in packages]


def candidates(packages: list[str]) -> dict[str, str]:
    """Package -> candidate version, in one apt-cache call."""
    out = subprocess.run(
        ["apt-cache", "policy", *packages], capture_output=True, text=True, check=False
    ).stdout
    found: dict[str, str] = {}
    name = ""
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            name = line[:-1]
        match = re.match(r"\s+Candidate:\s*(\S+)", line)
        if match and name and match.group(1) != "(none)":
            found[name] = match.group(1)
    return found


def _cached(package: str, version: str) -> Path | None:
    quoted = version.replace(":", "%3a")
    for path in CACHE.glob(f"{package}_*.deb"):
        if path.name.split("_")[1] in (version, quoted):
            return path
    return None


def download(packages: list[str]) -> dict[str, Path]:
    """package -> .deb in the cache, downloading only what is missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not candidate("libc6"):
        _apt("update")
    found: dict[str, Path] = {}
    missing = []
    versions = candidates(packages)
    for package in packages:
        version = versions.get(package, "")
        if not version:
            raise DebError(f"apt knows no package {package}")
        deb = _cached(package, version)
        if deb:
            found[package] = deb
        else:
            missing.append(package)
    if missing:
        print(f"debs: apt-get download {len(missing)} packages into {CACHE}")
        _apt("download", *missing, cwd=CACHE)
        for package in missing:
            deb = _cached(package, versions[package])
            if deb is None:
                raise DebError(f"apt-get download {package} left no .deb")
            found[package] = deb
    return found


def version_of(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True
    ).stdout.strip()


def unpack(debs: dict[str, Path], into: Path) -> None:
    """Unpack every .deb into `into`, unless it already holds exactly them."""
    stamp = into / ".moat-debs"
    names = "\n".join(sorted(deb.name for deb in debs.values())) + "\n"
    if stamp.exists() and stamp.read_text() == names:
        print(f"debs: {into} is up to date")
        return
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    for deb in debs.values():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    stamp.write_text(names)
