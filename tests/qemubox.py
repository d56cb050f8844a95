"""Drive a Moat image under QEMU (TCG) over its serial console.

`Box` starts qemu-system-x86_64 headless with the serial port on stdio and
talks to it with pexpect: wait for console lines, run shell commands when the
image was booted with moat.shell=1, and pull the power (SIGKILL).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pexpect

from firmware import layout
from moat import grubenv

READY = "moat ready"
PROMPT = "moat# "


def qemu_argv(
    image: Path,
    memory_mib: int = 128,
    nics: int = 2,
    reboot: bool = False,
    extra: Sequence[str] = (),
    wild: str = "",
    raw_serial: bool = False,
) -> list[str]:
    """reboot=True: a guest reboot restarts the box in the same QEMU (the
    serial line goes on), else QEMU exits. extra: more QEMU arguments.
    wild: more options for the first (wild) NIC, e.g. a guestfwd rule.
    raw_serial: Ctrl-C, Ctrl-\\ and Ctrl-Z go to the box's serial port
    instead of signalling QEMU."""
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        str(memory_mib),
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        *([] if reboot else ["-no-reboot"]),
        "-drive",
        f"file={image},format=raw,if=virtio,cache=writeback",
    ]
    if raw_serial:
        i = argv.index("-serial")
        argv[i : i + 2] = [
            *("-chardev", "stdio,id=ttyS0,signal=off"),
            *("-serial", "chardev:ttyS0"),
        ]
    for n in range(nics):
        # user-mode NICs with no host forwards: nothing reaches the host
        more = f",{wild}" if wild and n == 0 else ""
        argv += ["-nic", f"user,model=virtio-net-pci,restrict=on{more}"]
    return argv + list(extra)


def boot_env_offset(image: Path, name: str = "/boot/grub/grubenv") -> int:
    """Byte offset of a file of the boot partition (default: GRUB's
    environment) inside the image, for in-place edits."""
    boot = layout.partitions()["boot"]
    out = subprocess.run(
        ["debugfs", "-R", f"blocks {name}", f"{image}?offset={boot.offset}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    stats = subprocess.run(
        ["debugfs", "-R", "stats", f"{image}?offset={boot.offset}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Block size:\s+(\d+)", stats)
    assert match, stats
    block_size = int(match.group(1))
    blocks = [int(b) for b in out]
    assert blocks == list(range(blocks[0], blocks[0] + len(blocks))), blocks
    return boot.offset + blocks[0] * block_size


def read_env(image: Path) -> dict[str, str]:
    with open(image, "rb") as f:
        f.seek(boot_env_offset(image))
        return grubenv.decode(f.read(grubenv.BLOCK_SIZE))


def write_env(image: Path, env: dict[str, str]) -> None:
    """Rewrite the GRUB environment in place, as GRUB's save_env does."""
    offset = boot_env_offset(image)
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(grubenv.encode(env))


def dev_copy(image: Path, dest: Path) -> Path:
    """A copy of image that boots with a root shell on the console."""
    shutil.copyfile(image, dest)
    env = read_env(dest)
    env["moat_cmdline"] = "moat.shell=1"
    write_env(dest, env)
    return dest


class Box:
    def __init__(
        self,
        image: Path,
        log: Path | None = None,
        memory_mib: int = 128,
        reboot: bool = False,
        extra: Sequence[str] = (),
        wild: str = "",
        raw_serial: bool = False,
    ):
        self.image = image
        self.started = time.monotonic()
        argv = qemu_argv(
            image,
            memory_mib,
            reboot=reboot,
            extra=extra,
            wild=wild,
            raw_serial=raw_serial,
        )
        self.child = pexpect.spawn(
            argv[0], argv[1:], encoding="utf-8", codec_errors="replace", timeout=60
        )
        if log is not None:
            self.child.logfile_read = open(log, "a")  # noqa: SIM115
        self.ready_after: float | None = None

    def expect(self, pattern: str | list[str], timeout: float = 60) -> int:
        return self.child.expect(pattern, timeout=timeout)

    def wait_ready(self, timeout: float = 90) -> float:
        self.child.expect(READY, timeout=timeout)
        self.ready_after = time.monotonic() - self.started
        return self.ready_after

    def shell(self, timeout: float = 30) -> None:
        """Get the console shell's attention."""
        self.child.sendline("")
        self.child.expect(PROMPT, timeout=timeout)

    def run(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command on the console; its exit status and output."""
        tag = uuid.uuid4().hex[:8]
        # the quotes keep the echoed command line from matching the markers
        self.child.sendline(f'echo __be""gin_{tag}; {command}; echo __e""nd_{tag}=$?')
        self.child.expect(rf"__begin_{tag}\r*\n", timeout=timeout)
        self.child.expect(rf"__end_{tag}=(\d+)", timeout=timeout)
        output = (self.child.before or "").replace("\r", "")
        return int(self.child.match.group(1)), output.strip()

    def check(self, command: str, timeout: float = 60) -> str:
        rc, out = self.run(command, timeout)
        assert rc == 0, f"{command!r} exit {rc}: {out}"
        return out

    def kill(self) -> None:
        """Pull the power: SIGKILL to QEMU, nothing gets flushed."""
        if self.child.isalive():
            os.kill(self.child.pid, signal.SIGKILL)
        self.child.wait()

    def close(self) -> None:
        self.kill()
        if self.child.logfile_read:
            self.child.logfile_read.close()
