"""The recovery console on the real image, driven over QEMU's serial port.

One box, four boots of the same disk (each reboot ends QEMU: -no-reboot):

1. slot a: init starts `moat console` on ttyS0 beside the boot messages; every
   menu item, bad input, Ctrl-C/Ctrl-\\/Ctrl-Z; the admin shell (password
   put on /var as at provisioning) looks at processes and memory; restore
   /var undoes changes made after a backup; static WAN address applied at
   once by the supervised `moat wan`; reboot.
2. slot a: the static address is back after the reboot (wan.json), so is the
   restored /var; DHCP again; "boot the other slot" puts slot b on trial.
3. GRUB's serial menu: the recovery entry (slot b, on trial) starts only the
   console and the WAN address; factory reset.
4. slot b ran out of tries: GRUB falls back to a; /var is empty (no password,
   no settings); power off. The disk is then read on the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pexpect
import pytest
from qemubox import Box, boot_env_offset

from firmware import layout
from moat import varbackup
from ota import bootenv
from ota.console import hash_password

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
MENU = r"Choose 1-12 \(Enter: menu\): "
WELCOME = "press Enter for the recovery console"
PASSWORD = "serial-cable-2026"
STATIC = "10.0.2.20/24"
DHCP_ADDRESS = "10.0.2.15"  # QEMU user networking's first lease
# TODO: 128 MiB like the board's target once the box has room for a third
# Python process: with the supervisor and `moat wan` (DHCP client) running,
# MemAvailable is ~19 MB and the menu (11 MB anon, 10 MB file pages) makes a
# 128 MiB box thrash on page faults (measured: no menu within 7 min under
# TCG); with 192 MiB it is up in ~15 s.
MEMORY_MIB = 192
# boots and the box's Python starts are slow under TCG on a crowded host
SLOW = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
BOOT_TIMEOUT = 240 * SLOW
STEP_TIMEOUT = 120 * SLOW


# -- the disk, edited on the host ------------------------------------------------


def var_spec(image: Path) -> str:
    return f"{image}?offset={layout.partitions()['var'].offset}"


def put_var_file(image: Path, rel: str, data: bytes, tmp: Path) -> None:
    """A file on the image's /var, as provisioning would leave it."""
    src = tmp / "provisioned"
    src.write_bytes(data)
    parts = rel.split("/")
    script = [f"mkdir {'/'.join(parts[:i])}" for i in range(1, len(parts))]
    script += [f"write {src} {rel}", f"sif {rel} mode 0100600"]
    (tmp / "debugfs.cmd").write_text("\n".join(script) + "\n")
    subprocess.run(
        ["debugfs", "-w", "-f", str(tmp / "debugfs.cmd"), var_spec(image)],
        capture_output=True,
        check=True,
    )


def var_names(image: Path, directory: str) -> set[str]:
    out = subprocess.run(
        ["debugfs", "-R", f"ls -p {directory}", var_spec(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {f.split("/")[5] for f in out.splitlines() if f.count("/") >= 6} - {
        ".",
        "..",
    }


def env_store(image: Path) -> bootenv.BlockStore:
    return bootenv.BlockStore(
        image,
        (
            boot_env_offset(image, "/boot/grub/moatenv0"),
            boot_env_offset(image, "/boot/grub/moatenv1"),
        ),
    )


# -- the serial line --------------------------------------------------------------


class Serial:
    """The console menu over the box's serial port."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.child = box.child

    def expect(self, pattern: str, timeout: float = STEP_TIMEOUT) -> str:
        self.child.expect(pattern, timeout=timeout)
        return self.child.before or ""

    def line(self, text: str) -> None:
        """Type a line as a terminal does (Enter sends CR)."""
        self.child.send(text + "\r")

    def choose(self, item: int, *answers: str) -> None:
        self.expect(MENU)
        self.line(str(item))
        self.expect(r"-- ")
        for answer in answers:
            time.sleep(0.2)  # typed after the question, as a person would
            self.line(answer)

    def item(self, item: int, *answers: str) -> str:
        """Choose an item, answer its questions; its output up to the next menu."""
        self.choose(item, *answers)
        out = self.expect(MENU)
        self.line("")  # the menu again: the next choose() waits for its prompt
        return out.replace("\r", "")

    def shell(self, wrong_first: bool = False) -> None:
        self.choose(12)
        if wrong_first:
            self.expect("administrator password: ")
            self.line("not-the-password")
            self.expect("wrong password")
        self.expect("administrator password: ")
        self.line(PASSWORD)
        self.expect("starting a shell")
        self.box.shell(timeout=STEP_TIMEOUT)

    def leave_shell(self) -> None:
        self.child.sendline("exit")
        self.expect("shell ended")

    def wait_menu_after_boot(self) -> float:
        """Until both the console's invitation and "moat ready" came; the menu."""
        seen: set[int] = set()
        while seen != {0, 1}:
            seen.add(self.box.expect([WELCOME, "moat ready"], timeout=BOOT_TIMEOUT))
        took = time.monotonic() - self.box.started
        self.line("")
        self.expect(MENU)
        self.line("")
        return took


def power_on(image: Path, log: Path, boxes: list[Box]) -> Serial:
    box = Box(image, log=log, memory_mib=MEMORY_MIB, raw_serial=True)
    boxes.append(box)
    return Serial(box)


def gone(serial: Serial) -> None:
    """QEMU ends when the box reboots or powers off (-no-reboot)."""
    serial.child.expect(pexpect.EOF, timeout=STEP_TIMEOUT)
    serial.child.wait()


def wild_address(serial: Serial, want: str, absent: str | None = None) -> str:
    """Status (item 1) until the wild side has `want` (the service applies
    settings in the background)."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        out = serial.item(1)
        addresses = out.split("addresses:", 1)[-1].split("tunnel:", 1)[0]
        wild = [line for line in addresses.splitlines() if " wild " in line]
        if any(want in line for line in wild) and not (
            absent and any(absent in line for line in wild)
        ):
            return out
        assert time.monotonic() < deadline, f"wild never had {want}: {out}"
        time.sleep(2)


def test_console_over_serial(image: Path, tmp_path: Path, boxes: list[Box]) -> None:
    disk = tmp_path / "box.img"
    shutil.copyfile(image, disk)
    log = tmp_path / "serial.log"
    put_var_file(
        disk,
        "lib/moat/console/admin.pw",
        json.dumps(hash_password(PASSWORD)).encode(),
        tmp_path,
    )
    # the moat's own configuration turns the WAN service on (board default: off)
    board = (REPO / "board/overlay/etc/moat/moat.toml").read_text()
    assert "enabled = false" in board
    put_var_file(
        disk, "moat/moat.toml", board.replace("enabled = false", "").encode(), tmp_path
    )
    # slot b holds the same system (the builder fills both): say so in the env
    store = env_store(disk)
    version = bootenv.load(store).state.versions["a"]
    bootenv.save(store, lambda s: replace(s, versions={"a": version, "b": version}))
    started = time.monotonic()

    # -- boot 1 -------------------------------------------------------------------
    s = power_on(disk, log, boxes)
    took = s.wait_menu_after_boot()
    print(f"\nboot 1: console menu after {took:.1f} s")

    out = wild_address(s, DHCP_ADDRESS)
    for text in (
        f"product moat, board moat-x86_64, running {version}",
        "slot a: ",
        "running, good",
        "slot b: ",
        "tunnel: not running",
        "wan: ",
    ):
        assert text in out, out

    out = s.item(2)
    assert "last 30 lines of /var/log/moat/supervisor.log" in out, out
    assert "service wan started" in out, out

    out = s.item(3, "127.0.0.1")
    assert "3 packets transmitted, 3 packets received" in out, out
    out = s.item(3, "10.0.2.2")  # the WAN side's gateway (QEMU's)
    assert re.search(r"3 packets transmitted, [1-3] packets received", out), out
    assert "not a host name or address" in s.item(3, "-f")

    # bad input and the keyboard's signals: all just text to the menu
    for bad in ("99", "0", "abc", "1; sh", "$(reboot)"):
        s.expect(MENU)
        s.line(bad)
        s.expect("is not a menu number")
    for control in ("\x03", "\x1c", "\x1a"):
        s.expect(MENU)
        s.line(control)
        s.expect(r"\(control characters ignored\)")

    # the admin shell (one wrong password first): who runs, memory
    s.shell(wrong_first=True)
    box = s.box
    console_pid = box.check("echo $PPID")
    facts = box.check(
        f"cat /proc/{console_pid}/cmdline | tr '\\0' ' '; echo; "
        f"grep PPid /proc/{console_pid}/status; ls -l /proc/{console_pid}/fd/0; "
        f"grep -E 'VmRSS|RssAnon' /proc/{console_pid}/status; "
        "grep -E 'MemTotal|MemAvailable' /proc/meminfo; grep console /etc/inittab"
    )
    print(facts)
    assert "moat console --idle-exit" in facts
    assert re.search(r"PPid:\s+1\b", facts)  # started by init ...
    assert "/dev/ttyS0" in facts  # ... on the serial port
    assert "ttyS0::respawn:/etc/init.d/console" in facts
    rss = int(re.search(r"VmRSS:\s+(\d+)", facts).group(1))  # type: ignore[union-attr]
    assert rss < 40_000, f"console RSS {rss} kB"

    # init starts the console again when it ends (here: killed from its shell)
    box.child.sendline("kill $PPID")
    s.expect(WELCOME)
    s.line("")
    s.expect(MENU)
    s.line("")
    s.shell()
    assert box.check("echo $PPID") != console_pid

    # a backup, then changes restore must undo
    box.check("echo before > /var/moat/marker", timeout=STEP_TIMEOUT)
    print(box.check("moat var commit", timeout=STEP_TIMEOUT))
    box.check("echo after > /var/moat/marker; echo new > /var/moat/new-file")
    s.leave_shell()

    assert "cancelled" in s.item(6, "no")
    out = s.item(6, "yes")
    assert "/var restored from its backup" in out, out

    s.shell()
    assert box.check("cat /var/moat/marker") == "before"
    assert box.run("ls /var/moat/new-file")[0] != 0
    s.leave_shell()

    # WAN: a bad static address is refused, a good one applied at once
    out = s.item(4, "2", STATIC, "192.0.2.1", "")
    assert "not saved: gateway is not inside" in out, out
    out = s.item(4, "2", STATIC, "10.0.2.2", "")
    assert "the WAN service restarts with these settings" in out, out
    wild_address(s, STATIC.split("/")[0], absent=DHCP_ADDRESS)

    out = s.item(5)  # not provisioned: no portal to register with
    assert re.search(r"register: exit status \d+", out), out

    for path, why in (
        ("/nonexistent", "no such file"),
        ("/etc/hostname", "not an update bundle"),
    ):
        out = s.item(9, path)
        assert why in out, out

    assert "cancelled" in s.item(10, "no")
    assert "cancelled" in s.item(11, "no")
    s.choose(10, "yes")
    s.expect("rebooting")
    gone(s)
    boxes.remove(s.box)

    # -- boot 2: the settings and the restore survived -----------------------------
    s = power_on(disk, log, boxes)
    took = s.wait_menu_after_boot()
    print(f"boot 2: console menu after {took:.1f} s")
    wild_address(s, STATIC.split("/")[0], absent=DHCP_ADDRESS)
    s.shell()
    assert s.box.check("cat /var/moat/marker") == "before"
    assert s.box.run("ls /var/moat/new-file")[0] != 0
    assert '"static"' in s.box.check("cat /var/moat/wan.json")
    s.leave_shell()

    out = s.item(4, "1")
    assert "the WAN service restarts with these settings" in out, out
    wild_address(s, DHCP_ADDRESS, absent=STATIC.split("/")[0])

    s.choose(8, "yes")
    s.expect("slot b will boot once on trial")
    gone(s)
    boxes.remove(s.box)
    state = bootenv.load(env_store(disk)).state
    assert (state.good, state.trial, state.tries) == ("a", "b", 1)

    # -- boot 3: GRUB's recovery entry, chosen over serial -----------------------
    s = power_on(disk, log, boxes)
    s.expect(r"Moat recovery \(console and minimal network, slot b\)", BOOT_TIMEOUT)
    s.child.send("\x1b[B\x1b[B")  # down, down: the recovery entry
    s.expect(r"\*Moat recovery")
    s.line("")
    s.expect("moat: booting slot b", BOOT_TIMEOUT)
    s.expect("recovery boot: only the console and the WAN address", BOOT_TIMEOUT)
    s.box.expect(WELCOME, timeout=BOOT_TIMEOUT)
    s.line("")
    wild_address(s, DHCP_ADDRESS)  # the minimal network
    s.shell()
    procs = s.box.check(
        "for p in /proc/[0-9]*; do { tr '\\0' ' ' < $p/cmdline; } 2>/dev/null; "
        "echo; done"
    )
    running = {p.strip() for p in procs.splitlines() if p.strip()}
    print("recovery boot runs:", sorted(running))
    assert "/usr/bin/moat console --idle-exit 900" in running
    assert not [p for p in running if "supervise" in p]
    allowed = (
        "init",
        "/usr/bin/moat console --idle-exit 900",
        "/bin/sh -l",
        "/bin/sh /etc/init.d/supervisor",
        "/usr/bin/moat wan --interface wild -- --state-file /var/moat/dhcpc-wild.json",
        "tr ",
        "sleep 5",
    )
    extra = [p for p in running if not p.startswith(allowed)]
    assert not extra, f"unexpected in a recovery boot: {extra}"
    assert "MOAT_RECOVERY=1" in s.box.check("cat /run/moat/boot.env")
    s.leave_shell()

    assert "cancelled" in s.item(7, "yes")  # wants the word RESET
    s.choose(7, "RESET")
    s.expect(r"/var erased \(\d+ entries\)")
    s.expect("factory reset done; rebooting")
    gone(s)
    boxes.remove(s.box)

    # -- boot 4: fell back to slot a, /var empty ------------------------------------
    s = power_on(disk, log, boxes)
    s.expect("moat: slot b ran out of tries; falling back to slot a", BOOT_TIMEOUT)
    s.wait_menu_after_boot()
    s.choose(12)
    s.expect("no administrator password is set on this box: no shell")
    out = s.item(1)  # /var/moat/moat.toml is gone too: the board default
    assert "slot a: " in out and "running, good" in out
    s.choose(11, "yes")
    s.expect("powering off")
    gone(s)
    boxes.remove(s.box)

    # the disk after power-off: nothing of the old /var, an empty backup
    assert "marker" not in var_names(disk, "/moat")
    assert "wan.json" not in var_names(disk, "/moat")
    assert "moat.toml" not in var_names(disk, "/moat")
    assert "console" not in var_names(disk, "/lib/moat")  # the password's dir
    part = layout.partitions()["varbackup"]
    raw = tmp_path / "varbackup.raw"
    with open(disk, "rb") as f:
        f.seek(part.offset)
        raw.write_bytes(f.read(part.size))
    restored = tmp_path / "restored"
    restored.mkdir()
    varbackup.restore(raw, restored)
    assert sorted(p.name for p in restored.iterdir()) == [], "backup not empty"

    # the supervisor's lines never share a line with the console's prompt
    serial = log.read_text(errors="replace")
    for m in re.finditer("moat ready", serial):
        before = serial[max(0, m.start() - 40) : m.start()]
        assert before.endswith("\n") or before.endswith("\r"), repr(before)
    print(f"4 boots and every item in {time.monotonic() - started:.0f} s")
