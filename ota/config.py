"""Who this box is and where its update state lives (light: no TUF).

Everything the supervisor needs to prove a slot comes from here and from
ota.bootenv: the board file (/usr/lib/moat/ota.json), the facts the init
script found (/run/moat/boot.env), the boot environment blocks and the
versions that already failed here. The TUF client (ota.client) and
`cryptography` are NOT imported: the supervisor imports this module and must
stay small on a 128 MiB box.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moat.durable import atomic_write
from ota import bootenv
from ota.bootenv import BlockStore

if TYPE_CHECKING:
    from ota.clock import TrustedClock

DEFAULT_TRIES = 3
MAX_FAILED = 20  # versions remembered as failed


@dataclass
class OtaConfig:
    """Where things are on this box (from its board file) and who it is."""

    product: str
    board: str
    version: str
    slots: dict[str, Path]
    bootenv_path: Path
    bootenv_offsets: tuple[int, int]
    state_dir: Path
    trusted_root: Path
    repository_url: str | None = None
    running_slot: str | None = None
    build_time: float = 0.0
    tries: int = DEFAULT_TRIES
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> OtaConfig:
        from moat.errors import ConfigError

        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), "file", str(exc)) from exc
        try:
            facts = read_boot_env(Path(raw.get("boot_env", BOOT_ENV)))
            if "slots" not in raw and facts:
                raw["slots"] = {
                    "a": facts["MOAT_SLOT_A_DEV"],
                    "b": facts["MOAT_SLOT_B_DEV"],
                }
            if "running_slot" not in raw and facts.get("MOAT_SLOT"):
                raw["running_slot"] = facts["MOAT_SLOT"]
            env = raw.get("bootenv") or {"device": facts["MOAT_BOOT_DEV"]}
            if "path" not in env:  # on the box: files on the boot partition
                device = env.get("device") or facts["MOAT_BOOT_DEV"]
                mountpoint = mount_read_only(device, Path(env.get("mount", BOOT_MOUNT)))
                env = {
                    "path": device,
                    "offsets": [
                        bootenv.locate(mountpoint / f)
                        for f in env.get("files", BOOTENV_FILES)
                    ],
                }
            return cls(
                product=raw["product"],
                board=raw["board"],
                version=raw["version"],
                slots={k: Path(v) for k, v in raw["slots"].items()},
                bootenv_path=Path(env["path"]),
                bootenv_offsets=(int(env["offsets"][0]), int(env["offsets"][1])),
                state_dir=Path(raw.get("state_dir", "/var/lib/moat/ota")),
                trusted_root=Path(
                    raw.get("trusted_root", "/usr/lib/moat/ota/root.json")
                ),
                repository_url=raw.get("repository_url"),
                running_slot=raw.get("running_slot"),
                build_time=float(raw.get("build_time", 0)),
                tries=int(raw.get("tries", DEFAULT_TRIES)),
                extra=raw,
            )
        except (
            KeyError,
            TypeError,
            ValueError,
            IndexError,
            OSError,
            subprocess.CalledProcessError,
        ) as exc:
            raise ConfigError(str(path), str(exc), "missing or invalid") from exc
        except bootenv.BootEnvError as exc:
            raise ConfigError(str(path), "bootenv", str(exc)) from exc

    def store(self) -> BlockStore:
        return BlockStore(self.bootenv_path, self.bootenv_offsets)

    def running(self) -> str:
        """The slot this system booted from (kernel command line moat.slot=)."""
        if self.running_slot:
            return self.running_slot
        try:
            for word in Path("/proc/cmdline").read_text().split():
                if word.startswith("moat.slot="):
                    return word.split("=", 1)[1]
        except OSError:
            pass
        return bootenv.load(self.store()).state.good

    def clock(self) -> TrustedClock:
        from ota.clock import TrustedClock

        return TrustedClock(
            self.state_dir / "time-floor",
            build_time=self.build_time,
            sync_flag=Path(self.extra.get("time_synced_flag", "/run/moat/time-synced")),
        )


BOOT_ENV = "/run/moat/boot.env"  # facts the init script found (devices, slot)
BOOT_MOUNT = "/run/moat/boot"
BOOTENV_FILES = ("boot/grub/moatenv0", "boot/grub/moatenv1")


def read_boot_env(path: Path) -> dict[str, str]:
    """NAME=value lines written by the init script; {} when absent (host)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    facts = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            facts[name.strip()] = value.strip().strip("'\"")
    return facts


def mount_read_only(device: str, mountpoint: Path) -> Path:
    """The boot partition mounted read-only (only to find the blocks' offsets)."""
    try:
        mounts = Path("/proc/mounts").read_text().split("\n")
    except OSError:
        mounts = []
    if any(line.split()[1:2] == [str(mountpoint)] for line in mounts if line):
        return mountpoint
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "ext2", "-o", "ro", device, str(mountpoint)],
        check=True,
        capture_output=True,
    )
    return mountpoint


def failed_versions(state_dir: Path) -> list[str]:
    """Versions that failed to prove themselves on this box."""
    try:
        data = json.loads((state_dir / "state.json").read_text())
        return [str(v) for v in data.get("failed", [])]
    except (OSError, ValueError, AttributeError):
        return []


def record_failed(state_dir: Path, version: str) -> None:
    failed = failed_versions(state_dir)
    if version not in failed:
        failed.append(version)
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(
        state_dir / "state.json", json.dumps({"failed": failed[-MAX_FAILED:]}).encode()
    )
