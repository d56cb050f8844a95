"""board/grub/ota.cfg run by real GRUB (i386-pc) under QEMU.

A tiny disk: boot.img + core.img (with ota.cfg in a memdisk) and an ext2 boot
partition holding the two environment blocks as files, as on the box. Each
boot prints GRUB's choice on serial and reboots (QEMU exits with -no-reboot);
the blocks are then read back from the disk image at the offsets debugfs
reports, so GRUB's own save_env is checked byte for byte.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from ota import bootenv
from ota.bootenv import ENVBLK_SIZE, BlockStore, BootState

REPO = Path(__file__).resolve().parent.parent
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
SECTOR = 512
PART_START = 2048
MODULES = [
    "biosdisk",
    "memdisk",
    "tar",
    "normal",
    "loadenv",
    "test",
    "echo",
    "serial",
    "terminal",
    "reboot",
    "configfile",
    "part_msdos",
    "ext2",
]
TEST_CFG = """serial --unit=0 --speed=115200
terminal_output serial
terminal_input serial
set moat_env0=(hd0,msdos1)/grub/moatenv0
set moat_env1=(hd0,msdos1)/grub/moatenv1
source (memdisk)/ota.cfg
echo "MOAT-RESULT slot=$moat_slot trial=$moat_trial fellback=$moat_fellback"
reboot
"""

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        not (GRUB_DIR / "boot.img").exists()
        or shutil.which("qemu-system-x86_64") is None
        or shutil.which("mke2fs") is None,
        reason="needs grub-pc-bin, qemu-system-x86 and e2fsprogs",
    ),
]

STATE = BootState(
    seq=9, good="a", trial="b", tries=2, versions={"a": "1.0", "b": "1.1"}, floor="1.0"
)


class GrubDisk:
    def __init__(self, tmp: Path, block0: bytes, block1: bytes) -> None:
        self.tmp = tmp
        md = tmp / "memdisk"
        md.mkdir()
        shutil.copy(REPO / "board/grub/ota.cfg", md / "ota.cfg")
        (md / "grub.cfg").write_text(TEST_CFG)
        subprocess.run(
            ["tar", "-C", str(md), "-cf", str(tmp / "md.tar"), "."], check=True
        )
        (tmp / "early.cfg").write_text("normal (memdisk)/grub.cfg\n")
        core = tmp / "core.img"
        subprocess.run(
            [
                "grub-mkimage",
                "-O",
                "i386-pc",
                "-o",
                str(core),
                "-c",
                str(tmp / "early.cfg"),
            ]
            + ["-m", str(tmp / "md.tar"), "-p", "(memdisk)/", *MODULES],
            check=True,
        )
        part = tmp / "part"
        (part / "grub").mkdir(parents=True)
        (part / "grub/moatenv0").write_bytes(block0)
        (part / "grub/moatenv1").write_bytes(block1)
        part_img = tmp / "part.img"
        with open(part_img, "wb") as f:
            f.truncate(1 << 20)
        subprocess.run(
            ["mke2fs", "-q", "-t", "ext2", "-d", str(part), str(part_img)], check=True
        )
        offsets = [self._bmap(part_img, f"/grub/moatenv{i}") for i in (0, 1)]
        self.disk = tmp / "disk.img"
        disk = bytearray(4 << 20)
        disk[:440] = (GRUB_DIR / "boot.img").read_bytes()[:440]
        disk[510:512] = b"\x55\xaa"
        # one primary partition, type 0x83, LBA 2048, 2048 sectors
        entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0])
        entry += PART_START.to_bytes(4, "little") + (2048).to_bytes(4, "little")
        disk[446:462] = entry
        core_bytes = core.read_bytes()
        assert SECTOR + len(core_bytes) <= PART_START * SECTOR
        disk[SECTOR : SECTOR + len(core_bytes)] = core_bytes
        p = part_img.read_bytes()
        disk[PART_START * SECTOR : PART_START * SECTOR + len(p)] = p
        self.disk.write_bytes(bytes(disk))
        base = PART_START * SECTOR
        self.store = BlockStore(self.disk, (base + offsets[0], base + offsets[1]))
        assert self.store.read(0) == block0 and self.store.read(1) == block1

    @staticmethod
    def _bmap(image: Path, path: str) -> int:
        out = subprocess.run(
            ["debugfs", "-R", f"bmap {path} 0", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return int(out) * 1024  # mke2fs picks 1 KiB blocks for a 1 MiB fs

    def boot(self) -> dict[str, str]:
        log = self.tmp / "serial.log"
        subprocess.run(
            ["qemu-system-x86_64", "-m", "32", "-display", "none", "-no-reboot"]
            + ["-drive", f"file={self.disk},format=raw,if=ide"]
            + ["-serial", f"file:{log}", "-monitor", "none"],
            check=True,
            timeout=120,
        )
        text = log.read_text(errors="replace")
        line = next(x for x in text.splitlines() if "MOAT-RESULT" in x)
        fields = line.split("MOAT-RESULT", 1)[1].split()
        return dict(f.split("=", 1) for f in fields)


def test_grub_counts_tries_then_falls_back(tmp_path: Path) -> None:
    older = replace(STATE, seq=8, trial="-", tries=0)
    disk = GrubDisk(tmp_path, bootenv.encode(STATE), bootenv.encode(older))
    first = disk.boot()
    assert first == {"slot": "b", "trial": "1", "fellback": ""}
    # GRUB's save_env changed exactly the tries digit, in place
    assert bootenv.decode(disk.store.read(0)) == replace(STATE, tries=1)
    assert disk.boot()["slot"] == "b"
    assert bootenv.decode(disk.store.read(0)).tries == 0
    third = disk.boot()
    assert third == {"slot": "a", "trial": "0", "fellback": "b"}
    # and our Linux side agrees with what GRUB did
    assert bootenv.load(disk.store).state == replace(STATE, tries=0)


def test_grub_prefers_higher_seq_in_either_block(tmp_path: Path) -> None:
    newer = replace(STATE, seq=10, good="b", trial="-", tries=0)
    disk = GrubDisk(tmp_path, bootenv.encode(STATE), bootenv.encode(newer))
    assert disk.boot() == {"slot": "b", "trial": "0", "fellback": ""}


def test_grub_skips_torn_newest_block(tmp_path: Path) -> None:
    """A write of the switch cut after sector 0: seq and seal disagree."""
    good = replace(STATE, seq=8, trial="-", tries=0)
    new = bootenv.encode(replace(STATE, seq=9, trial="b", tries=3))
    torn = new[:SECTOR] + bootenv.encode(good)[SECTOR:]
    disk = GrubDisk(tmp_path, torn, bootenv.encode(good))
    assert disk.boot() == {"slot": "a", "trial": "0", "fellback": ""}
    assert disk.store.read(0) == torn  # GRUB wrote nothing


def test_grub_boots_slot_a_without_any_valid_block(tmp_path: Path) -> None:
    disk = GrubDisk(tmp_path, b"\0" * ENVBLK_SIZE, b"#" * ENVBLK_SIZE)
    assert disk.boot() == {"slot": "a", "trial": "0", "fellback": ""}


def test_power_cut_at_every_install_write_real_grub_boots_intact_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installer writes the env blocks inside the ext2 partition that real
    GRUB reads; a power cut at each write (half of it landed) still boots a
    slot holding an intact image, and the complete install boots the new slot."""
    import os

    from ota_world import World

    import ota.client

    monkeypatch.setattr(ota.client, "CHUNK_SIZE", 64 * 1024)
    world = World(tmp_path / "world")
    bundle, image = world.publish("1.1.0", size=200_000)
    initial = bootenv.initial_blocks("a", "1.0.0")
    real_pwrite = os.pwrite
    count = [0]

    class PowerCut(BaseException):
        pass

    def boot_after(cut_at: int | None) -> tuple[dict[str, str], World]:
        where = tmp_path / f"disk{cut_at}"
        where.mkdir()
        disk = GrubDisk(where, initial[:ENVBLK_SIZE], initial[ENVBLK_SIZE:])
        box = World(tmp_path / f"box{cut_at}")
        box.repo = world.repo
        (box.box / "root.json").write_bytes((world.box / "root.json").read_bytes())
        box.config.bootenv_path = disk.store.path
        box.config.bootenv_offsets = disk.store.offsets
        count[0] = 0

        def crashing(fd: int, data: bytes, offset: int) -> int:
            count[0] += 1
            if count[0] == cut_at:
                real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
                raise PowerCut
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", crashing)
        try:
            box.install(bundle)
        except PowerCut:
            pass
        finally:
            monkeypatch.setattr(os, "pwrite", real_pwrite)
        return disk.boot(), box

    choice, box = boot_after(None)
    assert choice == {"slot": "b", "trial": "1", "fellback": ""}
    writes = count[0]
    assert writes >= 5
    for cut_at in range(1, writes + 1):
        choice, box = boot_after(cut_at)
        slot = choice["slot"]
        want = box.old_image if slot == "a" else image
        got = (box.box / f"slot{slot}").read_bytes()[: len(want)]
        assert got == want, f"cut at write {cut_at}: GRUB boots a torn slot {slot}"
