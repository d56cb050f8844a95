"""Provisioning: new moats, their identity and file set, welcome mail, CSV.

Adding a moat allocates its number and a private subnet from the pool,
generates its ssh identity (an ed25519 key pair; the portal keeps only the
public half), and produces the files the moat needs on its /var:

    moat.toml      what `moat register` reads: id, portal, key, pin, subnet
    id_ed25519     the moat's private key (mode 0600)
    id_ed25519.pub
    known_hosts    the portal's ssh host key: the moat trusts only this key

The customer database comes in as CSV with the columns of CSV_FIELDS; a row
without ssh_key gets a new identity, a row with one (an export from another
portal) keeps it, so moats move between portals without re-entry.
"""

from __future__ import annotations

import csv
import email.message
import email.utils
import io
import ipaddress
import logging
import smtplib
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from moat.durable import atomic_write
from moat.errors import MoatError
from portal.db import Conflict, Database, record_conflict
from portal.record import (
    CSV_FIELDS,
    WILD_DHCP,
    MoatRecord,
    RecordError,
    normalise_ssh_key,
    parse_subnet,
    validate_email,
    validate_id,
    validate_wild,
)
from portal.settings import PortalSettings

log = logging.getLogger(__name__)

IDENTITY_FILE = "id_ed25519"
KNOWN_HOSTS_FILE = "known_hosts"
MOAT_CONFIG_FILE = "moat.toml"
TUNNEL_CONFIG_FILE = "tunnel.toml"
REGISTER_INTERVAL = 3600


class PoolExhausted(MoatError):
    pass


def allocate_subnet(
    settings: PortalSettings, taken: Iterable[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network:
    """The lowest free subnet of `prefix` bits in the pool."""
    used = sorted(
        (int(n.network_address), int(n.broadcast_address))
        for n in taken
        if n.overlaps(settings.pool)
    )
    size = 1 << (32 - settings.prefix)
    candidate = int(settings.pool.network_address)
    end = int(settings.pool.broadcast_address)
    for start, last in used:
        if candidate + size - 1 < start:
            break
        if last >= candidate:
            candidate = (last // size + 1) * size
    if candidate + size - 1 > end:
        raise PoolExhausted(f"pool {settings.pool} has no free /{settings.prefix}")
    return ipaddress.IPv4Network((candidate, settings.prefix))


def generate_identity(moat_id: str) -> tuple[bytes, str]:
    """(OpenSSH private key file, public key line) of a new ed25519 key."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, f"{public.decode()} {moat_id}"


def known_hosts_line(settings: PortalSettings) -> str:
    host = settings.registration_host
    name = host if settings.ssh_port == 22 else f"[{host}]:{settings.ssh_port}"
    return f"{name} {settings.host_key_line()}\n"


def moat_config(settings: PortalSettings, rec: MoatRecord) -> str:
    return "\n".join(
        [
            f"# moat {rec.id}: written by `moat portal add`",
            "[register]",
            f'id = "{rec.id}"',
            f'portal = "{settings.registration_host}"',
            f"port = {settings.ssh_port}",
            f'user = "{settings.ssh_user}"',
            f'kex = "{settings.ssh_kex}"',
            "# paths relative to this file's directory",
            f'identity = "{IDENTITY_FILE}"',
            f'known_hosts = "{KNOWN_HOSTS_FILE}"',
            f'tunnel_config = "{TUNNEL_CONFIG_FILE}"',
            f"interval = {REGISTER_INTERVAL}",
            "",
            "[lan]",
            f'subnet = "{rec.subnet}"',
            f'wild = "{rec.wild}"',
            "",
        ]
    )


def moat_files(
    settings: PortalSettings, rec: MoatRecord, private_key: bytes | None
) -> dict[str, tuple[bytes, int]]:
    """The moat's /var file set: name -> (content, mode)."""
    files = {
        MOAT_CONFIG_FILE: (moat_config(settings, rec).encode(), 0o644),
        KNOWN_HOSTS_FILE: (known_hosts_line(settings).encode(), 0o644),
        f"{IDENTITY_FILE}.pub": (f"{rec.ssh_key} {rec.id}\n".encode(), 0o644),
    }
    if private_key is not None:
        files[IDENTITY_FILE] = (private_key, 0o600)
    return files


def write_file_set(out: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    """A directory, or a tarball if `out` ends in .tar or .tar.gz."""
    if out.name.endswith((".tar", ".tar.gz", ".tgz")):
        buf = io.BytesIO()
        gz = out.name.endswith(("gz", "tgz"))
        with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w:") as tar:
            for name, (data, perm) in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), perm, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, buf.getvalue(), mode=0o600)
        return out
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, (data, perm) in files.items():
        atomic_write(out / name, data, mode=perm)
    return out


# --- welcome mail --------------------------------------------------------------


WELCOME = """\
Hello,

your moat "{id}" is ready. It connects your home network to the company
network through an encrypted tunnel to the security portal.

Setting up the moat
  1. Connect the moat's WILD port to your cable or DSL modem and its LAN
     port to your home switch (or directly to your computer).
  2. Power it on. It needs no configuration: it gets its internet address
     from your provider{wild_note} and registers with the portal by itself.

Setting up your computers (client machines)
  Nothing to install. Set each computer to obtain its address
  automatically (DHCP), which is the default on Windows, macOS and Linux.
  The moat then gives it:
    address        one of {first} .. {last}
    netmask        {netmask}
    gateway, DNS   {gateway}
  Company servers ({networks}) are reached through the tunnel; the rest of
  the internet is reached as before.

  If your network keeps working but the company servers do not, power the
  moat off and on once; if that does not help, write to {mail_from}
  quoting your moat's name "{id}".

--\x20
the security portal
"""


def render_welcome(
    settings: PortalSettings, rec: MoatRecord
) -> email.message.EmailMessage:
    hosts = list(rec.subnet.hosts())
    wild_note = (
        "" if rec.wild == WILD_DHCP else f" (fixed address {rec.wild}, set up for you)"
    )
    body = WELCOME.format(
        id=rec.id,
        wild_note=wild_note,
        first=hosts[1] if len(hosts) > 1 else hosts[0],
        last=hosts[-1],
        netmask=rec.subnet.netmask,
        gateway=hosts[0],
        networks=", ".join(str(n) for n in settings.networks) or "the company network",
        mail_from=settings.mail_from,
    )
    msg = email.message.EmailMessage()
    msg["From"] = settings.mail_from
    msg["To"] = rec.email
    msg["Subject"] = f"Your moat {rec.id} is ready"
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain="moat-portal")
    msg["X-Moat-Id"] = rec.id
    msg.set_content(body)
    return msg


def deliver(settings: PortalSettings, msg: email.message.EmailMessage) -> str:
    """Send by SMTP if configured, else drop into the outbox; says where."""
    if settings.smtp:
        host, _, port = settings.smtp.rpartition(":")
        try:
            with smtplib.SMTP(host or settings.smtp, int(port or 25), timeout=30) as s:
                s.send_message(msg)
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            raise MoatError(f"sending mail via {settings.smtp}: {exc}") from None
        return f"smtp {settings.smtp}"
    outbox = Path(settings.outbox)
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / f"{msg['X-Moat-Id']}.eml"
    atomic_write(path, msg.as_bytes())
    return str(path)


# --- adding moats ----------------------------------------------------------------


def new_record(
    settings: PortalSettings,
    db_records: dict[str, MoatRecord],
    moat_id: str,
    contact: str,
    wild: str = WILD_DHCP,
    subnet: str | None = None,
    ssh_key: str | None = None,
    source: str = "",
) -> tuple[MoatRecord, bytes | None]:
    """A validated record that fits beside db_records (and its private key)."""
    moat_id = validate_id(moat_id, source)
    if moat_id in db_records:
        raise Conflict(f"{source}{': ' if source else ''}moat {moat_id!r} exists")
    contact = validate_email(contact, source)
    wild = validate_wild(wild, source)
    if subnet:
        net = parse_subnet(subnet, source)
    else:
        net = allocate_subnet(settings, (r.subnet for r in db_records.values()))
    private = None
    if ssh_key:
        key = normalise_ssh_key(ssh_key, source)
    else:
        private, public = generate_identity(moat_id)
        key = normalise_ssh_key(public)
    number = max((r.number for r in db_records.values()), default=0) + 1
    rec = MoatRecord(
        id=moat_id, number=number, email=contact, ssh_key=key, wild=wild, subnet=net
    )
    why = record_conflict(rec, db_records.values())
    if why:
        raise Conflict(f"{source}{': ' if source else ''}moat {moat_id}: {why}")
    return rec, private


def read_csv(text: str, source: str) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    missing = [f for f in ("id", "email") if f not in fields]
    if missing:
        raise RecordError(source, "header", f"needs column(s) {', '.join(missing)}")
    unknown = [f for f in fields if f not in CSV_FIELDS]
    if unknown:
        raise RecordError(source, "header", f"unknown column {unknown[0]!r}")
    for row in reader:
        yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}


def write_csv(records: Iterable[MoatRecord]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow(
            {
                "id": rec.id,
                "email": rec.email,
                "wild": rec.wild,
                "subnet": str(rec.subnet),
                "ssh_key": rec.ssh_key,
            }
        )
    return buf.getvalue()


def add_many(
    db: Database,
    settings: PortalSettings,
    rows: Iterable[tuple[str, dict[str, str]]],
) -> list[tuple[MoatRecord, bytes | None]]:
    """Validate every row first; write only if all are good (no half import)."""
    with db.lock_allocation():
        snap = db.load_all()
        records = dict(snap.records)
        added: list[tuple[MoatRecord, bytes | None]] = []
        for where, row in rows:
            rec, private = new_record(
                settings,
                records,
                row.get("id", ""),
                row.get("email", ""),
                wild=row.get("wild") or WILD_DHCP,
                subnet=row.get("subnet") or None,
                ssh_key=row.get("ssh_key") or None,
                source=where,
            )
            records[rec.id] = rec
            added.append((rec, private))
        return [(db.create(rec), private) for rec, private in added]
