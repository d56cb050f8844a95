"""Build moat-x86_64.img from Debian packages and the frozen payload.

    python -m firmware.image [-o moat-x86_64.img] [--payload DIR]

Steps (each printed with its time): download and unpack the board's Debian
packages; assemble /usr (chosen programs, the payload, every shared library
they need); assemble the initramfs (busybox, board overlay, kernel modules);
pack each slot as a squashfs (kernel, initramfs, usr/); make the boot (ext2:
GRUB config and environment), /var (ext4) and /var backup partitions; write
the partition table, GRUB's boot.img and core.img, and every partition into
one image file. No loop mounts, no root-only tools.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from firmware import debs, elf, kmod, layout
from firmware.cpio import CpioWriter
from firmware.layout import BOARD, REPO, SECTOR_SIZE
from firmware.payload import largest
from moat import __version__, grubenv, varbackup
from moat.cli import VERBS
from ota import bootenv

BOARD_NAME = "moat-x86_64"
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_PREFIX = "boot/grub"  # on the boot partition, as Buildroot's grub2 has it
BOOT_IMG_CODE = 440  # boot.img bytes before the disk signature and table
GRUB_MODULES = [
    *("biosdisk", "part_msdos", "ext2", "squash4", "xzio", "gzio"),
    *("normal", "serial", "terminal", "terminfo", "loadenv", "echo", "test"),
    *("linux", "configfile", "sleep", "reboot", "halt"),
]
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib")
# unmerged Debian paths -> where they go in the image
MERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
# xz with the x86 branch filter (mksquashfs keeps it per block where it
# helps: ELF code), 1 MiB blocks; against -b 256K without BCJ on the same
# slot: 23.3 MB instead of 24.5 MB, boot time the same within the noise of a
# loaded TCG host, about 40 s more CPU for mksquashfs
SQUASHFS_COMPRESSION = ["-comp", "xz", "-Xbcj", "x86", "-b", "1M"]
SQUASHFS_ARGS = [*SQUASHFS_COMPRESSION, "-noappend", "-all-root"]
# the initramfs is gzipped: stored raw, the slot's xz packs it 0.8 MiB smaller,
# but GRUB then reads ~3x the bytes through its xz decoder and the boot to
# "moat ready" took 32.5 s instead of 25.5 s (TCG, 128 MiB, same host load)
INITRAMFS_GZIP = True
INITIAL_ENV = {"moat_cmdline": ""}
PRODUCT = "moat"


class BuildError(RuntimeError):
    pass


@contextmanager
def step(title: str) -> Iterator[None]:
    print(f"image: {title} ...", flush=True)
    started = time.monotonic()
    yield
    print(f"image: {title}: done in {time.monotonic() - started:.1f} s", flush=True)


def run(*argv: str, quiet: bool = True) -> None:
    done = subprocess.run(argv, capture_output=quiet, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip() if quiet else ""
        raise BuildError(f"{argv[0]} failed ({done.returncode}): {detail}")


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --- packages -------------------------------------------------------------


def merge_usr(pkgroot: Path, merged: Path) -> None:
    """Copy the unpacked packages with /bin, /sbin, /lib moved under /usr."""
    skip = shutil.ignore_patterns("modules", "doc", "man", "locale", "gconv")
    for top in sorted(pkgroot.iterdir()):
        dest = merged / MERGE.get(top.name, top.name)
        if top.is_dir() and not top.is_symlink():
            shutil.copytree(top, dest, symlinks=True, dirs_exist_ok=True, ignore=skip)
    # absolute links into unmerged paths become relative links inside /usr
    for link in merged.rglob("*"):
        if not link.is_symlink():
            continue
        target = os.readlink(link)
        if target.startswith("/"):
            parts = target.lstrip("/").split("/", 1)
            mapped = MERGE.get(parts[0], parts[0])
            absolute = merged / mapped / (parts[1] if len(parts) > 1 else "")
            link.unlink()
            link.symlink_to(os.path.relpath(absolute, link.parent))


def copy_entry(src_root: Path, dest_root: Path, rel: str) -> None:
    src, dest = src_root / rel, dest_root / rel
    if not src.is_symlink() and not src.exists():
        raise BuildError(f"{rel} is in no package of board/packages.txt")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        return
    if src.is_symlink():
        dest.symlink_to(os.readlink(src))
        target = (src.parent / os.readlink(src)).resolve()
        copy_entry(src_root, dest_root, str(target.relative_to(src_root.resolve())))
    else:
        shutil.copy2(src, dest)


def library_closure(usr_root: Path, merged: Path) -> list[str]:
    """Copy into usr_root every shared library its ELF files need."""
    added: list[str] = []
    search_payload = usr_root / "usr/lib/moat"
    pending = [
        p.resolve() for p in usr_root.rglob("*") if p.is_file() and elf.is_elf(p)
    ]
    seen: set[Path] = set()
    while pending:
        binary = pending.pop()
        if binary in seen:
            continue
        seen.add(binary)
        try:
            names = elf.needed(binary)
        except elf.ElfError:
            continue
        for soname in names:
            if any((usr_root / d / soname).exists() for d in LIB_DIRS):
                continue
            # only the payload's own libraries and extensions find _internal;
            # its bootloader (usr/lib/moat/moat) is loaded by ld.so alone
            in_payload = search_payload in binary.parents
            inner = in_payload and binary.parent != search_payload
            if inner and any(search_payload.rglob(soname)):
                continue
            for libdir in LIB_DIRS:
                if (merged / libdir / soname).exists():
                    copy_entry(merged, usr_root, f"{libdir}/{soname}")
                    added.append(soname)
                    pending.append((usr_root / libdir / soname).resolve())
                    break
            else:
                rel = binary.relative_to(usr_root.resolve())
                raise BuildError(
                    f"{rel} needs {soname}, which no package in "
                    "board/packages.txt provides"
                )
    return sorted(added)


def build_usr(merged: Path, payload: Path, slot: Path, kernel_version: str) -> None:
    usr_root = slot  # the slot tree holds usr/ at its top
    for rel in layout.names(BOARD / "usr-files.txt"):
        copy_entry(merged, usr_root, rel)
    shutil.copytree(payload, slot / "usr/lib/moat", symlinks=True)
    bindir = slot / "usr/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (bindir / "moat").symlink_to("../lib/moat/moat")
    for verb in VERBS:
        (bindir / f"moat-{verb}").symlink_to("moat")
    added = library_closure(usr_root, merged)
    print(f"image: /usr shared libraries from packages: {' '.join(added)}")
    (slot / "usr/lib/moat-release").write_text(
        f"BOARD={BOARD_NAME}\nVERSION={__version__}\nKERNEL={kernel_version}\n"
    )
    write_ota_json(slot / "usr/lib/moat")


def write_ota_json(moat_dir: Path) -> None:
    """What `moat ota` needs to know about this build; the devices come from
    /run/moat/boot.env at run time. MOAT_OTA_ROOT: the trusted TUF root."""
    info: dict[str, object] = {
        "product": PRODUCT,
        "board": BOARD_NAME,
        "version": __version__,
        "build_time": int(os.environ.get("SOURCE_DATE_EPOCH", time.time())),
    }
    root = os.environ.get("MOAT_OTA_ROOT")
    if root:
        (moat_dir / "ota").mkdir(exist_ok=True)
        shutil.copy2(root, moat_dir / "ota/root.json")
    (moat_dir / "ota.json").write_text(json.dumps(info, indent=2) + "\n")


# --- initramfs ------------------------------------------------------------


def busybox_links(busybox: Path, root: Path) -> int:
    listing = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    count = 0
    for applet in listing:
        # applets under usr/ would be hidden by the /usr mount
        rel = applet.removeprefix("usr/")
        dest = root / rel
        if rel == "bin/busybox" or dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(root / "bin/busybox", dest.parent))
        count += 1
    return count


def build_initramfs(pkgroot: Path, kver: str, root: Path, out: Path) -> int:
    fresh(root)
    for name in ("dev", "proc", "sys", "run", "tmp", "var", "usr", "root", "mnt"):
        (root / name).mkdir()
    shutil.copytree(BOARD / "overlay", root, symlinks=True, dirs_exist_ok=True)
    (root / "etc/moat/partitions").write_text(layout.shell_numbers())
    shutil.copy2(BOARD / "nics.conf", root / "etc/moat/nics.conf")
    shutil.copy2(pkgroot / "etc/mke2fs.conf", root / "etc/mke2fs.conf")
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(pkgroot / "bin/busybox", root / "bin/busybox")
    busybox_links(root / "bin/busybox", root)
    (root / "lib64").symlink_to("usr/lib64")
    (root / "lib").mkdir(exist_ok=True)
    (root / "lib/x86_64-linux-gnu").symlink_to("../usr/lib/x86_64-linux-gnu")
    moddest = root / "lib/modules" / kver
    moddest.mkdir(parents=True)
    mods = layout.modules()
    at_boot = layout.boot_modules()
    loaded = kmod.install(list(mods), pkgroot / "lib/modules" / kver, moddest, at_boot)

    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.directory("dev")
    writer.chardev("dev/console", 5, 1)
    writer.chardev("dev/null", 1, 3, 0o666)
    writer.tree(root)
    writer.close()
    data = buf.getvalue()
    if INITRAMFS_GZIP:
        data = gzip.compress(data, compresslevel=9, mtime=0)
    out.write_bytes(data)
    return len(loaded)


# --- partitions -----------------------------------------------------------


def make_squashfs(tree: Path, out: Path, limit: int) -> int:
    """Pack tree into out; the headroom left in a slot of `limit` bytes."""
    if out.exists():
        out.unlink()
    run("mksquashfs", str(tree), str(out), *SQUASHFS_ARGS, quiet=False)
    size = out.stat().st_size
    if size > limit:
        biggest = ", ".join(f"{rel} {n / 2**20:.1f} MiB" for rel, n in largest(tree, 5))
        raise BuildError(
            f"slot squashfs is {size} bytes ({size / 2**20:.2f} MiB), "
            f"{(size - limit) / 2**20:.2f} MiB more than a slot holds "
            f"({limit / 2**20:.0f} MiB, board/partitions.conf); largest files "
            f"(uncompressed): {biggest}"
        )
    return limit - size


def make_ext(
    tree: Path, out: Path, size: int, fstype: str, label: str, *extra: str
) -> None:
    if out.exists():
        out.unlink()
    with open(out, "wb") as f:
        f.truncate(size)
    run(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        fstype,
        "-L",
        label,
        "-d",
        str(tree),
        *extra,
        str(out),
    )


def boot_tree(root: Path) -> None:
    parts = layout.partitions()
    cfg = (BOARD / "grub/grub.cfg").read_text()
    for key, value in {
        "@DISK_ID@": layout.disk_conf()["DISK_ID"],
        "@PART_SLOT_A@": str(parts["slot_a"].number),
        "@PART_SLOT_B@": str(parts["slot_b"].number),
    }.items():
        cfg = cfg.replace(key, value)
    (root / GRUB_PREFIX).mkdir(parents=True)
    (root / GRUB_PREFIX / "grub.cfg").write_text(cfg)
    (root / GRUB_PREFIX / "grubenv").write_bytes(grubenv.encode(INITIAL_ENV))
    shutil.copy2(BOARD / "grub/ota.cfg", root / GRUB_PREFIX / "ota.cfg")
    # slot a good and holding this version, b empty (ota/bootenv.py format)
    blocks = bootenv.initial_blocks("a", __version__)
    size = bootenv.ENVBLK_SIZE
    (root / GRUB_PREFIX / "moatenv0").write_bytes(blocks[:size])
    (root / GRUB_PREFIX / "moatenv1").write_bytes(blocks[size:])


def var_tree(root: Path) -> None:
    for sub in ("moat", "log"):
        (root / sub).mkdir(parents=True)


def make_core_img(out: Path) -> None:
    boot = layout.partitions()["boot"]
    run(
        "grub-mkimage",
        "-O",
        "i386-pc",
        "-d",
        str(GRUB_DIR),
        "-p",
        f"(hd0,msdos{boot.number})/{GRUB_PREFIX}",
        "-o",
        str(out),
        *GRUB_MODULES,
    )
    room = layout.CORE_IMG_SECTORS * SECTOR_SIZE
    if out.stat().st_size > room:
        raise BuildError(f"core.img is {out.stat().st_size} bytes, room for {room}")


def write_disk(
    image: Path, slot_img: Path, core_img: Path, boot_img: Path, work: Path
) -> None:
    """The boot, /var and backup partitions, then the whole disk image.
    Shared with the Buildroot post-image script (firmware.disk)."""
    parts = layout.partitions()
    with step("boot, /var and /var backup partitions"):
        boot_dir = fresh(work / "boot.d")
        boot_tree(boot_dir)
        boot_part = work / "boot.ext2"
        make_ext(boot_dir, boot_part, parts["boot"].size, "ext2", "moat-boot")
        var_dir = fresh(work / "var.d")
        var_tree(var_dir)
        var_img = work / "var.ext4"
        make_ext(var_dir, var_img, parts["var"].size, "ext4", "moat-var")
        backup_img = work / "varbackup.raw"
        with open(backup_img, "wb") as f:
            f.truncate(parts["varbackup"].size)
        fd = os.open(backup_img, os.O_RDWR)
        try:
            varbackup.write_backup(fd, varbackup.pack_tree(var_dir), now=0)
        finally:
            os.close(fd)
    with step(f"assemble {image.name}"):
        assemble(
            image,
            {
                "boot": boot_part,
                "slot_a": slot_img,
                "slot_b": slot_img,
                "var": var_img,
                "varbackup": backup_img,
            },
            core_img,
            boot_img,
        )


def assemble(
    image: Path, pieces: dict[str, Path], core_img: Path, boot_img: Path
) -> None:
    tmp = image.with_name(image.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(layout.disk_sectors() * SECTOR_SIZE)
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(tmp)],
        input=layout.sfdisk_script(),
        text=True,
        check=True,
        capture_output=True,
    )
    parts = layout.partitions()
    with open(tmp, "r+b") as f:
        f.seek(0)
        f.write(boot_img.read_bytes()[:BOOT_IMG_CODE])
        f.seek(SECTOR_SIZE)
        f.write(core_img.read_bytes())
        for name, piece in pieces.items():
            part = parts[name]
            data = piece.read_bytes()
            if len(data) > part.size:
                raise BuildError(f"{name}: {len(data)} bytes > partition {part.size}")
            f.seek(part.offset)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, image)


# --- main -----------------------------------------------------------------


def build(image: Path, payload: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    parts = layout.partitions()

    with step("Debian packages"):
        wanted = debs.resolve(layout.names(BOARD / "packages.txt"))
        found = debs.download(wanted)
        pkgroot = work / "pkgroot"
        debs.unpack(found, pkgroot)
        merged = fresh(work / "merged")
        merge_usr(pkgroot, merged)
        kpkg = debs.kernel_package()
        kver = kpkg.removeprefix("linux-image-")
        kernel_version = f"{kpkg} {debs.version_of(found[kpkg])}"
        print(f"image: kernel {kernel_version}")

    slot = fresh(work / "slot")
    with step("/usr: programs, payload, libraries"):
        build_usr(merged, payload, slot, kernel_version)

    with step("initramfs"):
        (slot / "boot").mkdir()
        count = build_initramfs(
            pkgroot, kver, work / "initramfs", slot / "boot/initrd.img"
        )
        shutil.copy2(pkgroot / f"boot/vmlinuz-{kver}", slot / "boot/vmlinuz")
        size = (slot / "boot/initrd.img").stat().st_size
        kind = "gzip" if INITRAMFS_GZIP else "uncompressed"
        print(f"image: initramfs {size / 2**20:.1f} MiB {kind}, {count} modules")

    slot_img = work / "slot.squashfs"
    with step("slot squashfs (kernel, initramfs, /usr)"):
        room = make_squashfs(slot, slot_img, parts["slot_a"].size)
        print(
            f"image: slot squashfs {slot_img.stat().st_size / 2**20:.2f} MiB of "
            f"{parts['slot_a'].size / 2**20:.0f} MiB: headroom {room / 2**20:.2f} MiB"
        )

    core_img = work / "core.img"
    with step("GRUB core.img"):
        make_core_img(core_img)
    write_disk(image, slot_img, core_img, GRUB_DIR / "boot.img", work)
    print(f"image: {image} {image.stat().st_size / 2**20:.0f} MiB, {kernel_version}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=REPO / "moat-x86_64.img")
    parser.add_argument(
        "--payload", type=Path, default=REPO / "build/payload/dist/moat"
    )
    parser.add_argument("--work", type=Path, default=REPO / "build/image")
    args = parser.parse_args()
    if not (args.payload / "moat").exists():
        print(f"image: no payload at {args.payload}: run `make payload`")
        return 2
    try:
        build(args.output, args.payload, args.work)
    except (BuildError, debs.DebError, KeyError) as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
