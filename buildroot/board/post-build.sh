#!/bin/sh
# Buildroot post-build: TARGET_DIR ($1) gets what board/ adds beyond the
# overlay (BR2_ROOTFS_OVERLAY is board/overlay): partition numbers, NIC
# roles, the kernel modules' boot load order, the release file.
set -eu
target=$1
moat=$(cd "$BR2_EXTERNAL_MOAT_PATH/.." && pwd)
cd "$moat"
mkdir -p "$target/etc/moat"
python3 -c 'from firmware import layout; print(layout.shell_numbers(), end="")' \
    > "$target/etc/moat/partitions"
cp board/nics.conf "$target/etc/moat/nics.conf"
for moddir in "$target"/lib/modules/*/; do
    python3 -m firmware.kmod "$moddir"
done
kver=$(basename "$(ls -d "$target"/lib/modules/*/ | head -n 1)")
version=$(python3 -c 'import moat; print(moat.__version__)')
printf 'BOARD=moat-x86_64\nVERSION=%s\nKERNEL=buildroot %s\n' "$version" "$kver" \
    > "$target/usr/lib/moat-release"
