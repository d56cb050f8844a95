"""`moat ota`: the update repository (admin side) and updates on the box.

Admin host / portal:
    moat ota keygen --repo R --root-keys OFFLINE
    moat ota publish IMAGE --repo R --board pc-x86_64 --version 1.2.0
    moat ota timestamp --repo R           (cron: keep the timestamp fresh)
    moat ota bundle --repo R TARGET -o update.moat
    moat ota rotate-root --repo R --root-keys OLD --new-root-keys NEW
    moat ota inspect --repo R | moat ota inspect BUNDLE
Box:
    moat ota status | check [--bundle F] | install [F]  (--repository URL)
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moat.errors import MoatError
from ota import bootenv
from ota.config import OtaConfig
from ota.schedule import DEFAULT_INTERVAL

# The TUF client, the repository tools and `cryptography` are imported by the
# commands that use them: `moat ota status` (and the console's status) stay
# small and fast on a 128 MiB box.
if TYPE_CHECKING:
    from ota.client import Installer

DEFAULT_CONFIG = "/usr/lib/moat/ota.json"


def _role_values(items: list[str], default: int, what: str) -> dict[str, int]:
    from ota.repository import TOP_ROLES

    out = {r: default for r in TOP_ROLES}
    for item in items:
        role, _, value = item.partition("=")
        if role not in out or not value.isdigit():
            raise MoatError(
                f"bad {what} {item!r} (want ROLE=N, ROLE one of {TOP_ROLES})"
            )
        out[role] = int(value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("keygen", help="create a repository with keys for every role")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--root-keys", type=Path, required=True, help="offline directory")
    p.add_argument("--keys", action="append", default=[], metavar="ROLE=N")
    p.add_argument("--threshold", action="append", default=[], metavar="ROLE=N")
    p.add_argument("--expiry", action="append", default=[], metavar="ROLE=DUR")

    p = sub.add_parser("publish", help="add a slot image as a target")
    p.add_argument("image", type=Path)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--product", default="moat")
    p.add_argument("--board", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--bundle", type=Path, help="also write an offline bundle")

    p = sub.add_parser("timestamp", help="re-sign snapshot and timestamp")
    p.add_argument("--repo", type=Path, required=True)

    p = sub.add_parser("bundle", help="single-file offline bundle of one target")
    p.add_argument("target")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)

    p = sub.add_parser("rotate-root", help="new root signed by old and new root keys")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--root-keys", type=Path, required=True, help="current root keys")
    p.add_argument("--new-root-keys", type=Path, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--threshold", type=int, default=1)
    p.add_argument(
        "--rotate",
        action="append",
        default=[],
        choices=["targets", "snapshot", "timestamp"],
    )

    p = sub.add_parser("inspect", help="show roles, keys, expiry and targets")
    p.add_argument("bundle", nargs="?", type=Path)
    p.add_argument("--repo", type=Path)

    for name, text in (
        ("status", "show the slots and the boot environment"),
        ("check", "verify the repository (or a bundle) and show the update"),
        ("install", "install the update into the idle slot"),
        ("watch", "check the repository on a schedule and install updates"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--config",
            type=Path,
            default=Path(os.environ.get("MOAT_OTA_CONFIG", DEFAULT_CONFIG)),
        )
        if name in ("check", "install"):
            p.add_argument(
                "--repository",
                metavar="URL",
                help="instead of ota.json's repository_url",
            )
        if name == "check":
            p.add_argument("--bundle", type=Path)
        if name == "install":
            p.add_argument("file", nargs="?", type=Path, help="offline bundle")
        if name == "watch":
            p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL)
            p.add_argument(
                "--reboot", action="store_true", help="reboot into an installed update"
            )


def run(args: argparse.Namespace) -> int:
    return int(_COMMANDS[args.cmd](args))


def _keygen(args: argparse.Namespace) -> int:
    from ota.repository import DEFAULT_EXPIRY, Repository, parse_duration

    expiry = dict(DEFAULT_EXPIRY)
    for item in args.expiry:
        role, _, dur = item.partition("=")
        if role not in expiry:
            raise MoatError(f"bad --expiry {item!r}")
        expiry[role] = parse_duration(dur)
    counts = _role_values(args.keys, 1, "--keys")
    thresholds = _role_values(args.threshold, 1, "--threshold")
    Repository(args.repo).keygen(args.root_keys, counts, thresholds, expiry)
    print(f"repository {args.repo} created; keep {args.root_keys} offline")
    print(f"the box trusts {Repository(args.repo).root_versions()[0]}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from ota.repository import Repository

    repo = Repository(args.repo)
    name = repo.publish(args.image, args.product, args.board, args.version)
    print(f"published {name}")
    if args.bundle:
        repo.bundle(name, args.bundle)
        print(f"bundle {args.bundle}")
    return 0


def _timestamp(args: argparse.Namespace) -> int:
    from ota.repository import Repository

    Repository(args.repo).refresh_timestamp()
    print("snapshot and timestamp re-signed")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from ota.repository import Repository

    Repository(args.repo).bundle(args.target, args.output)
    print(f"bundle {args.output}")
    return 0


def _rotate_root(args: argparse.Namespace) -> int:
    from ota.repository import Repository

    version = Repository(args.repo).rotate_root(
        args.root_keys,
        args.new_root_keys,
        args.count,
        args.threshold,
        tuple(args.rotate),
    )
    print(f"root version {version} written; keep {args.new_root_keys} offline")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

    from ota.client import BundleFetcher
    from ota.repository import Repository, describe_metadata

    mds: dict[str, Metadata[Any]] = {}
    if args.repo:
        repo = Repository(args.repo)
        mds = {
            Root.type: repo.root(),
            Timestamp.type: repo.timestamp(),
            Snapshot.type: repo.snapshot(),
            Targets.type: repo.targets(),
        }
        print(f"repository {args.repo}: {len(repo.root_versions())} root version(s)")
    elif args.bundle:
        fetcher = BundleFetcher(args.bundle)
        index = fetcher.index()
        names = sorted(n for n in fetcher._members if n.startswith("metadata/"))
        print(f"bundle {args.bundle}: target {index.get('target')}, {len(names)} files")
        for name in names:
            md = Metadata.from_bytes(b"".join(fetcher._fetch(name)))
            role = md.signed.type
            if role not in mds or md.signed.version > mds[role].signed.version:
                mds[role] = md
    else:
        raise MoatError("give --repo DIR or a bundle file")
    for line in describe_metadata(mds, datetime.now(UTC)):
        print(line)
    return 0


def _installer(args: argparse.Namespace) -> Installer:
    from ota.client import Installer

    return Installer(OtaConfig.load(args.config), say=lambda m: print(m, flush=True))


def _status(args: argparse.Namespace) -> int:
    cfg = OtaConfig.load(args.config)
    for line in status_lines(cfg):
        print(line)
    return 0


def status_lines(cfg: OtaConfig) -> list[str]:
    try:
        loaded = bootenv.load(cfg.store())
    except (bootenv.BootEnvError, OSError) as exc:
        return [f"boot environment unreadable: {exc}"]
    s = loaded.state
    running = cfg.running()
    lines = [f"product {cfg.product}, board {cfg.board}, running {cfg.version}"]
    for slot in bootenv.SLOTS:
        tags = []
        if slot == running:
            tags.append("running")
        if slot == s.good:
            tags.append("good")
        if slot == s.trial:
            tags.append(f"on trial, {s.tries} tries left")
        lines.append(f"slot {slot}: {s.versions.get(slot, '-'):<10} {', '.join(tags)}")
    lines.append(
        f"version floor {s.floor}; boot env seq {s.seq}"
        + (
            ""
            if loaded.other_valid
            else " (other copy invalid, rewritten on next save)"
        )
    )
    return lines


def _check(args: argparse.Namespace) -> int:
    from ota.client import Source

    inst = _installer(args)
    url = args.repository or inst.config.repository_url
    cand = inst.check(Source(url, args.bundle))
    size = cand.target.length
    print(f"update available: {cand.name} version {cand.version} ({size} bytes)")
    return 0


def _install(args: argparse.Namespace) -> int:
    from ota.client import Source

    inst = _installer(args)
    url = args.repository or inst.config.repository_url
    slot = inst.install(Source(url, args.file))
    print(f"reboot to start slot {slot}", file=sys.stderr)
    return 0


def _watch(args: argparse.Namespace) -> int:
    from ota.schedule import Schedule, watch

    inst = _installer(args)
    if not inst.config.repository_url:
        raise MoatError("no repository_url in the ota configuration")
    reboot = (
        inst.config.extra.get("console", {})
        .get("commands", {})
        .get("reboot", ["reboot"])
        if args.reboot
        else None
    )
    watch(inst, inst.config.repository_url, Schedule(interval=args.interval), reboot)
    return 0


_COMMANDS = {
    "keygen": _keygen,
    "publish": _publish,
    "timestamp": _timestamp,
    "bundle": _bundle,
    "rotate-root": _rotate_root,
    "inspect": _inspect,
    "status": _status,
    "check": _check,
    "install": _install,
    "watch": _watch,
}
