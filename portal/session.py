"""The registration: what happens when a moat logs in over ssh.

sshd authenticates the moat by its key (the AuthorizedKeysCommand finds the
key in the database and answers with a `restrict,command=...` line naming the
moat), then runs the forced command (portal/forced_command.py), which hands
the moat id, SSH_CONNECTION and SSH_ORIGINAL_COMMAND to the portal daemon.
The moat's address comes from SSH_CONNECTION, which sshd sets from the TCP
connection; what the moat asked for (SSH_ORIGINAL_COMMAND) is data, checked
against an allow-list, never passed to a shell. Nothing the moat says can
change its subnet or address.

A registration generates the next SA generation (fresh random keys from the
portal, SPIs derived from the moat's number so they are unique portal-wide),
keeps the previous generation for make-before-break and writes the record
(version advanced under the moat's lock); the answer is one JSON document
with the SAs and the portal's tunnel endpoint. The daemon registers many
moats in one group commit (`Database.modify_many`); `register` and
`run_session` do one moat by compare-and-swap, without the daemon.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from moat.errors import MoatError
from portal import control
from portal.db import Database, StaleRecord
from portal.record import (
    ID_PATTERN,
    TRANSFORM_KEY_BYTES,
    WILD_DHCP,
    Learned,
    MoatRecord,
    SaPair,
    spi_for,
)
from portal.settings import PortalSettings

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_COMMAND_LENGTH = 256
CAS_ATTEMPTS = 5
NOTIFY_TIMEOUT = 2.0
REKEY_AFTER = 3600  # seconds; the moat re-registers at least this often
TOKEN_PATTERN = re.compile(r"[a-z]+=[A-Za-z0-9._-]{1,32}\Z")
# the parameters a moat may send, with the pattern each value must match
PARAMETERS: dict[str, re.Pattern[str]] = {
    "proto": re.compile(r"[0-9]{1,3}\Z"),
    "generation": re.compile(r"[0-9]{1,10}\Z"),
}
COMMANDS = ("register",)


class Refused(MoatError):
    """The session is refused; the message goes back to the moat."""


@dataclass(frozen=True)
class Request:
    command: str
    params: dict[str, str]


@dataclass(frozen=True)
class Origin:
    address: ipaddress.IPv4Address
    port: int


@dataclass(frozen=True)
class Login:
    """One registration as the forced command handed it to the daemon."""

    moat_id: str
    origin: Origin
    request: Request


def parse_command(text: str | None) -> Request:
    """SSH_ORIGINAL_COMMAND as data: `register [key=value ...]`, allow-listed."""
    if text is None or not text.strip():
        raise Refused("no command: expected 'register'")
    if len(text) > MAX_COMMAND_LENGTH:
        raise Refused("command too long")
    if not text.isascii() or not text.isprintable():
        raise Refused("command contains non-printable characters")
    tokens = text.split(" ")
    if tokens[0] not in COMMANDS:
        raise Refused(f"unknown command {tokens[0][:32]!r}")
    params: dict[str, str] = {}
    for token in tokens[1:]:
        if not TOKEN_PATTERN.match(token):
            raise Refused(f"malformed argument {token[:40]!r}")
        key, _, value = token.partition("=")
        pattern = PARAMETERS.get(key)
        if pattern is None:
            raise Refused(f"argument {key!r} not accepted")
        if not pattern.match(value) or key in params:
            raise Refused(f"bad value for {key}")
        params[key] = value
    if params.get("proto", str(PROTOCOL_VERSION)) != str(PROTOCOL_VERSION):
        raise Refused(f"protocol {params['proto']} not supported")
    return Request(tokens[0], params)


def parse_ssh_connection(text: str | None) -> Origin:
    """SSH_CONNECTION = 'client-ip client-port server-ip server-port'."""
    parts = (text or "").split()
    if len(parts) != 4:
        raise Refused("no SSH_CONNECTION: not started by sshd")
    try:
        address = ipaddress.IPv4Address(parts[0])
        port = int(parts[1])
    except ValueError:
        raise Refused("SSH_CONNECTION not understood (IPv4 only)") from None
    return Origin(address, port)


def parse_login(req: dict[str, Any]) -> Login:
    """The daemon's `register` request: id, ssh_connection, command."""
    moat_id = req.get("id")
    if not isinstance(moat_id, str) or not ID_PATTERN.match(moat_id):
        raise Refused("no valid moat id")
    command, connection = req.get("command"), req.get("ssh_connection")
    if not isinstance(command, str | None) or not isinstance(connection, str | None):
        raise Refused("malformed request")
    request = parse_command(command)
    return Login(moat_id, parse_ssh_connection(connection), request)


def next_sa(rec: MoatRecord, transform: str) -> SaPair:
    generation = rec.sa.generation + 1 if rec.sa else 1
    size = TRANSFORM_KEY_BYTES[transform]
    return SaPair(
        generation=generation,
        transform=transform,
        spi_to_portal=spi_for(rec.number, generation, to_portal=True),
        key_to_portal=os.urandom(size),
        spi_to_moat=spi_for(rec.number, generation, to_portal=False),
        key_to_moat=os.urandom(size),
    )


def _sa_json(spi: int, transform: str, key: bytes) -> dict[str, Any]:
    return {"spi": spi, "transform": transform, "key": key.hex()}


def answer_for(settings: PortalSettings, rec: MoatRecord) -> dict[str, Any]:
    """What the moat is told, from its point of view (in = to the moat)."""
    assert rec.sa is not None
    sa = rec.sa
    return {
        "moat": rec.id,
        "generation": sa.generation,
        "seen": {"address": str(rec.learned.address)},
        "portal": {
            "address": str(settings.endpoint),
            "port": settings.port,
            "encapsulation": settings.encapsulation,
            "mtu_policy": settings.mtu_policy,
        },
        "subnet": str(rec.subnet),
        "networks": [str(n) for n in settings.networks],
        "sa_out": _sa_json(sa.spi_to_portal, sa.transform, sa.key_to_portal),
        "sa_in": _sa_json(sa.spi_to_moat, sa.transform, sa.key_to_moat),
        "rekey_after": REKEY_AFTER,
    }


def register(
    db: Database,
    settings: PortalSettings,
    moat_id: str,
    origin: Origin,
    now: dt.datetime,
) -> MoatRecord:
    """Record the moat's address and its next SA generation (CAS, retried)."""
    for _ in range(CAS_ATTEMPTS):
        rec = db.get(moat_id)
        new = registered(rec, settings, origin, now)
        try:
            return db.update(new, base_version=rec.version)
        except StaleRecord:
            continue
    raise Refused("the record is busy; try again")


def registered(
    rec: MoatRecord, settings: PortalSettings, origin: Origin, now: dt.datetime
) -> MoatRecord:
    """`rec` after a registration from `origin` (version not yet advanced)."""
    if rec.wild != WILD_DHCP and str(origin.address) != rec.wild:
        raise Refused(
            f"moat {rec.id} has the static address {rec.wild},"
            f" but registered from {origin.address}"
        )
    port = rec.learned.port if rec.learned.address == origin.address else None
    return rec.replace(
        learned=Learned(
            address=origin.address, port=port or settings.port, registered=now
        ),
        sa=next_sa(rec, settings.transform),
        sa_previous=rec.sa,
    )


def notify_daemon(settings: PortalSettings, moat_id: str) -> bool:
    """Tell `moat portal run` to reload this moat; False if it is not running."""
    try:
        control.request(
            settings.control, {"op": "reload", "id": moat_id}, NOTIFY_TIMEOUT
        )
    except control.ControlError as exc:
        log.debug("portal daemon not told about %s: %s", moat_id, exc)
        return False
    return True


def run_session(
    db: Database,
    settings: PortalSettings,
    moat_id: str,
    environ: dict[str, str],
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The whole forced command; raises Refused with the reason."""
    request = parse_command(environ.get("SSH_ORIGINAL_COMMAND"))
    origin = parse_ssh_connection(environ.get("SSH_CONNECTION"))
    log.debug("moat %s: %s from %s", moat_id, request.command, origin.address)
    rec = register(db, settings, moat_id, origin, now or dt.datetime.now(dt.UTC))
    notify_daemon(settings, moat_id)
    return answer_for(settings, rec)
