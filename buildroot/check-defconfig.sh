#!/bin/sh
# Load the Moat defconfig into a Buildroot checkout and fail if Kconfig
# dropped or changed any of its lines (an unmet dependency, a renamed or
# unknown symbol: Buildroot does this silently).
#   buildroot/check-defconfig.sh /path/to/buildroot [output dir]
set -eu
buildroot=${1:?usage: $0 BUILDROOT_DIR [OUTPUT_DIR]}
ext=$(cd "$(dirname "$0")" && pwd)
out=${2:-$(mktemp -d)}
make -s -C "$buildroot" O="$out" BR2_EXTERNAL="$ext" moat_x86_64_defconfig > /dev/null
lost=0
while IFS= read -r line; do
    case "$line" in ''|'#') continue;; esac
    if ! grep -qxF "$line" "$out/.config"; then
        echo "lost: $line"
        lost=$((lost + 1))
    fi
done < "$ext/configs/moat_x86_64_defconfig"
total=$(grep -c . "$ext/configs/moat_x86_64_defconfig")
if [ "$lost" -ne 0 ]; then
    echo "check-defconfig: $lost of $total lines did not survive"
    exit 1
fi
echo "check-defconfig: all $total lines are in $out/.config"
