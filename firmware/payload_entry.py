"""Entry point PyInstaller freezes: the `moat` multi-call program.

With MOAT_FROZEN_CHECK=pkg1,pkg2 set (the payload build's frozen check), it
imports every submodule of those packages instead, prints how many, and
exits: a module or binary left out of the payload that one of them needs
fails there, on the build host. The ESP transforms load native code when
first keyed (pycryptodome's cipher modes), so each also seals and opens one
packet.
"""

import importlib
import os
import pkgutil
import sys

from moat.cli import main


def import_all(packages: list[str]) -> int:
    count = 0
    for name in packages:
        package = importlib.import_module(name)
        count += 1
        prefix = name + "."
        for info in pkgutil.walk_packages(package.__path__, prefix):
            if info.name.endswith(".__main__"):  # runs the program
                continue
            importlib.import_module(info.name)
            count += 1
    return count


def transform_round_trips() -> int:
    from datapath.transform import TRANSFORMS, make_transform

    for name, cls in TRANSFORMS.items():
        sizes, auth_size = cls.key_lengths()
        key, auth_key = os.urandom(sizes[0]), os.urandom(auth_size)
        sender = make_transform(name, 1, key, auth_key)
        receiver = make_transform(name, 1, key, auth_key)
        if receiver.open(sender.seal(1, b"frozen check", 59), 1) is None:
            raise SystemExit(f"{name}: a sealed packet did not open")
    return len(TRANSFORMS)


if __name__ == "__main__":
    check = os.environ.get("MOAT_FROZEN_CHECK")
    if check:
        modules = import_all(check.split(","))
        print(f"{modules} modules imported, {transform_round_trips()} transforms")
        sys.exit(0)
    sys.exit(main())
