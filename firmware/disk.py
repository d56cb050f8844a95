"""Assemble the disk image from a slot squashfs someone else built.

    python -m firmware.disk --slot SLOT.squashfs --core-img grub.img \\
        --boot-img boot.img -o moat-x86_64.img

Used by the Buildroot post-image script: the same partitions, GRUB
environment, /var and /var backup as `make image`, around Buildroot's slot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from firmware.image import BuildError, write_disk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slot", type=Path, required=True)
    parser.add_argument("--core-img", type=Path, required=True)
    parser.add_argument("--boot-img", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    try:
        args.work.mkdir(parents=True, exist_ok=True)
        write_disk(args.output, args.slot, args.core_img, args.boot_img, args.work)
    except BuildError as exc:
        print(f"disk: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
