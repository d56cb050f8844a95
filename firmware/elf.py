"""Just enough ELF64 reading for the builder: sections, NEEDED, .modinfo."""

from __future__ import annotations

import struct
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
EHDR_SIZE = 64
SHDR_SIZE = 64
DT_NULL = 0
DT_NEEDED = 1
DYN_ENTRY_SIZE = 16


class ElfError(ValueError):
    pass


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a 64-bit little-endian ELF file."""
    if len(data) < EHDR_SIZE or data[:4] != ELF_MAGIC or data[4] != ELFCLASS64:
        raise ElfError("not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize != SHDR_SIZE or shoff + shnum * SHDR_SIZE > len(data):
        raise ElfError("bad section header table")
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * SHDR_SIZE
        )
        headers.append((name, _type, offset, size))
    if shstrndx >= shnum:
        raise ElfError("bad section name table index")
    _, _, stroff, strsize = headers[shstrndx]
    names = data[stroff : stroff + strsize]
    result = {}
    for name, stype, offset, size in headers:
        end = names.find(b"\0", name)
        label = names[name:end].decode(errors="replace")
        nobits = stype == 8  # SHT_NOBITS occupies no file space
        result[label] = b"" if nobits else data[offset : offset + size]
    return result


def needed(path: Path) -> list[str]:
    """The DT_NEEDED shared libraries of an ELF file."""
    secs = sections(path.read_bytes())
    dynamic, dynstr = secs.get(".dynamic", b""), secs.get(".dynstr", b"")
    result = []
    for i in range(0, len(dynamic) - DYN_ENTRY_SIZE + 1, DYN_ENTRY_SIZE):
        tag, value = struct.unpack_from("<qQ", dynamic, i)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            end = dynstr.find(b"\0", value)
            result.append(dynstr[value:end].decode())
    return result


def modinfo(path: Path) -> dict[str, list[str]]:
    """A kernel module's .modinfo fields (key -> values)."""
    info: dict[str, list[str]] = {}
    for item in sections(path.read_bytes()).get(".modinfo", b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info
