"""GRUB's environment block: a 1024-byte file of `name=value` lines.

GRUB reads it with `load_env` and rewrites it in place with `save_env`; it
never grows or moves the file, so a writer must keep the size and may write
the same bytes in place (as GRUB does) or replace the file whole.
Format: the header line, one `name=value` line per variable, `#` padding.
Values holding a newline or a backslash (which GRUB escapes) are refused.
"""

from __future__ import annotations

from moat.errors import MoatError

BLOCK_SIZE = 1024
HEADER = b"# GRUB Environment Block\n"
PAD = b"#"


class GrubEnvError(MoatError):
    pass


def encode(env: dict[str, str]) -> bytes:
    body = HEADER
    for name, value in env.items():
        if not name or any(c in name for c in "=\n\\#"):
            raise GrubEnvError(f"bad GRUB variable name {name!r}")
        if "\n" in value or "\\" in value:
            raise GrubEnvError(f"GRUB variable {name}: no newline or backslash")
        body += f"{name}={value}\n".encode()
    if len(body) > BLOCK_SIZE:
        raise GrubEnvError(f"GRUB environment too large ({len(body)} bytes)")
    return body + PAD * (BLOCK_SIZE - len(body))


def decode(block: bytes) -> dict[str, str]:
    if len(block) != BLOCK_SIZE or not block.startswith(HEADER):
        raise GrubEnvError("not a GRUB environment block")
    text = block[len(HEADER) :].decode(errors="replace")
    env: dict[str, str] = {}
    for entry in text.split("\n")[:-1]:  # the last piece is padding
        if entry.startswith("#"):
            continue
        name, sep, value = entry.partition("=")
        if not sep or not name:
            raise GrubEnvError(f"bad line in GRUB environment: {entry[:40]!r}")
        env[name] = value
    return env
