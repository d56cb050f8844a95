"""Signed updates on the real image under QEMU (TCG).

The session's test image trusts a throwaway TUF root (conftest.py `image`).
From its build tree we make two more slot images (tests/otaimage.py): a good
one with a higher version, and a broken one whose board configuration runs
its services with a program the slot does not have (so they never come up).

- good update: the box fetches it from a TUF repository over QEMU's user
  network (a host HTTP server on 127.0.0.1, reached through a guestfwd rule
  that runs tests/tcprelay.py per connection),
  installs it, reboots into the new slot on trial, the supervisor marks it
  good and the version floor rises; the same update is then refused as older;
- broken update, from an offline bundle on a second (USB-stick-like) drive:
  three trial boots reboot themselves, GRUB falls back to the old slot, the
  box says so and refuses that version from then on;
- power cuts (QEMU SIGKILL) at random moments while the image streams into
  the idle slot and the boot environment is switched: every boot takes the
  slot the boot environment names, that slot holds a complete image, and the
  box gets to "moat ready". MOAT_OTA_POWERCUTS cuts (10; `make
  test-ota-powercut-long` runs 100).

The boxes get MOAT_OTA_MEMORY MiB (256): with 128 MiB the TUF installer
(about 40 MB resident with `cryptography`) does not fit beside the
supervisor and the ramdisk; the box then pages its program in and out of the
squashfs for minutes (see the OTA section of README.md).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import random
import re
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import otaimage
import pexpect
import pytest
from qemubox import READY, Box

from firmware import layout
from firmware.image import SQUASHFS_ARGS
from moat import __version__
from ota import bootenv

pytestmark = pytest.mark.qemu

MEMORY = int(os.environ.get("MOAT_OTA_MEMORY", "256"))
POWERCUTS = int(os.environ.get("MOAT_OTA_POWERCUTS", "10"))
BOOT = 600.0  # seconds: generous, the shared host can be slow
INSTALL = 900.0
GUEST_REPO = "http://10.0.2.100:8080"
GOOD = otaimage.bump(__version__, 1)
BROKEN = otaimage.bump(__version__, 2)
# the broken slot: its services run a program it does not have
BROKEN_TOML = """\
[supervisor]
ready_after = 2.0
ready_timeout = 15.0
ready_hooks = ["ota.supervise:on_ready"]
timeout_hooks = ["ota.supervise:on_timeout"]
log_dir = "/var/log/moat"
program = ["/usr/bin/moat-missing-from-this-slot"]

[services.dhcpd]
verb = "dhcpd"
args = ["--interface", "private"]
"""


@dataclass
class OtaBuild:
    base_slot: Path  # the image's own slot squashfs (slot a)
    good_slot: Path
    good_repo: Path  # the test repository with GOOD published
    good_bundle: Path
    broken_bundle: Path


@pytest.fixture(scope="session")
def ota_build(image: Path, tmp_path_factory: pytest.TempPathFactory) -> OtaBuild:
    work, repo = image.parent / "work", image.parent / "ota" / "repo"
    if not (work / "slot").is_dir() or not repo.is_dir():
        pytest.skip(f"no build tree or test repository beside {image}")
    out = tmp_path_factory.mktemp("ota")
    assert "-noappend" in SQUASHFS_ARGS

    good_slot = otaimage.variant_slot(work, out / "good.squashfs", GOOD)
    broken_slot = otaimage.variant_slot(
        work, out / "broken.squashfs", BROKEN, moat_toml=BROKEN_TOML
    )
    # one repository per update, both copies of the one the image trusts
    good_repo, broken_repo = out / "repo-good", out / "repo-broken"
    shutil.copytree(repo, good_repo)
    shutil.copytree(repo, broken_repo)
    good = otaimage.publish(good_repo, good_slot, GOOD)
    broken = otaimage.publish(broken_repo, broken_slot, BROKEN)
    return OtaBuild(
        base_slot=work / "slot.squashfs",
        good_slot=good_slot,
        good_repo=good_repo,
        good_bundle=otaimage.bundle_drive(good_repo, good, out / "good.moat"),
        broken_bundle=otaimage.bundle_drive(broken_repo, broken, out / "broken.moat"),
    )


@pytest.fixture
def repo_url_port(ota_build: OtaBuild, tmp_path: Path) -> Iterator[int]:
    """The good repository's metadata/ and targets/ over HTTP on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    for sub in ("metadata", "targets"):
        (served / sub).symlink_to(ota_build.good_repo / sub)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def drive(bundle: Path) -> list[str]:
    """An offline bundle as a second, read-only disk (a USB stick)."""
    return ["-drive", f"file={bundle},format=raw,if=virtio,readonly=on"]


def wild_up(box: Box) -> None:
    """The wild NIC on QEMU's user network (no DHCP client runs yet)."""
    box.check("ip addr add 10.0.2.15/24 dev wild && ip link set wild up")


def status(box: Box) -> str:
    return box.check("moat ota status", timeout=INSTALL)


def test_good_update_from_repository(
    box_image: Path, tmp_path: Path, boxes: list[Box], repo_url_port: int
) -> None:
    relay = Path(__file__).with_name("tcprelay.py")
    forward = (
        f"guestfwd=tcp:10.0.2.100:8080-cmd:{sys.executable} {relay} {repo_url_port}"
    )
    box = Box(
        box_image,
        log=tmp_path / "console.log",
        memory_mib=MEMORY,
        reboot=True,
        wild=forward,
    )
    boxes.append(box)
    box.wait_ready(timeout=BOOT)
    box.shell()
    wild_up(box)

    out = box.check(f"moat ota check --repository {GUEST_REPO}", timeout=INSTALL)
    assert f"version {GOOD}" in out, out
    started = time.monotonic()
    out = box.check(f"moat ota install --repository {GUEST_REPO}", timeout=INSTALL)
    took = time.monotonic() - started
    assert f"installed {GOOD} in slot b" in out, out
    assert re.search(r"slot b: +\S+ +on trial, 3 tries left", status(box))
    print(f"\ninstall over HTTP: {took:.0f} s ({MEMORY} MiB)")

    # reboot: GRUB tries slot b, the supervisor proves it
    box.child.sendline("reboot")
    box.expect(r"moat: trying slot b \(2 tries left after this\)", timeout=BOOT)
    box.expect("moat: booting slot b", timeout=60)
    box.expect(READY, timeout=BOOT)
    box.expect(rf"ota: slot b \({GOOD}\) on trial", timeout=BOOT)
    box.expect(
        rf"ota: slot b \({GOOD}\) proved itself after \d+ s: marked good, floor raised",
        timeout=BOOT,
    )
    box.shell()
    out = status(box)
    print(out)
    assert f"running {GOOD}" in out, out
    assert re.search(rf"slot b: {re.escape(GOOD)} +running, good", out), out
    assert f"version floor {GOOD};" in out, out

    # the same update again: refused, nothing written (same boot env seq)
    wild_up(box)
    rc, refused = box.run(f"moat ota install --repository {GUEST_REPO}", INSTALL)
    assert rc != 0 and "refused: older version" in refused, refused
    assert status(box) == out


def test_broken_update_falls_back(
    box_image: Path, tmp_path: Path, boxes: list[Box], ota_build: OtaBuild
) -> None:
    box = Box(
        box_image,
        log=tmp_path / "console.log",
        memory_mib=MEMORY,
        reboot=True,
        extra=drive(ota_build.broken_bundle),
    )
    boxes.append(box)
    box.wait_ready(timeout=BOOT)
    box.shell()
    out = box.check("moat ota install /dev/vdb", timeout=INSTALL)
    assert f"installed {BROKEN} in slot b" in out, out

    # three trial boots, each gives up and reboots; then GRUB falls back
    box.child.sendline("reboot")
    for left in (2, 1, 0):
        box.expect(rf"moat: trying slot b \({left} tries left after this\)", BOOT)
        box.expect(rf"ota: slot b \({BROKEN}\) not healthy .*: rebooting", BOOT)
    box.expect("moat: slot b ran out of tries; falling back to slot a", BOOT)
    box.expect("moat: booting slot a", 60)
    box.expect(READY, timeout=BOOT)
    box.expect(
        rf"ota: slot b \({BROKEN}\) failed to prove itself; fell back to slot a "
        rf"\({re.escape(__version__)}\)",
        timeout=BOOT,
    )
    box.shell()
    out = status(box)
    print("\n" + out)
    assert re.search(rf"slot a: {re.escape(__version__)} +running, good", out), out
    assert f"version floor {__version__};" in out, out

    # that version is not taken again; nothing written
    rc, refused = box.run("moat ota install /dev/vdb", timeout=INSTALL)
    assert rc != 0 and f"version {BROKEN} already failed" in refused, refused
    assert status(box) == out


# --- power cuts ------------------------------------------------------------


def digest(image: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(image, "rb") as f:
        f.seek(offset)
        h.update(f.read(length))
    return h.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_power_cuts_during_install(
    box_image: Path, tmp_path: Path, boxes: list[Box], ota_build: OtaBuild
) -> None:
    seed = int(os.environ.get("MOAT_OTA_POWERCUT_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    print(f"\n{POWERCUTS} power cuts during install, seed {seed}")
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(box_image, pristine)
    parts = layout.partitions()
    offsets = otaimage.env_offsets(box_image, parts["boot"].offset)
    store = bootenv.BlockStore(box_image, offsets)
    complete = {
        "a": (ota_build.base_slot.stat().st_size, file_digest(ota_build.base_slot)),
        "b": (ota_build.good_slot.stat().st_size, file_digest(ota_build.good_slot)),
    }
    # seconds from the "writing" line to "installed" (the switch done): taken
    # from the last install that finished; cuts fall in 110 % of it
    window = 5.0
    outcomes: Counter[str] = Counter()
    cuts = 0
    cut_pending = False
    log = tmp_path / "console.log"
    while True:
        # what the boot environment on the disk says GRUB must boot
        expected = bootenv.grub_choose(bootenv.load(store).state).slot
        box = Box(
            box_image, log=log, memory_mib=MEMORY, extra=drive(ota_build.good_bundle)
        )
        boxes.append(box)
        box.expect(r"moat: booting slot ([ab])", timeout=BOOT)
        booted = box.child.match.group(1)
        assert booted == expected, f"GRUB booted {booted}, the env says {expected}"
        length, want = complete[booted]
        slot = parts[f"slot_{booted}"]
        assert digest(box_image, slot.offset, length) == want, (
            f"after {cuts} cuts GRUB boots slot {booted}, which is not complete"
        )
        box.wait_ready(timeout=BOOT)
        box.shell()
        if cut_pending:
            outcomes[f"slot {booted} booted"] += 1
            cut_pending = False
        if booted == "b":
            # the last cut came after the switch: slot b boots on trial; start
            # the next round from the image as it was before the install
            box.close()
            boxes.remove(box)
            shutil.copyfile(pristine, box_image)
            continue
        if cuts == POWERCUTS:
            break

        # install, and pull the power at a random moment of the write
        box.child.sendline("moat ota install /dev/vdb")
        box.expect(r"writing \S+ \(\d+ bytes\) to slot b", timeout=INSTALL)
        began = time.monotonic()
        delay = rng.uniform(0.0, window * 1.1)
        try:
            box.expect(r"installed \S+ in slot b", timeout=delay)
            window = time.monotonic() - began
        except pexpect.TIMEOUT:
            pass
        box.kill()
        box.close()
        boxes.remove(box)
        cuts += 1
        cut_pending = True
        print(f"cut {cuts}: {delay:.1f} s after the write began")
    print(
        f"{cuts} cuts: "
        + ", ".join(f"{n} {what}" for what, n in outcomes.items())
        + f"; write + switch took {window:.1f} s; every boot took the "
        "slot the environment named, complete, to 'moat ready'"
    )
    assert outcomes["slot a booted"] > 0  # some cuts hit the write itself
