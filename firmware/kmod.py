"""Kernel modules for the initramfs: dependency closure and load order.

The closure comes from each module's .modinfo `depends=` field, so no depmod
is needed on the build host. The result is written as modules.dep and
modules.alias (the formats busybox modprobe reads) and as `load-order`, the
list the init script insmods one by one at boot (board/modules.txt `boot`);
the others are loaded by busybox modprobe: by device alias, for the devices
/init finds in /sys (`coldplug`), or when the kernel asks for a module
(`demand`: request_module runs /sbin/modprobe with an alias such as
nft-expr-ct).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from firmware.elf import modinfo


def _key(name: str) -> str:
    return name.replace("-", "_")


def index(moddir: Path) -> dict[str, Path]:
    """Module name -> .ko path under moddir (the /lib/modules/KVER tree)."""
    return {_key(ko.name[: -len(".ko")]): ko for ko in moddir.rglob("*.ko")}


def builtin(moddir: Path) -> set[str]:
    """Modules compiled into the kernel (modules.builtin)."""
    path = moddir / "modules.builtin"
    if not path.exists():
        return set()
    return {
        _key(Path(line).name.removesuffix(".ko")) for line in path.read_text().split()
    }


def closure(wanted: list[str], moddir: Path) -> list[str]:
    """The wanted modules and their dependencies, dependencies first
    (modules built into the kernel are left out)."""
    known = index(moddir)
    inside = builtin(moddir)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _key(name)
        if name in seen or (name in inside and name not in known):
            return
        if name not in known:
            raise KeyError(f"kernel module {name} not found (needed by {chain})")
        seen.add(name)
        deps = modinfo(known[name]).get("depends", [""])[0]
        for dep in filter(None, deps.split(",")):
            visit(dep, (*chain, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def install(
    wanted: list[str], moddir: Path, dest: Path, at_boot: list[str]
) -> list[str]:
    """Copy the closure of `wanted` into dest (a /lib/modules/KVER dir);
    `load-order` lists the closure of `at_boot` only."""
    known = index(moddir)
    order = closure(wanted, moddir)
    dep_lines, alias_lines = [], []
    for name in order:
        rel = known[name].relative_to(moddir)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(known[name], dest / rel)
        info = modinfo(known[name])
        # kmod's format: every dependency, transitively, the one to load
        # first last (busybox modprobe loads the list from its end)
        deps = [d for d in closure([name], moddir) if d != name][::-1]
        dep_paths = " ".join(str(known[d].relative_to(moddir)) for d in deps)
        dep_lines.append(f"{rel}: {dep_paths}".rstrip())
        alias_lines += [f"alias {a} {name}" for a in info.get("alias", [])]
    (dest / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    (dest / "modules.alias").write_text("\n".join(alias_lines) + "\n")
    rels = [str(known[n].relative_to(moddir)) for n in closure(at_boot, moddir)]
    (dest / "load-order").write_text("\n".join(rels) + "\n")
    for name in ("modules.builtin", "modules.order"):
        if (moddir / name).exists():
            shutil.copy2(moddir / name, dest / name)
    return order


def write_load_order(moddir: Path, at_boot: list[str]) -> list[str]:
    """Write moddir/load-order for a tree installed by another builder."""
    known = index(moddir)
    order = closure(at_boot, moddir)
    rels = [str(known[n].relative_to(moddir)) for n in order]
    (moddir / "load-order").write_text("\n".join(rels) + "\n")
    return order


def main() -> int:
    from firmware import layout

    parser = argparse.ArgumentParser(description="write load-order for board/")
    parser.add_argument("moddir", type=Path, help="a /lib/modules/KVER tree")
    args = parser.parse_args()
    order = write_load_order(args.moddir, layout.boot_modules())
    print(f"kmod: {len(order)} modules at boot in {args.moddir}/load-order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
