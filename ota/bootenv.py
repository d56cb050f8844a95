"""Boot-slot selection in two redundant GRUB environment blocks.

GRUB has no redundant environment and rewrites its 1024-byte block in place,
so a power cut during a write can leave a block torn. We keep TWO blocks in
GRUB's own format and never write the block that is in use:

    # GRUB Environment Block
    moat_seq=1000000042        <- first line, sector 0 (SEQ_BASE + 42)
    moat_good=a                   slot booted by default (proven good)
    moat_try=b                    slot to try once more, or "-"
    moat_tries=3                  tries left for moat_try; GRUB decrements it
    moat_a=1.2.0                  version in slot a ("-": empty/unknown)
    moat_b=1.3.0
    moat_floor=1.2.0              lowest version we may install above
    ####...#### (padding)
    moat_seal=1000000042       <- last line, ends at byte 1023 (sector 1)

A block is valid when the signature is intact and `moat_seal == moat_seq`.
The newest valid block (highest seq) wins. Linux writes the new state with
seq + 1 into the OTHER block, then fsyncs: a torn write (any prefix of the new
bytes over the old ones) leaves seq and seal disagreeing, so the block in use
stays the winner. GRUB only ever changes `moat_tries` in the winning block:
same-length value, so GRUB's in-place save_env changes one byte in sector 0
(a torn write there at worst invalidates that block, and the other block,
the state before the last switch, names a slot that booted before).
GRUB's script (board/grub/ota.cfg) mirrors `grub_choose` below.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

ENVBLK_SIZE = 1024
ENVBLK_SIGNATURE = b"# GRUB Environment Block\n"
SEQ_DIGITS = 10
# stored as SEQ_BASE + seq: fixed width for string compare, and no leading zero
# because GRUB's `test -gt` parses numbers with base 0 (a leading 0 = octal)
# in a 32-bit long on i386-pc
SEQ_BASE = 10**9
MAX_SEQ = 10**9 - 1
MAX_TRIES = 3
SLOTS = ("a", "b")
NO_SLOT = "-"
VERSION_RE = re.compile(r"^[0-9A-Za-z.+~-]{1,32}$")

# variables in sector order; moat_seal is appended at the very end
_FIELDS = (
    "moat_seq",
    "moat_good",
    "moat_try",
    "moat_tries",
    "moat_a",
    "moat_b",
    "moat_floor",
)


class BootEnvError(Exception):
    """A boot environment block is malformed, or no block is valid."""


@dataclass(frozen=True)
class BootState:
    """What the boot loader is told: which slot is good, which is on trial."""

    seq: int
    good: str
    trial: str  # NO_SLOT when nothing is on trial
    tries: int
    versions: dict[str, str]
    floor: str


def other_slot(slot: str) -> str:
    return SLOTS[1 - SLOTS.index(slot)]


def encode(state: BootState) -> bytes:
    """One 1024-byte GRUB environment block holding `state`."""
    values = {
        "moat_seq": str(SEQ_BASE + state.seq),
        "moat_good": state.good,
        "moat_try": state.trial,
        "moat_tries": str(state.tries),
        "moat_a": state.versions.get("a", NO_SLOT),
        "moat_b": state.versions.get("b", NO_SLOT),
        "moat_floor": state.floor,
    }
    _check(state)
    body = ENVBLK_SIGNATURE + b"".join(
        f"{name}={values[name]}\n".encode() for name in _FIELDS
    )
    seal = f"moat_seal={SEQ_BASE + state.seq}\n".encode()
    # padding is a '#' comment run ended by a newline so the seal line parses
    pad = ENVBLK_SIZE - len(body) - len(seal)
    if pad < 2:
        raise BootEnvError("boot state does not fit one environment block")
    block = body + b"#" * (pad - 1) + b"\n" + seal
    assert len(block) == ENVBLK_SIZE
    return block


def _check(state: BootState) -> None:
    if state.good not in SLOTS:
        raise BootEnvError(f"good slot {state.good!r} is not a or b")
    if state.trial not in (*SLOTS, NO_SLOT):
        raise BootEnvError(f"trial slot {state.trial!r} is not a, b or -")
    if not 0 <= state.tries <= MAX_TRIES:
        raise BootEnvError(f"tries {state.tries} out of 0..{MAX_TRIES}")
    if not 0 <= state.seq <= MAX_SEQ:
        raise BootEnvError("sequence number out of range")
    for value in (*state.versions.values(), state.floor):
        if not VERSION_RE.fullmatch(value):
            raise BootEnvError(f"bad version string {value!r}")


def parse_vars(block: bytes) -> dict[str, str]:
    """Variables of a GRUB environment block, parsed the way GRUB does."""
    if len(block) != ENVBLK_SIZE:
        raise BootEnvError(f"block is {len(block)} bytes, not {ENVBLK_SIZE}")
    if not block.startswith(ENVBLK_SIGNATURE):
        raise BootEnvError("GRUB environment signature missing")
    out: dict[str, str] = {}
    for line in block[len(ENVBLK_SIGNATURE) :].split(b"\n"):
        if not line or line.startswith(b"#") or b"=" not in line:
            continue
        name, _, value = line.partition(b"=")
        out[name.decode(errors="replace")] = value.decode(errors="replace")
    return out


def decode(block: bytes) -> BootState:
    """The state in `block`; BootEnvError if the block is torn or malformed."""
    env = parse_vars(block)
    seq, seal = env.get("moat_seq", ""), env.get("moat_seal", "")
    if len(seq) != SEQ_DIGITS or not seq.isdigit() or seq[0] != "1" or seq != seal:
        raise BootEnvError("sequence and seal disagree (torn or foreign block)")
    try:
        state = BootState(
            seq=int(seq) - SEQ_BASE,
            good=env["moat_good"],
            trial=env["moat_try"],
            tries=int(env["moat_tries"]),
            versions={"a": env["moat_a"], "b": env["moat_b"]},
            floor=env["moat_floor"],
        )
    except (KeyError, ValueError) as exc:
        raise BootEnvError(f"missing or bad variable: {exc}") from exc
    _check(state)
    return state


class BlockStore:
    """Where the two 1024-byte blocks live: a file or a raw disk at offsets.

    On the box this is the disk itself (blocks in the gap before the first
    partition, read by GRUB as a blocklist); in tests it is a plain file.
    """

    def __init__(self, path: str | os.PathLike[str], offsets: tuple[int, int]):
        self.path = Path(path)
        self.offsets = offsets

    def read(self, index: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return f.read(ENVBLK_SIZE)

    def write(self, index: int, block: bytes) -> None:
        """Write one block in place and make it durable before returning."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view = memoryview(block)
            offset = self.offsets[index]
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            os.fsync(fd)
        finally:
            os.close(fd)


FIBMAP = 1  # ioctl: file block -> filesystem block (linux/fs.h)
FIGETBSZ = 2  # ioctl: filesystem block size


def locate(file: str | os.PathLike[str]) -> int:
    """Byte offset of `file`'s data inside its (mounted, e.g. read-only) filesystem.

    GRUB reads and rewrites the blocks through the filesystem; we write the
    same sectors on the partition device, so no filesystem metadata is ever
    written by us (no mtime, no superblock state), only those data sectors.
    """
    fd = os.open(file, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != ENVBLK_SIZE:
            raise BootEnvError(f"{file}: not a {ENVBLK_SIZE}-byte environment block")
        (bsz,) = struct.unpack("i", fcntl.ioctl(fd, FIGETBSZ, struct.pack("i", 0)))
        blocks = []
        for i in range((ENVBLK_SIZE + bsz - 1) // bsz):
            (b,) = struct.unpack("i", fcntl.ioctl(fd, FIBMAP, struct.pack("i", i)))
            blocks.append(b)
    finally:
        os.close(fd)
    if 0 in blocks or blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        raise BootEnvError(f"{file}: blocks {blocks} are not contiguous")
    return int(blocks[0] * bsz)


@dataclass(frozen=True)
class Loaded:
    state: BootState
    index: int  # which block holds it
    other_valid: bool


def load(store: BlockStore) -> Loaded:
    """The newest valid state, and which block it came from."""
    states: list[BootState | None] = []
    for index in (0, 1):
        try:
            states.append(decode(store.read(index)))
        except (BootEnvError, OSError) as exc:
            log.warning("boot env block %d invalid: %s", index, exc)
            states.append(None)
    s0, s1 = states
    if s0 is None and s1 is None:
        raise BootEnvError("both boot environment blocks are invalid")
    if s1 is None or (s0 is not None and s0.seq >= s1.seq):
        assert s0 is not None
        return Loaded(s0, 0, s1 is not None)
    return Loaded(s1, 1, s0 is not None)


def save(
    store: BlockStore,
    change: Callable[[BootState], BootState],
) -> BootState:
    """Apply `change` to the newest state; write it with seq+1 to the other block.

    This is the only write path; the block in use is never touched, so a
    crash at any byte of the write leaves the previous state in force.
    """
    current = load(store)
    new = replace(change(current.state), seq=current.state.seq + 1)
    store.write(1 - current.index, encode(new))
    log.info(
        "boot env: seq %d good=%s try=%s tries=%d floor=%s",
        new.seq,
        new.good,
        new.trial,
        new.tries,
        new.floor,
    )
    return new


def initial_blocks(good: str, version: str) -> bytes:
    """Both blocks for a fresh image: slot `good` holds `version`, nothing else."""
    versions = {s: (version if s == good else NO_SLOT) for s in SLOTS}
    state = BootState(
        seq=1, good=good, trial=NO_SLOT, tries=0, versions=versions, floor=version
    )
    # block 1 holds an older copy so both are valid from the start
    older = replace(state, seq=0)
    return encode(state) + encode(older)


@dataclass(frozen=True)
class BootChoice:
    slot: str
    trial: bool
    fell_back_from: str | None
    new_tries: int | None  # value GRUB writes back, None: no write


def grub_choose(state: BootState) -> BootChoice:
    """What board/grub/ota.cfg does with the newest valid block.

    A slot on trial with tries left is booted and its counter decremented
    first; with no tries left GRUB boots the good slot (a fall-back).
    """
    if state.trial != NO_SLOT and state.tries > 0:
        return BootChoice(state.trial, True, None, state.tries - 1)
    if state.trial != NO_SLOT:
        return BootChoice(state.good, False, state.trial, None)
    return BootChoice(state.good, False, None, None)


def grub_boot(store: BlockStore) -> BootChoice:
    """Simulate one boot: choose like GRUB and apply GRUB's in-place write."""
    try:
        loaded = load(store)
    except BootEnvError:
        # ota.cfg boots slot a when no block is valid
        return BootChoice("a", False, None, None)
    choice = grub_choose(loaded.state)
    if choice.new_tries is not None:
        block = bytearray(store.read(loaded.index))
        key = b"\nmoat_tries="
        at = block.index(key) + len(key)
        block[at : at + 1] = str(choice.new_tries).encode()
        store.write(loaded.index, bytes(block))
    return choice


def main(argv: list[str] | None = None) -> int:
    """`python -m ota.bootenv init --good a --version V OUT` for image builders."""
    parser = argparse.ArgumentParser(prog="python -m ota.bootenv")
    sub = parser.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="write both initial blocks (2048 bytes)")
    init.add_argument("--good", choices=SLOTS, default="a")
    init.add_argument("--version", required=True)
    init.add_argument("out")
    show = sub.add_parser("show", help="print the newest valid state")
    show.add_argument("file")
    show.add_argument("--offset", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "init":
        Path(args.out).write_bytes(initial_blocks(args.good, args.version))
        return 0
    loaded = load(BlockStore(args.file, (args.offset, args.offset + ENVBLK_SIZE)))
    print(loaded)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
