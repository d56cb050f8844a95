"""`moat portal run`: the portal daemon.

At start it loads every record (portal/db.py; invalid ones are reported and
skipped), then serves its control socket (portal/control.py). A `reload`
request re-reads one record and applies only that moat's change: a new
record is added, a changed one replaced (new SA generation, new address), a
deleted one removed. A record that fails to load is logged and dropped; the
others never wait for it.

# TODO: attach the ESP Datapath (one for all moats: SA by SPI, LPM on the
# moats' subnets, routes on the TUN, roaming) once datapath/tunnel.py lands;
# today the daemon keeps the moat table and the control socket only.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any

from portal.control import MAX_LINE
from portal.db import Database, NoSuchMoat
from portal.record import MoatRecord, RecordError
from portal.settings import PortalSettings

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 5.0


class MoatTable:
    """The daemon's view of the database: one entry per valid moat."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.moats: dict[str, MoatRecord] = {}
        self.problems: dict[str, str] = {}
        self.counters: dict[str, int] = {"reloads": 0, "added": 0, "removed": 0}

    def load(self) -> float:
        start = time.monotonic()
        snap = self.db.load_all()
        self.moats = snap.records
        self.problems = snap.problems
        return time.monotonic() - start

    def reload(self, moat_id: str) -> str:
        """Apply one record's change; returns what happened."""
        self.counters["reloads"] += 1
        name = f"{moat_id}.toml"
        try:
            rec = self.db.get(moat_id)
        except NoSuchMoat:
            self.problems.pop(name, None)
            if self.moats.pop(moat_id, None) is not None:
                self.counters["removed"] += 1
                log.info("moat %s removed", moat_id)
                return "removed"
            return "absent"
        except RecordError as exc:
            self.problems[name] = str(exc)
            self.moats.pop(moat_id, None)
            log.warning("moat record %s skipped: %s", name, exc)
            return "skipped"
        self.problems.pop(name, None)
        old = self.moats.get(moat_id)
        self.moats[moat_id] = rec
        if old is None:
            self.counters["added"] += 1
            log.info("moat %s added (subnet %s)", moat_id, rec.subnet)
            return "added"
        log.info("moat %s updated (version %d)", moat_id, rec.version)
        return "updated"

    def status(self) -> dict[str, Any]:
        return {
            "moats": len(self.moats),
            "registered": sum(1 for r in self.moats.values() if r.sa is not None),
            "problems": self.problems,
            "counters": self.counters,
        }


def _handle(table: MoatTable, line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "not JSON"}
    if not isinstance(req, dict):
        return {"ok": False, "error": "not an object"}
    op = req.get("op")
    if op == "ping":
        return {"ok": True}
    if op == "status":
        return {"ok": True, **table.status()}
    if op == "reload":
        moat_id = req.get("id")
        if not isinstance(moat_id, str):
            return {"ok": False, "error": "reload needs an id"}
        return {"ok": True, "result": table.reload(moat_id)}
    return {"ok": False, "error": f"unknown op {op!r}"}


def _listen(path: str) -> socket.socket:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(db: Database, settings: PortalSettings, status_interval: float) -> int:
    table = MoatTable(db)
    took = table.load()
    log.info(
        "portal started: %d moats loaded in %.2fs, %d skipped",
        len(table.moats),
        took,
        len(table.problems),
    )
    print(f"portal: {len(table.moats)} moats loaded in {took:.2f}s", flush=True)
    listener = _listen(settings.control)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while running:
            for key, _ in sel.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is listener:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    buffers[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                _serve_client(sel, buffers, table, sock)
    finally:
        sel.close()
        listener.close()
        for conn in buffers:
            conn.close()
        try:
            os.unlink(settings.control)
        except FileNotFoundError:
            pass
    log.info("portal stopped")
    return 0


def _serve_client(
    sel: selectors.BaseSelector,
    buffers: dict[socket.socket, bytes],
    table: MoatTable,
    conn: socket.socket,
) -> None:
    try:
        chunk = conn.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        chunk = b""
    data = buffers[conn] + chunk
    if chunk and b"\n" not in data and len(data) < MAX_LINE:
        buffers[conn] = data
        return
    sel.unregister(conn)
    del buffers[conn]
    if b"\n" in data:
        answer = _handle(table, data.split(b"\n", 1)[0])
        try:
            conn.setblocking(True)
            conn.settimeout(CLIENT_TIMEOUT)
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass
    conn.close()
