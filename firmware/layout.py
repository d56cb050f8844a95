"""The board's disk layout (board/partitions.conf, board/disk.conf)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BOARD = REPO / "board"
SECTOR_SIZE = 512
# sectors before the first partition hold boot.img (sector 0) and core.img
CORE_IMG_SECTORS = 2047


@dataclass(frozen=True)
class Partition:
    name: str
    number: int
    start: int  # sectors
    sectors: int
    type: str  # MBR type byte, hex

    @property
    def offset(self) -> int:
        return self.start * SECTOR_SIZE

    @property
    def size(self) -> int:
        return self.sectors * SECTOR_SIZE


def _rows(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append(line.split())
    return rows


def partitions(board: Path = BOARD) -> dict[str, Partition]:
    parts = {}
    for name, number, start, sectors, ptype, *_ in _rows(board / "partitions.conf"):
        parts[name] = Partition(name, int(number), int(start), int(sectors), ptype)
    return parts


def disk_conf(board: Path = BOARD) -> dict[str, str]:
    conf = {}
    for row in _rows(board / "disk.conf"):
        key, _, value = row[0].partition("=")
        conf[key] = value
    return conf


def disk_sectors(board: Path = BOARD) -> int:
    return int(disk_conf(board)["DISK_SECTORS"])


def sfdisk_script(board: Path = BOARD) -> str:
    """Input for `sfdisk` that writes the board's partition table."""
    lines = [
        "label: dos",
        f"label-id: 0x{disk_conf(board)['DISK_ID']}",
        "unit: sectors",
    ]
    for part in sorted(partitions(board).values(), key=lambda p: p.number):
        lines.append(f"start={part.start}, size={part.sectors}, type={part.type}")
    return "\n".join(lines) + "\n"


def shell_numbers(board: Path = BOARD) -> str:
    """/etc/moat/partitions for the init script: PART_<NAME>=<number>."""
    rows = [
        f"PART_{p.name.upper()}={p.number}"
        for p in sorted(partitions(board).values(), key=lambda p: p.number)
    ]
    return "# generated from board/partitions.conf\n" + "\n".join(rows) + "\n"


def nic_roles(board: Path = BOARD) -> dict[str, str]:
    """Kernel interface name -> role (wild, private, kid)."""
    return {row[0]: row[1] for row in _rows(board / "nics.conf")}


def names(path: Path) -> list[str]:
    """The first word of every non-comment line of a board list file."""
    return [row[0] for row in _rows(path)]


def modules(board: Path = BOARD) -> dict[str, str]:
    """Kernel module -> when it is loaded (boot, coldplug, demand)."""
    return {row[0]: row[1] for row in _rows(board / "modules.txt")}


def boot_modules(board: Path = BOARD) -> list[str]:
    """The modules /init loads itself (`load-order`); coldplug ones are loaded
    by device alias, demand ones by the kernel (request_module -> modprobe)."""
    return [name for name, when in modules(board).items() if when == "boot"]
