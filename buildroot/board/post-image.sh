#!/bin/sh
# Buildroot post-image: the slot squashfs (kernel, initramfs = the target
# without /usr, /usr) and the disk image, laid out by board/partitions.conf
# with the same code as `make image` (python3 -m firmware.disk).
set -eu
images=$1
moat=$(cd "$BR2_EXTERNAL_MOAT_PATH/.." && pwd)
work=$images/moat
rm -rf "$work"
mkdir -p "$work/slot/boot"

cp "$images/bzImage" "$work/slot/boot/vmlinuz"
# the initramfs: every entry but /usr's contents, owned by root, gzipped
# (a raw one packs smaller in the slot but GRUB's xz reading costs ~5 s of boot)
(cd "$TARGET_DIR" && find . -path './usr/*' -prune -o -print | LC_ALL=C sort \
    | cpio --quiet -o -H newc -R 0:0) | gzip -9n > "$work/slot/boot/initrd.img"
cp -a "$TARGET_DIR/usr" "$work/slot/usr"
"$HOST_DIR/bin/mksquashfs" "$work/slot" "$work/slot.squashfs" \
    -comp xz -Xbcj x86 -b 1M -noappend -all-root

cd "$moat"
PATH="$HOST_DIR/bin:$HOST_DIR/sbin:$PATH" python3 -m firmware.disk \
    --slot "$work/slot.squashfs" --core-img "$images/grub.img" \
    --boot-img "$images/boot.img" --work "$work" -o "$images/moat-x86_64.img"
