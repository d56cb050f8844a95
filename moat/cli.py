"""The `moat` multi-call program.

Every function of the appliance is a verb: `moat tunnel ...`, `moat dhcpd ...`.
The program can also be called through a link named after a verb
(`moat-dhcpd` or `dhcpd` -> `moat dhcpd`), the way busybox is.

A verb lives in its own module, imported only when that verb runs, so the
frozen program starts fast. The module provides:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int

To add a verb, add one row to VERBS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from moat import __version__
from moat.errors import MoatError

# verb -> (module, one-line summary shown by `moat --help`)
VERBS: dict[str, tuple[str, str]] = {
    "version": ("moat.version", "print the program version"),
    "tunnel": ("datapath.cli", "run a manually keyed ESP tunnel (TUN <-> ESP)"),
    "dns": ("services.dns.daemon", "DNS server: corporate secondary, forwarder, cache"),
    "portal": ("portal.cli", "the portal: moat database, provisioning, registration"),
    "register": ("portal.register", "register this moat with its portal over ssh"),
    "ota": ("ota.cli", "signed updates: repository, check, install, status"),
    "dhcpd": ("services.dhcp.dhcpd", "DHCP server for the private side"),
    "console": ("ota.console", "serial console recovery menu (ttyS0)"),
    "ntpd": ("services.ntp.daemon", "NTP client of the portal and server for the LAN"),
    "dhcpc": ("services.dhcp.dhcpc", "DHCP client for the wild side, with a hook"),
    "firewall": ("services.firewall", "apply the wild-side nftables lockdown"),
    "supervise": ("moat.supervisor", "start the configured services, keep them up"),
    "var": ("moat.var", "back up and restore /var; durability workload"),
    "wan": (
        "services.wan",
        "the wild side: DHCP or the static address saved in wan.json",
    ),
}


class VerbModule(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _verb_from_argv0(argv0: str) -> str | None:
    name = os.path.basename(argv0)
    if name.startswith("moat-"):
        name = name[len("moat-") :]
    return name if name in VERBS else None


def _overview() -> str:
    width = max(len(v) for v in VERBS)
    rows = [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    return "verbs:\n" + "\n".join(rows) + "\n\n'moat VERB --help' describes a verb."


def _load(verb: str) -> VerbModule:
    return cast(VerbModule, importlib.import_module(VERBS[verb][0]))


def build_parser(verb: str) -> tuple[argparse.ArgumentParser, VerbModule]:
    module = _load(verb)
    parser = argparse.ArgumentParser(
        prog=f"moat {verb}", description=VERBS[verb][1].capitalize() + "."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    module.add_arguments(parser)
    return parser, module


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)
    if os.environ.get("MOAT_LOG_LEVEL"):
        level = logging.getLevelName(os.environ["MOAT_LOG_LEVEL"].upper())
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    verb = _verb_from_argv0(sys.argv[0]) if argv is None else None
    if verb is None:
        if not args_in or args_in[0] in ("-h", "--help"):
            print(f"usage: moat VERB [options]\n\n{_overview()}")
            return 0
        if args_in[0] == "--version":
            print(f"moat {__version__}")
            return 0
        verb, args_in = args_in[0], args_in[1:]
        if verb not in VERBS:
            print(f"moat: unknown verb {verb!r}\n\n{_overview()}", file=sys.stderr)
            return 2

    parser, module = build_parser(verb)
    args = parser.parse_args(args_in)
    setup_logging(args.verbose)
    try:
        return module.run(args)
    except MoatError as exc:
        print(f"moat {verb}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
