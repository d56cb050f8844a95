"""`moat portal SUBCOMMAND`: provisioning, registration, the portal daemon.

    moat portal init --endpoint IP --pool NET --host-key FILE ...
    moat portal add ID --email ADDR [--wild dhcp|IP] [--subnet NET] --out DIR|TAR
    moat portal import FILE.csv [--out DIR]
    moat portal export [--out FILE.csv]
    moat portal list | show ID | remove ID
    moat portal run                         # the daemon (datapath + control socket)
    moat portal register-session --id ID    # sshd's forced command
    moat portal authorized-keys USER TYPE KEY   # sshd's AuthorizedKeysCommand
    moat portal sshd-config                 # the sshd_config lines to use

Every subcommand takes --db DIR (default $MOAT_PORTAL_DB or
/var/lib/moat/portal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moat.durable import atomic_write_text
from moat.errors import ConfigError, MoatError

DEFAULT_DB = "/var/lib/moat/portal"
EXIT_REFUSED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get("MOAT_PORTAL_DB", DEFAULT_DB),
        help="database directory (default: $MOAT_PORTAL_DB or %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("init", help="create a database and its portal.toml")
    p.add_argument("--endpoint", required=True, help="tunnel endpoint (IPv4)")
    p.add_argument("--pool", required=True, help="private subnets come from here")
    p.add_argument("--prefix", type=int, default=28, help="subnet size (bits)")
    p.add_argument("--host-key", required=True, help="sshd host public key file")
    p.add_argument(
        "--network",
        action="append",
        required=True,
        help="a corporate network behind the portal (repeat for more)",
    )
    p.add_argument(
        "--ssh-host", default="", help="registration host (default: endpoint)"
    )
    p.add_argument("--ssh-port", type=int, default=22)
    p.add_argument("--ssh-user", default="moat")
    p.add_argument("--port", type=int, default=4500, help="ESP-in-UDP port")
    p.add_argument("--encapsulation", default="udp", choices=("udp", "esp"))
    p.add_argument("--control", default="/run/moat/portal.sock")
    p.add_argument(
        "--register-command",
        default="",
        help="forced command sshd runs for a moat, before '--socket PATH --id ID'"
        " (default: the system python3 running portal/forced_command.py)",
    )
    p.add_argument(
        "--ssh-kex",
        default="",
        help="key exchange algorithms, in the order moats ask for them",
    )
    p.add_argument("--outbox", default="", help="welcome mails (default: DB/outbox)")
    p.add_argument("--smtp", default="", help="host:port to send welcome mails")
    p.add_argument("--mail-from", default="moat-portal@localhost")

    p = sub.add_parser("add", help="provision a new moat")
    p.add_argument("id")
    p.add_argument("--email", required=True)
    p.add_argument("--wild", default="dhcp", help="'dhcp' or the static address")
    p.add_argument("--subnet", help="private subnet (default: next from the pool)")
    p.add_argument("--ssh-key", help="existing public key line (no new identity)")
    p.add_argument("--out", required=True, help="the moat's file set: dir or .tar.gz")
    p.add_argument("--no-mail", action="store_true", help="do not send welcome mail")

    p = sub.add_parser("import", help="add moats from a CSV file")
    p.add_argument("csv", help=f"columns: {', '.join(_csv_fields())} ('-' = stdin)")
    p.add_argument("--out", help="directory for the new moats' file sets")
    p.add_argument("--no-mail", action="store_true")

    p = sub.add_parser("export", help="write every moat as CSV (for import)")
    p.add_argument("--out", help="file (default: stdout)")

    p = sub.add_parser("list", help="every moat, and records that were skipped")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("show", help="one moat's record (keys hidden)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("remove", help="delete a moat")
    p.add_argument("id")

    p = sub.add_parser("run", help="the portal daemon (datapath for every moat)")
    p.add_argument("--tun", default="portal0", help="TUN device name")

    p = sub.add_parser("status", help="ask the running daemon")
    p.add_argument("--verbose", action="store_true", help="every peer's SAs")

    p = sub.add_parser(
        "register-session", help="sshd forced command (slower than forced_command.py)"
    )
    p.add_argument("--socket", help="control socket (default: from portal.toml)")
    p.add_argument("--id", required=True)

    p = sub.add_parser("authorized-keys", help="sshd AuthorizedKeysCommand")
    p.add_argument("user")
    p.add_argument("key_type")
    p.add_argument("key")

    p = sub.add_parser(
        "sshd-config", help="write the key lookup script, print sshd_config lines"
    )
    p.add_argument(
        "--keys-command",
        required=True,
        help="where to write the AuthorizedKeysCommand script (absolute path"
        " whose directories are root-owned)",
    )
    p.add_argument("--keys-user", default="nobody")


def _csv_fields() -> tuple[str, ...]:
    from portal.record import CSV_FIELDS

    return CSV_FIELDS


def run(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace], int] = HANDLERS[args.command]
    return handler(args)


# --- helpers --------------------------------------------------------------------


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    from portal.db import Database
    from portal.settings import load_settings

    db = Database(args.db)
    settings = load_settings(args.db)
    if not db.exists():
        raise ConfigError(args.db, "moats", "missing: not a portal database")
    return db, settings


def _tell_daemon(settings: Any, moat_id: str) -> None:
    from portal.session import notify_daemon

    if notify_daemon(settings, moat_id):
        print(f"portal daemon: {moat_id} reloaded")


# --- subcommands ----------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from portal.db import Database
    from portal.settings import (
        DEFAULT_KEX,
        SETTINGS_FILE,
        default_register_command,
        settings_from_dict,
        settings_to_toml,
    )

    root = Path(args.db)
    if (root / SETTINGS_FILE).exists():
        raise MoatError(f"{root / SETTINGS_FILE} exists; edit it instead")
    d = {
        "endpoint": args.endpoint,
        "pool": args.pool,
        "prefix": args.prefix,
        "host_key": str(Path(args.host_key).resolve()),
        "networks": args.network,
        "ssh_host": args.ssh_host,
        "ssh_port": args.ssh_port,
        "ssh_user": args.ssh_user,
        "port": args.port,
        "encapsulation": args.encapsulation,
        "control": args.control,
        "register_command": args.register_command or default_register_command(),
        "ssh_kex": args.ssh_kex or DEFAULT_KEX,
        "outbox": args.outbox or str(root.resolve() / "outbox"),
        "smtp": args.smtp,
        "mail_from": args.mail_from,
    }
    settings = settings_from_dict(d, "moat portal init")
    settings.host_key_line()  # fails now rather than at the first `add`
    db = Database(root)
    db.create_layout()
    atomic_write_text(root / SETTINGS_FILE, settings_to_toml(settings))
    print(f"portal database {root} created")
    return 0


def _provisioned(
    settings: Any, rec: Any, private: bytes | None, out: Path | None, mail: bool
) -> None:
    from portal.provision import deliver, moat_files, render_welcome, write_file_set

    if out is not None:
        where = write_file_set(out, moat_files(settings, rec, private))
        print(f"{rec.id}: subnet {rec.subnet}, files for the moat in {where}")
    else:
        print(f"{rec.id}: subnet {rec.subnet}")
    if mail:
        sent = deliver(settings, render_welcome(settings, rec))
        print(f"{rec.id}: welcome mail to {rec.email}: {sent}")


def cmd_add(args: argparse.Namespace) -> int:
    from portal.provision import add_many

    db, settings = _open(args)
    row = {"id": args.id, "email": args.email, "wild": args.wild}
    if args.subnet:
        row["subnet"] = args.subnet
    if args.ssh_key:
        row["ssh_key"] = args.ssh_key
    [(rec, private)] = add_many(db, settings, [("", row)])
    _provisioned(settings, rec, private, Path(args.out), not args.no_mail)
    _tell_daemon(settings, rec.id)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from portal.provision import add_many, read_csv

    db, settings = _open(args)
    if args.csv == "-":
        text, source = sys.stdin.read(), "stdin"
    else:
        try:
            text, source = Path(args.csv).read_text(), args.csv
        except OSError as exc:
            raise MoatError(f"{args.csv}: {exc.strerror}") from None
    rows = [(f"{source} line {n}", row) for n, row in read_csv(text, source)]
    added = add_many(db, settings, rows)
    out = Path(args.out) if args.out else None
    for rec, private in added:
        bundle = out / rec.id if out is not None else None
        if private is not None and bundle is None:
            raise MoatError(
                "new identities were generated: give --out"
            )  # pragma: no cover
        _provisioned(settings, rec, private, bundle, not args.no_mail)
        _tell_daemon(settings, rec.id)
    print(f"imported {len(added)} moat(s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from portal.provision import write_csv

    db, _ = _open(args)
    snap = db.load_all()
    text = write_csv(sorted(snap.records.values(), key=lambda r: r.id))
    if args.out:
        atomic_write_text(args.out, text, mode=0o600)
    else:
        sys.stdout.write(text)
    for name, why in sorted(snap.problems.items()):
        print(f"not exported: {name}: {why}", file=sys.stderr)
    return 0


def _summary(rec: Any) -> dict[str, Any]:
    return {
        "id": rec.id,
        "number": rec.number,
        "email": rec.email,
        "wild": rec.wild,
        "subnet": str(rec.subnet),
        "version": rec.version,
        "address": str(rec.learned.address) if rec.learned.address else None,
        "port": rec.learned.port,
        "registered": (
            rec.learned.registered.isoformat() if rec.learned.registered else None
        ),
        "generation": rec.sa.generation if rec.sa else None,
    }


def cmd_list(args: argparse.Namespace) -> int:
    db, _ = _open(args)
    snap = db.load_all()
    rows = [_summary(r) for r in sorted(snap.records.values(), key=lambda r: r.id)]
    if args.json:
        print(json.dumps({"moats": rows, "problems": snap.problems}, indent=1))
        return 0
    print(f"{'id':<20} {'subnet':<18} {'wild':<15} {'address':<15} registered")
    for r in rows:
        print(
            f"{r['id']:<20} {r['subnet']:<18} {r['wild']:<15}"
            f" {r['address'] or '-':<15} {r['registered'] or 'never'}"
        )
    for name, why in sorted(snap.problems.items()):
        print(f"SKIPPED {name}: {why}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    db, _ = _open(args)
    rec = db.get(args.id)
    info = _summary(rec)
    info["ssh_key"] = rec.ssh_key
    if rec.sa:
        info["spi_to_portal"] = rec.sa.spi_to_portal
        info["spi_to_moat"] = rec.sa.spi_to_moat
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:<14} {value if value is not None else '-'}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    db, settings = _open(args)
    rec = db.remove(args.id)
    print(f"{rec.id} removed (subnet {rec.subnet} is free again)")
    _tell_daemon(settings, rec.id)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from portal.daemon import serve

    db, settings = _open(args)
    return serve(db, settings, args.tun)


def cmd_status(args: argparse.Namespace) -> int:
    from portal import control
    from portal.settings import load_settings

    settings = load_settings(args.db)
    answer = control.request(
        settings.control, {"op": "status", "verbose": args.verbose}
    )
    answer.pop("ok", None)
    print(json.dumps(answer, indent=1, sort_keys=True))
    return 0


def cmd_register_session(args: argparse.Namespace) -> int:
    """The forced command through the moat program: hand the login to the
    daemon, one JSON answer, never a traceback to the moat."""
    from portal import forced_command
    from portal.settings import load_settings

    path = args.socket
    if path is None:
        try:
            path = load_settings(args.db).control
        except MoatError as exc:
            print(json.dumps({"ok": False, "error": str(exc)}))
            return EXIT_REFUSED
    status, output = forced_command.main(
        ["--socket", path, "--id", args.id], dict(os.environb)
    )
    sys.stdout.buffer.write(output)
    return status


def cmd_authorized_keys(args: argparse.Namespace) -> int:
    """Print the authorized_keys line for a moat key, or nothing."""
    from portal.db import Database
    from portal.settings import load_settings
    from portal.sshd import authorized_line

    settings = load_settings(args.db)
    if args.user != settings.ssh_user:
        return 0
    moat_id = Database(args.db).id_for_key(args.key)
    if moat_id is None:
        return 0
    print(authorized_line(settings, moat_id, args.key_type, args.key))
    return 0


def cmd_sshd_config(args: argparse.Namespace) -> int:
    from portal.sshd import sshd_config_lines, write_keys_script

    db, settings = _open(args)
    keys_command = Path(args.keys_command)
    write_keys_script(settings, Path(args.db), keys_command)
    count = db.rebuild_keys()  # the script's file names (older layouts differ)
    print(f"# {count} moat keys in {db.keys_dir}", file=sys.stderr)
    print("\n".join(sshd_config_lines(settings, keys_command, args.keys_user)))
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init": cmd_init,
    "add": cmd_add,
    "import": cmd_import,
    "export": cmd_export,
    "list": cmd_list,
    "show": cmd_show,
    "remove": cmd_remove,
    "run": cmd_run,
    "status": cmd_status,
    "register-session": cmd_register_session,
    "authorized-keys": cmd_authorized_keys,
    "sshd-config": cmd_sshd_config,
}
