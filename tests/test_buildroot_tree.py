"""The BR2_EXTERNAL tree (buildroot/) must describe the same board as the
offline builder: modules, overlay, GRUB, partitions, packages, payload.
(Loading the defconfig into a real Buildroot: buildroot/check-defconfig.sh.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

from firmware import image, layout

REPO = Path(__file__).resolve().parent.parent
EXT = REPO / "buildroot"
DEFCONFIG = EXT / "configs" / "moat_x86_64_defconfig"


def defconfig() -> dict[str, str]:
    values = {}
    for line in DEFCONFIG.read_text().splitlines():
        if line.startswith("BR2_"):
            key, _, value = line.partition("=")
            values[key] = value.strip('"')
    return values


def ext_path(value: str) -> Path:
    return Path(value.replace("$(BR2_EXTERNAL_MOAT_PATH)", str(EXT))).resolve()


def test_external_desc_names_the_tree() -> None:
    desc = (EXT / "external.desc").read_text()
    assert re.search(r"^name: MOAT$", desc, re.M)
    assert "package/moat-payload/Config.in" in (EXT / "Config.in").read_text()
    assert "package/*/*.mk" in (EXT / "external.mk").read_text()


def test_every_board_module_is_in_the_kernel_fragment() -> None:
    fragment = dict(
        line.split("=", 1)
        for line in (EXT / "board/linux.fragment").read_text().splitlines()
        if line.startswith("CONFIG_")
    )
    for row in layout._rows(layout.BOARD / "modules.txt"):
        module, _, option = row
        assert fragment.get(option) in ("m", "y"), f"{module}: {option} not set"
    # the kernel reads the slot squashfs the offline builder packs
    assert fragment["CONFIG_SQUASHFS_XZ"] == "y"
    if "-Xbcj" in image.SQUASHFS_ARGS:
        assert fragment["CONFIG_XZ_DEC_X86"] == "y"


def test_overlay_and_scripts_are_board_ones() -> None:
    cfg = defconfig()
    assert ext_path(cfg["BR2_ROOTFS_OVERLAY"]) == (layout.BOARD / "overlay").resolve()
    for key in ("BR2_ROOTFS_POST_BUILD_SCRIPT", "BR2_ROOTFS_POST_IMAGE_SCRIPT"):
        script = ext_path(cfg[key])
        assert script.exists() and os.access(script, os.X_OK), script
    assert ext_path(cfg["BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES"]).exists()
    post_image = (EXT / "board/post-image.sh").read_text()
    assert "python3 -m firmware.disk" in post_image  # same layout code
    flat = post_image.replace("\\\n   ", "")
    assert " ".join(image.SQUASHFS_ARGS) in flat  # the same compression
    assert ("gzip" in flat) == image.INITRAMFS_GZIP  # the same initramfs
    assert "firmware.kmod" in (EXT / "board/post-build.sh").read_text()


def test_grub_matches_the_offline_builder() -> None:
    cfg = defconfig()
    assert cfg["BR2_TARGET_GRUB2_BUILTIN_MODULES_PC"].split() == image.GRUB_MODULES
    boot = layout.partitions()["boot"]
    assert cfg["BR2_TARGET_GRUB2_BOOT_PARTITION"] == f"hd0,msdos{boot.number}"
    assert image.GRUB_PREFIX == "boot/grub"  # where Buildroot's core.img looks


def test_packages_and_toolchain() -> None:
    cfg = defconfig()
    assert cfg["BR2_TOOLCHAIN_BUILDROOT_GLIBC"] == "y"  # the payload needs glibc
    debian = set(layout.names(layout.BOARD / "packages.txt"))
    for deb, br2 in {
        "busybox-static": "BR2_PACKAGE_BUSYBOX",
        "e2fsprogs": "BR2_PACKAGE_E2FSPROGS",
        "nftables": "BR2_PACKAGE_NFTABLES",
    }.items():
        assert deb in debian and cfg[br2] == "y"
    assert cfg["BR2_PACKAGE_MOAT_PAYLOAD"] == "y"
    assert cfg["BR2_STRIP_EXCLUDE_DIRS"] == "usr/lib/moat"


def test_payload_package_installs_like_the_offline_builder() -> None:
    mk = (EXT / "package/moat-payload/moat-payload.mk").read_text()
    assert "$(TARGET_DIR)/usr/lib/moat" in mk
    assert "ln -sf ../lib/moat/moat $(TARGET_DIR)/usr/bin/moat" in mk
    assert "moat-$$verb" in mk
    kconfig = (EXT / "package/moat-payload/Config.in").read_text()
    assert "depends on BR2_TOOLCHAIN_USES_GLIBC" in kconfig
    assert "build/payload/dist/moat" in kconfig
