"""`moat var`: the /var backup, and a durability workload.

moat var commit     refresh the read-only backup of /var (atomic)
moat var restore    unpack the newest backup into /var (used at boot)
moat var status     show both backup banks
moat var stress     keep committing numbered records (power-cut tests)
moat var verify     check the records `stress` committed
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from moat import varbackup
from moat.durable import atomic_write
from moat.errors import MoatError

log = logging.getLogger(__name__)

BOOT_ENV = Path("/run/moat/boot.env")
STRESS_DIR = Path("/var/moat/stress")
RECORD_PREFIX = "rec-"


def boot_env(path: Path = BOOT_ENV) -> dict[str, str]:
    """The facts the init script found (devices, slot), or {} off the box."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    env = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            env[name.strip()] = " ".join(shlex.split(value))
    return env


def backup_device(given: Path | None) -> Path:
    if given is not None:
        return given
    device = boot_env().get("MOAT_VARBACKUP_DEV")
    if not device:
        raise MoatError("no backup device: not on a Moat box; use --device")
    return Path(device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("commit", "refresh the backup of /var"),
        ("restore", "unpack the newest backup into /var"),
        ("status", "show the backup banks"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--device", type=Path, help="backup partition or file")
        p.add_argument("--target", type=Path, default=Path("/var"))
        if name == "restore":
            p.add_argument(
                "--replace",
                action="store_true",
                help="remove what /var holds beyond the backup first (a live /var)",
            )
    stress = sub.add_parser("stress", help="commit numbered records until killed")
    stress.add_argument("--dir", type=Path, default=STRESS_DIR)
    stress.add_argument("--count", type=int, default=0, help="stop after N (0: never)")
    stress.add_argument("--size", type=int, default=512, help="record body bytes")
    stress.add_argument(
        "--verify-acked",
        type=int,
        metavar="N",
        help="first check that records up to N survived (as `verify --acked`)",
    )
    verify = sub.add_parser("verify", help="check the committed records")
    verify.add_argument("--dir", type=Path, default=STRESS_DIR)
    verify.add_argument(
        "--acked", type=int, default=0, help="last record acknowledged before"
    )


def record_body(sequence: int, size: int) -> bytes:
    seed = hashlib.sha256(b"moat-record-%d" % sequence).digest()
    return (seed * (size // len(seed) + 1))[:size]


def encode_record(sequence: int, size: int) -> bytes:
    body = record_body(sequence, size)
    return b"%d %s\n" % (sequence, hashlib.sha256(body).hexdigest().encode()) + body


def check_record(sequence: int, data: bytes) -> bool:
    head, sep, body = data.partition(b"\n")
    if not sep:
        return False
    expect = b"%d %s" % (sequence, hashlib.sha256(body).hexdigest().encode())
    return head == expect and body == record_body(sequence, len(body))


RING = 64  # records live in RING files, so /var never fills up


def _ring_path(directory: Path, sequence: int) -> Path:
    return directory / f"{RECORD_PREFIX}{sequence % RING:02d}"


def read_ring(directory: Path) -> tuple[dict[int, int], list[str]]:
    """Ring slot -> sequence it holds, and the names of torn slot files."""
    held: dict[int, int] = {}
    torn: list[str] = []
    for path in sorted(directory.glob(RECORD_PREFIX + "*")):
        head = path.read_bytes()
        number = head.split(b" ", 1)[0]
        if not number.isdigit() or not check_record(int(number), head):
            torn.append(path.name)
            continue
        held[int(number) % RING] = int(number)
    return held, torn


def stress(directory: Path, count: int, size: int) -> int:
    """Commit records next..; print `committed N` once each is durable."""
    directory.mkdir(parents=True, exist_ok=True)
    held, _ = read_ring(directory)
    sequence = max(held.values(), default=0) + 1
    print(f"stress: starting at {sequence}", flush=True)
    written = 0
    while count == 0 or written < count:
        atomic_write(_ring_path(directory, sequence), encode_record(sequence, size))
        print(f"committed {sequence}", flush=True)
        sequence += 1
        written += 1
    return 0


def verify(directory: Path, acked: int) -> int:
    """Every acknowledged record of the last RING must be there, intact."""
    held, torn = read_ring(directory)
    last = max(held.values(), default=0)
    lost = [
        n
        for n in range(max(1, acked - RING + 1), acked + 1)
        if held.get(n % RING, 0) < n
    ]
    print(f"records {len(held)} last {last} torn {len(torn)} lost {len(lost)}")
    for name in torn[:10]:
        print(f"torn {name}")
    for n in lost[:10]:
        print(f"lost {n}")
    return 0 if not torn and not lost else 1


def run(args: argparse.Namespace) -> int:
    if args.action == "stress":
        if args.verify_acked is not None and verify(args.dir, args.verify_acked):
            return 1
        return stress(args.dir, args.count, args.size)
    if args.action == "verify":
        return verify(args.dir, args.acked)
    device = backup_device(args.device)
    if args.action == "commit":
        started = time.monotonic()
        bank = varbackup.commit(args.target, device)
        assert bank.header is not None
        took = time.monotonic() - started
        print(
            f"backup {bank.header.sequence} committed to bank {bank.index} "
            f"({bank.header.length} bytes, {took:.1f} s)"
        )
        log.info("/var backup %d committed", bank.header.sequence)
        return 0
    if args.action == "restore":
        bank = varbackup.restore(device, args.target, replace=args.replace)
        assert bank.header is not None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(bank.header.written_at))
        print(f"backup {bank.header.sequence} from {when} UTC (bank {bank.index})")
        return 0
    fd = os.open(device, os.O_RDONLY)
    try:
        all_banks = varbackup.banks(fd)
    finally:
        os.close(fd)
    best = varbackup.newest(all_banks)
    for bank in all_banks:
        state = "valid" if bank.valid else "empty or damaged"
        seq = bank.header.sequence if bank.header else "-"
        mark = " (newest)" if best and best.index == bank.index else ""
        print(f"bank {bank.index}: sequence {seq}, {state}{mark}")
    sys.stdout.flush()
    return 0
