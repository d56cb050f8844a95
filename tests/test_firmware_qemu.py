"""The firmware image under QEMU (TCG): headless boot, the running box,
power cuts, a damaged /var restored from its backup.

The image is built once per session (conftest.py `image`: make payload +
make image, into build/test-image); tests boot copies of it with moat.shell=1
set in the GRUB environment, so the serial console is a shell pexpect can
drive.
MOAT_POWERCUTS sets the number of power cuts (20; `make test-powercut-long`
runs 100). MOAT_TEST_IMAGE reuses an image already built.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pexpect
import pytest
from qemubox import Box

from firmware import layout

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
IMAGE_LIMIT = 64 * 2**20
BOOT_LIMIT = float(os.environ.get("MOAT_BOOT_LIMIT", "30"))
# 20 in `make test` (about 9 min under TCG); `make test-powercut-long` runs 100
POWERCUTS = int(os.environ.get("MOAT_POWERCUTS", "20"))
# the console shell, init, the supervisor: nothing else runs on an idle box
EXPECTED = {"init", "moat supervise", "sh -l"}
# the DHCP client's port 68 (RFC 2131 §4.1): the one bound UDP socket
DHCP_CLIENT = "00000000:0044"


def boot(image: Path, boxes: list[Box], log: Path) -> Box:
    box = Box(image, log=log)
    boxes.append(box)
    box.wait_ready(timeout=240)
    box.shell()
    return box


def boot_limit() -> float:
    """30 s on a quiet host; scaled when other work crowds its cores."""
    crowding = os.getloadavg()[0] / (os.cpu_count() or 1)
    return BOOT_LIMIT * max(1.0, crowding)


def test_image_size(image: Path) -> None:
    size = image.stat().st_size
    print(f"\nimage {image.name}: {size / 2**20:.1f} MiB")
    assert size <= IMAGE_LIMIT


def listeners(proc_net: str) -> list[str]:
    """Listening TCP and bound UDP sockets in /proc/net/{tcp,udp}[6] text."""
    found = []
    for line in proc_net.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] == "sl" or not fields[0].endswith(":"):
            continue
        local, state = fields[1], fields[3]
        if state in ("0A", "07"):  # TCP_LISTEN, or UDP (TCP_CLOSE) bound
            found.append(local)
    return found


def test_boot_and_running_box(
    box_image: Path, boxes: list[Box], tmp_path: Path
) -> None:
    limit = boot_limit()
    box = Box(box_image, log=tmp_path / "console.log")
    boxes.append(box)
    took = box.wait_ready(timeout=max(120, 3 * limit))
    box.shell()

    # boot time and memory
    meminfo = dict(re.findall(r"(\w+):\s+(\d+) kB", box.check("cat /proc/meminfo")))
    used = int(meminfo["MemTotal"]) - int(meminfo["MemAvailable"])
    rss = box.check(
        "for p in /proc/[0-9]*; do grep -q moat $p/cmdline 2>/dev/null && "
        "grep VmRSS $p/status; done; true"
    )
    print(
        f"\nboot to 'moat ready': {took:.1f} s (limit {limit:.0f} s); memory: "
        f"{int(meminfo['MemTotal']) // 1024} MiB usable of 128, {used // 1024} MiB "
        f"in use; moat processes: {' '.join(rss.split()[1::3])} kB RSS"
    )
    print(box.check("cat /run/moat/boot.log"))
    assert took <= limit

    # / is a ramdisk, /usr read-only, /var writable
    mounts = box.check("cat /proc/mounts")
    assert re.search(r"^rootfs / rootfs ", mounts, re.M), mounts
    assert re.search(r"^\S+ /usr squashfs ro", mounts, re.M), mounts
    assert re.search(r"^/dev/vda5 /var ext4 rw", mounts, re.M), mounts
    rc, out = box.run("touch /usr/probe")
    assert rc != 0 and "Read-only file system" in out
    box.check("echo ok > /var/probe && cat /var/probe && rm /var/probe")
    rc, _ = box.run("touch /probe && rm /probe")
    assert rc == 0

    # only the expected processes
    cmdlines = box.check(
        "for p in /proc/[0-9]*; do { tr '\\0' ' ' < $p/cmdline; } 2>/dev/null; "
        "echo; done"
    )
    running = {line.strip() for line in cmdlines.splitlines() if line.strip()}
    normal = {
        re.sub(r"^(/usr)?/s?bin/", "", re.sub(r"^/usr/lib/moat/moat\b", "moat", c))
        for c in running
    }
    # tr: the listing itself; ip: the DHCP client configuring its lease
    transient = ("tr ", "ip ")
    unexpected = {
        c for c in normal if c not in EXPECTED and not c.startswith(transient)
    }
    assert not unexpected, f"unexpected processes: {unexpected}"
    assert "moat supervise" in normal

    # the wild NIC exists and nothing but the DHCP client listens on it
    links = box.check("ip -o link")
    assert re.search(r"\d+: wild:", links) and re.search(r"\d+: private:", links)
    net = box.check("cat /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6")
    assert [a for a in listeners(net) if a != DHCP_CLIENT] == []

    check_modules_on_demand(box)


# drivers of devices the QEMU box does not have, modules no rule needs yet
NOT_AT_BOOT = {"e1000", "e1000e", "igb", "r8169", "ahci", "nf_tables", "nft_ct"}
# a NAT chain with a conntrack match and masquerade, as the firewall writes
NFT_PROBE = (
    "nft add table inet probe && "
    "nft add chain inet probe post '{ type nat hook postrouting priority 100; }' && "
    "nft add rule inet probe post oifname wild ct state new masquerade"
)
NFT_MODULES = {"nf_tables", "nft_ct", "nft_chain_nat", "nft_masq", "nf_conntrack"}


def modules_loaded(box: Box) -> set[str]:
    return {line.split()[0] for line in box.check("cat /proc/modules").splitlines()}


def check_modules_on_demand(box: Box) -> None:
    """Only the present devices' drivers are loaded at boot (coldplug by
    alias); an nft rule makes the kernel load its modules (request_module ->
    busybox modprobe)."""
    at_boot = modules_loaded(box)
    print(f"modules at boot ({len(at_boot)}): {' '.join(sorted(at_boot))}")
    assert {"virtio_pci", "virtio_blk", "virtio_net", "squashfs", "ext4"} <= at_boot
    assert not at_boot & NOT_AT_BOOT, at_boot & NOT_AT_BOOT
    for nic in ("wild", "private"):
        driver = box.check(f"basename $(readlink /sys/class/net/{nic}/device/driver)")
        assert driver == "virtio_net", (nic, driver)
        # the link comes up (carrier from the virtual cable), polled up to 10 s
        box.check(
            f"ip link set {nic} up && for i in $(seq 100); do "
            f"grep -qx up /sys/class/net/{nic}/operstate && break; sleep 0.1; done; "
            f"grep -x up /sys/class/net/{nic}/operstate"
        )

    box.check(NFT_PROBE)
    loaded = modules_loaded(box) - at_boot
    print(f"loaded on demand by the nft rule: {' '.join(sorted(loaded))}")
    assert loaded >= NFT_MODULES, NFT_MODULES - loaded
    box.check("nft delete table inet probe")


def _ack_until(box: Box, deadline: float, acked: int) -> int:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return acked
        try:
            box.child.expect(r"committed (\d+)\r*\n", timeout=left)
        except pexpect.TIMEOUT:
            return acked
        acked = int(box.child.match.group(1))


def test_power_cuts(box_image: Path, tmp_path: Path, boxes: list[Box]) -> None:
    seed = int(os.environ.get("MOAT_POWERCUT_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    acked = 0
    boot_times = []
    print(f"\n{POWERCUTS} power cuts, seed {seed}")
    for cut in range(POWERCUTS + 1):
        box = Box(box_image, log=tmp_path / "console.log")
        boxes.append(box)
        boot_times.append(box.wait_ready(timeout=240))
        box.shell()
        if cut == POWERCUTS:
            out = box.check(f"moat var verify --acked {acked}", timeout=120)
            print(out)
            break

        # check what survived, then commit records until the power goes
        box.child.sendline(f"moat var stress --size 1500 --verify-acked {acked}")
        box.child.expect(r"records \d+ last (\d+) torn (\d+) lost (\d+)", timeout=120)
        last, torn, lost = map(int, box.child.match.groups())
        assert (torn, lost) == (0, 0), f"cut {cut}: torn {torn} lost {lost}"
        assert last >= acked
        box.child.expect(r"committed (\d+)\r*\n", timeout=120)
        acked = int(box.child.match.group(1))
        acked = _ack_until(box, time.monotonic() + rng.uniform(0.0, 3.0), acked)
        box.kill()
        boxes.remove(box)
        box.close()
    print(
        f"{POWERCUTS} cuts, {acked} records acknowledged, none lost or torn; "
        f"boots to ready: max {max(boot_times):.1f} s, "
        f"mean {sum(boot_times) / len(boot_times):.1f} s"
    )


def test_damaged_var_restored_from_backup(
    box_image: Path, tmp_path: Path, boxes: list[Box]
) -> None:
    log = tmp_path / "console.log"
    box = boot(box_image, boxes, log)
    box.check("moat var stress --count 20", timeout=180)
    print(box.check("moat var commit", timeout=180))
    box.check("moat var stress --count 5", timeout=180)  # not in the backup
    box.kill()
    boxes.remove(box)
    box.close()

    # zero the primary superblock of /var in the image file
    var = layout.partitions()["var"]
    with open(box_image, "r+b") as f:
        f.seek(var.offset + 1024)
        f.write(b"\0" * 1024)

    box = Box(box_image, log=log)
    boxes.append(box)
    box.expect(r"/var is damaged \(e2fsck exit \d+\)", timeout=240)
    box.expect(r"/var restored from backup: backup (\d+)", timeout=240)
    box.wait_ready(timeout=240)
    box.shell()
    out = box.check("moat var verify --acked 20", timeout=120)
    assert re.search(r"last 20 torn 0 lost 0", out), out
    assert "restored from backup" in box.check("cat /var/log/boot.log")
