"""`moat portal run`: one ESP datapath for every moat, changed on the fly.

At start the daemon loads every record (portal/db.py; invalid ones are
reported and skipped), opens one TUN device and one UDP/4500 (or raw ESP)
socket, and installs a peer per registered moat in one Datapath (SA by SPI
on receive, longest-prefix match on the moats' subnets on send). The kernel
routes the pool (and any subnet outside it) to the TUN device.

The control socket (portal/control.py) takes `reload ID` from the
provisioning verbs: the daemon re-reads that one record and adds, re-keys
(make-before-break), moves or removes that moat's peer; nothing else is
touched. A record or SA that cannot be brought up is logged and counted and
the daemon goes on to the next.

Registrations arrive on the same socket from sshd's forced command
(portal/forced_command.py), which runs as the ssh user: the socket is
root:<ssh user's group> 0660, and a peer that is not root (SO_PEERCRED) may
only `register`. The daemon takes every registration waiting on the socket,
writes their records in one group commit (each fsynced before its rename,
the directory once), applies the new SAs to the datapath, and only then
answers each moat.

Roaming: the Datapath moves a moat's endpoint only on an authenticated
packet newer than any seen; the daemon then writes the new address and port
into the record (compare-and-swap, so a concurrent registration wins).

Restarts and AES-GCM nonces: a restarted portal must never send two packets
with the same key and sequence number. The daemon reserves outbound
sequence numbers in blocks (DB/.sequence.json, written when a moat has used
half of its block) and starts a restored SA after its reserved block; an SA
without an entry has sent fewer than half a block, so it starts at one block.
Inbound, each SA's replay window restarts at its saved high-water mark
(DB/.replay.json, datapath/replaymarks.py), so packets a moat sent before
the restart cannot be replayed after it.

Peers are built lazily and retired again: an unknown SPI of a registered
moat builds a probe inbound SA (bounded cache, rate-limited), and the peer
is built only once a packet passes the probe's ICV, so unauthenticated
packets build nothing lasting. A peer without traffic for `peer_idle`
seconds is removed; its replay marks and outbound sequence number stay, and
its next packet builds it again.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import os
import pwd
import socket
import struct
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from datapath.esp import Drop, EspError, InboundSA, OutboundSA, SAConfig
from datapath.loop import ControlServer, EventLoop
from datapath.outer import Address, OuterSocket, RawEspSocket, UdpSocket
from datapath.replaymarks import ReplayMarks, mark_key_for
from datapath.selector import Selectors
from datapath.tun import MAX_PACKET, Tun
from datapath.tunnel import Datapath, Peer, esp_space
from moat.durable import atomic_write
from moat.errors import MoatError
from portal.control import MAX_LINE
from portal.db import Database, NoSuchMoat
from portal.record import (
    SPI_GENERATION_BITS,
    TRANSFORM_KEY_BYTES,
    Learned,
    MoatRecord,
    RecordError,
    SaPair,
)
from portal.session import Login, Refused, answer_for, parse_login, registered
from portal.settings import PortalSettings

log = logging.getLogger(__name__)

SEQUENCE_BLOCK = 1 << 24  # outbound sequence numbers reserved at a time
SEQUENCE_FILE = ".sequence.json"
REPLAY_FILE = ".replay.json"
PROBE_CACHE = 1024  # probe inbound SAs kept for SPIs without a peer
PROBES_PER_TICK = 256  # probe SAs built per tick (~1 s) at most
RETIRE_CHECK = 5.0  # seconds between scans for idle peers
REKEY_GRACE = 10.0
CLIENT_TIMEOUT = 2.0
REGISTRATION_BATCH = 64  # registrations written in one group commit, at most
CONTROL_BACKLOG = 256
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
ROOT_UID = 0
DEFAULT_TUN = "portal0"
OUTER_MTU = 1500
ESP_SPI_SIZE = 4
IPV4_HEADER_SIZE = 20
IPV4_VERSION = 4
IPV4_DST = slice(16, 20)
SPI_PROBE = 256  # any valid SPI: only sizes are asked of this SA


@dataclass
class MoatState:
    record: MoatRecord
    up: bool = False
    problem: str = ""
    inherited: SaPair | None = None  # its SA at start: used before a restart


def _inbound(sa: SaPair, rec: MoatRecord, networks: list[IPv4Network]) -> InboundSA:
    cfg = SAConfig(spi=sa.spi_to_portal, transform=sa.transform, key=sa.key_to_portal)
    return InboundSA(cfg, Selectors(networks, [rec.subnet]))


def _mark_keys(*pairs: SaPair | None) -> list[str]:
    """Replay-mark names of the inbound (to the portal) SAs of `pairs`."""
    return [mark_key_for(p.spi_to_portal, p.key_to_portal) for p in pairs if p]


def _outbound(sa: SaPair) -> OutboundSA:
    return OutboundSA(
        SAConfig(spi=sa.spi_to_moat, transform=sa.transform, key=sa.key_to_moat)
    )


class LazyDatapath(Datapath):
    """A Datapath that asks for a missing peer before giving up on a packet.

    With 100,000 moats, building every SA at start would take a minute
    (~0.6 ms a peer); instead a moat's peer is built on its first packet:
    an unknown SPI (the SPI carries the moat's number) or an inner
    destination in a moat's subnet with no route yet.
    """

    def __init__(
        self,
        miss_spi: Callable[[int, bytes, float], None],
        miss_address: Callable[[bytes, float], None],
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._miss_spi = miss_spi
        self._miss_address = miss_address

    def inbound(self, esp: bytes, src: Address, now: float) -> None:
        if len(esp) >= ESP_SPI_SIZE:
            spi = int.from_bytes(esp[:ESP_SPI_SIZE], "big")
            if spi not in self.spis:
                self._miss_spi(spi, esp, now)
        super().inbound(esp, src, now)

    def outbound(self, packet: bytes, now: float) -> None:
        if len(packet) >= IPV4_HEADER_SIZE and packet[0] >> 4 == IPV4_VERSION:
            dst = packet[IPV4_DST]
            if self.routes.lookup(dst) is None:
                self._miss_address(dst, now)
        super().outbound(packet, now)


class SubnetIndex:
    """Longest-prefix match from an IPv4 address to a moat id."""

    def __init__(self) -> None:
        self._by_len: dict[int, dict[int, str]] = {}
        self._lengths: list[int] = []

    def add(self, net: IPv4Network, moat_id: str) -> None:
        table = self._by_len.setdefault(net.prefixlen, {})
        table[int(net.network_address) >> (32 - net.prefixlen)] = moat_id
        self._lengths = sorted(self._by_len, reverse=True)

    def remove(self, net: IPv4Network) -> None:
        table = self._by_len.get(net.prefixlen, {})
        table.pop(int(net.network_address) >> (32 - net.prefixlen), None)

    def lookup(self, dst: bytes) -> str | None:
        addr = int.from_bytes(dst, "big")
        for plen in self._lengths:
            moat_id = self._by_len[plen].get(addr >> (32 - plen))
            if moat_id is not None:
                return moat_id
        return None


class Portal:
    """The moat table, the Datapath and the glue between them (no I/O loop)."""

    def __init__(self, db: Database, settings: PortalSettings) -> None:
        self.db = db
        self.settings = settings
        self.networks = list(settings.networks)
        self.dp = LazyDatapath(
            self._activate_spi,
            self._activate_address,
            rekey_grace=REKEY_GRACE,
            on_roam=self._roamed,
        )
        self.moats: dict[str, MoatState] = {}
        self.by_number: dict[int, str] = {}
        self.subnets = SubnetIndex()
        self.problems: dict[str, str] = {}
        self.counters: dict[str, int] = {
            "reloads": 0, "added": 0, "removed": 0, "rekeyed": 0, "failed": 0,
            "roamed": 0, "activated": 0, "retired": 0, "probes_built": 0,
            "probe_drops": 0, "probe_rate_limited": 0, "registered": 0,
            "group_commits": 0,
        }  # fmt: skip
        self.sequence_path = db.root / SEQUENCE_FILE
        self.reserved: dict[str, list[int]] = self._read_reserved()
        self._reserved_dirty = False
        self.marks = ReplayMarks(db.root / REPLAY_FILE)
        # SPI -> inbound SA that checks a moat's packets before its peer exists
        self.probes: OrderedDict[int, InboundSA] = OrderedDict()
        self.probe_budget = PROBES_PER_TICK
        # retired peers: moat id -> (outbound SPI, last sequence number used)
        self.retired_out: dict[str, tuple[int, int]] = {}
        # moat id -> (tx_bytes, rx_packets) at the last scan, and when they moved
        self.activity: dict[str, tuple[int, int, float]] = {}
        self.next_retire_check = 0.0
        self.load_seconds = 0.0

    # --- loading ---------------------------------------------------------------

    def load(self, now: float) -> None:
        start = time.monotonic()

        # the table is a few long-lived objects per moat; the cyclic collector
        # would rescan all of them at every full pass while they are built (most
        # of a 100,000-moat start) and later (pauses in the datapath), so build
        # them with it paused, then move them out of its sight
        collecting = gc.isenabled()
        gc.disable()
        try:
            snap = self.db.load_all()
            self.problems = dict(snap.problems)
            for rec in snap.records.values():
                self._track(rec)
                self.moats[rec.id].inherited = rec.sa
        finally:
            if collecting:
                gc.enable()
        gc.freeze()
        self.marks.begin(now)
        self.load_seconds = time.monotonic() - start

    def _track(self, rec: MoatRecord) -> None:
        """Know the moat; its peer is built on its first packet."""
        self.moats[rec.id] = MoatState(rec)
        self.by_number[rec.number] = rec.id
        self.subnets.add(rec.subnet, rec.id)

    def _untrack(self, rec: MoatRecord) -> None:
        self.by_number.pop(rec.number, None)
        self.subnets.remove(rec.subnet)

    def activate(self, moat_id: str, now: float) -> bool:
        """Build the moat's peer now (first packet, or on request)."""
        state = self.moats.get(moat_id)
        if state is None or state.up or state.problem:
            return state is not None and state.up
        self._bring_up(state.record, now, restored=True)
        if state.up:
            self.counters["activated"] += 1
        return state.up

    def _activate_spi(self, spi: int, esp: bytes, now: float) -> None:
        """An ESP packet for a registered moat without a peer: build the peer
        only if the packet passes the ICV (and replay check) of a probe SA."""
        moat_id = self.by_number.get(spi >> (SPI_GENERATION_BITS + 1))
        if moat_id is None:
            return
        state = self.moats[moat_id]
        sa = state.record.sa
        if state.up or state.problem or sa is None or sa.spi_to_portal != spi:
            return
        if state.record.learned.address is None:
            return
        probe = self._probe(spi, sa, state.record)
        if probe is None:
            return
        # the probe's window moves, the real SA (built below) starts afresh
        # from the replay marks and opens the packet again
        opened = probe.open(esp, now)
        if isinstance(opened, Drop):
            self.counters["probe_drops"] += 1
            reason = f"probe_{opened.value}"  # probe_icv, probe_replay, ...
            self.counters[reason] = self.counters.get(reason, 0) + 1
            return
        del self.probes[spi]
        self.activate(moat_id, now)

    def _probe(self, spi: int, sa: SaPair, rec: MoatRecord) -> InboundSA | None:
        probe = self.probes.get(spi)
        if probe is not None:
            self.probes.move_to_end(spi)
            return probe
        if self.probe_budget <= 0:
            self.counters["probe_rate_limited"] += 1
            return None
        self.probe_budget -= 1
        try:
            probe = self._inbound_sa(sa, rec)
        except (EspError, ValueError):
            return None  # the real build reports it
        self.counters["probes_built"] += 1
        self.probes[spi] = probe
        if len(self.probes) > PROBE_CACHE:
            self.probes.popitem(last=False)
        return probe

    def _inbound_sa(self, sa: SaPair, rec: MoatRecord) -> InboundSA:
        """The inbound SA, its replay window restarted from its saved mark."""
        in_sa = _inbound(sa, rec, self.networks)
        state = self.moats.get(rec.id)
        inherited = state is not None and state.inherited == sa
        self.marks.restore(in_sa, inherited)
        return in_sa

    def _activate_address(self, dst: bytes, now: float) -> None:
        moat_id = self.subnets.lookup(dst)
        if moat_id is not None:
            self.activate(moat_id, now)

    def _peer(self, rec: MoatRecord, restored: bool) -> Peer | None:
        if rec.sa is None or rec.learned.address is None:
            return None  # never registered: nothing to talk to yet
        out_sa = _outbound(rec.sa)
        if restored:
            out_sa.seq = self._restart_sequence(rec.id, rec.sa.spi_to_moat)
        port = rec.learned.port or self.settings.port
        return Peer(
            name=rec.id,
            out_sa=out_sa,
            in_sa=self._inbound_sa(rec.sa, rec),
            endpoint=(str(rec.learned.address), port if self._udp else 0),
            encapsulation=self.settings.encapsulation,
            local_subnets=self.networks,
            remote_subnets=[rec.subnet],
            mtu_policy=self.settings.mtu_policy,
        )

    @property
    def _udp(self) -> bool:
        return self.settings.encapsulation == "udp"

    def _bring_up(self, rec: MoatRecord, now: float, restored: bool = False) -> None:
        """Install one moat's peer; a failure is that moat's problem only."""
        state = self.moats[rec.id]
        try:
            peer = self._peer(rec, restored)
            if peer is None:
                return
            self.dp.add_peer(peer, now)
            state.up, state.problem = True, ""
            self.activity[rec.id] = (peer.tx_bytes, peer.rx_packets, now)
        except (EspError, ValueError) as exc:
            state.up, state.problem = False, str(exc)
            self.counters["failed"] += 1
            log.warning("moat %s: tunnel not brought up: %s", rec.id, exc)

    # --- changes ---------------------------------------------------------------

    def reload(self, moat_id: str, now: float) -> str:
        """Apply the current record of one moat; returns what happened."""
        self.counters["reloads"] += 1
        name = f"{moat_id}.toml"
        try:
            rec = self.db.get(moat_id)
        except NoSuchMoat:
            self.problems.pop(name, None)
            return self._remove(moat_id)
        except RecordError as exc:
            self.problems[name] = str(exc)
            log.warning("moat record %s skipped: %s", name, exc)
            self._remove(moat_id)
            return "skipped"
        self.problems.pop(name, None)
        return self.apply(rec, now)

    def apply(self, rec: MoatRecord, now: float) -> str:
        """Make the datapath match `rec` (just read or just written)."""
        moat_id = rec.id
        state = self.moats.get(moat_id)
        if state is None:
            self._track(rec)
            self.counters["added"] += 1
            log.info("moat %s added (subnet %s)", moat_id, rec.subnet)
            return "added"
        old = state.record
        peer = self.dp.peers.get(moat_id)
        if peer is None or old.subnet != rec.subnet or old.number != rec.number:
            if peer is not None:
                self._take_down(moat_id)
            self._forget_old_sas(old, rec)
            self._untrack(old)
            self._track(rec)  # a new (or repaired) record: built on first use
            return "replaced" if peer is not None else "updated"
        state.record = rec
        self._forget_old_sas(old, rec)
        if rec.sa is not None and rec.sa != old.sa:
            try:
                self.dp.rekey(
                    moat_id,
                    _outbound(rec.sa),
                    self._inbound_sa(rec.sa, rec),
                    now,
                )
                self.counters["rekeyed"] += 1
            except (EspError, ValueError) as exc:
                state.problem = str(exc)
                self.counters["failed"] += 1
                log.warning("moat %s: rekey failed: %s", moat_id, exc)
                return "failed"
        if rec.learned.address is not None and rec.learned != old.learned:
            port = (rec.learned.port or self.settings.port) if self._udp else 0
            peer.endpoint = (str(rec.learned.address), port)
        return "updated"

    def _remove(self, moat_id: str) -> str:
        state = self.moats.pop(moat_id, None)
        if state is None:
            return "absent"
        self._untrack(state.record)
        if moat_id in self.dp.peers:
            self._take_down(moat_id)
        self._forget_old_sas(state.record, None)
        self.reserved.pop(moat_id, None)
        self.counters["removed"] += 1
        log.info("moat %s removed", moat_id)
        return "removed"

    def _take_down(self, moat_id: str) -> None:
        """Remove a moat's peer, remembering its windows and sequence number."""
        peer = self.dp.peers[moat_id]
        for entry in list(self.dp.spis.values()):
            if entry.peer is peer:
                self.marks.note(entry.sa)
        self.retired_out[moat_id] = (peer.out_sa.cfg.spi, peer.out_sa.seq)
        self.dp.remove_peer(moat_id)
        self.activity.pop(moat_id, None)
        state = self.moats.get(moat_id)
        if state is not None:
            state.up = False

    def _forget_old_sas(self, old: MoatRecord, new: MoatRecord | None) -> None:
        """Drop state of SAs the record no longer holds (rekeyed twice, removed)."""
        keep = set(_mark_keys(new.sa, new.sa_previous)) if new is not None else set()
        for key in _mark_keys(old.sa, old.sa_previous):
            if key not in keep:
                self.marks.forget(key)
        for pair in (old.sa, old.sa_previous):
            if pair is not None and (new is None or pair not in (new.sa,)):
                self.probes.pop(pair.spi_to_portal, None)
        if new is None or new.sa is None:
            self.retired_out.pop(old.id, None)

    def retire_idle(self, now: float) -> int:
        """Remove peers without traffic (either way) for `peer_idle` seconds."""
        idle = self.settings.peer_idle
        retired = 0
        for name, peer in list(self.dp.peers.items()):
            seen = (peer.tx_bytes, peer.rx_packets)
            last = self.activity.get(name)
            if last is None or seen != last[:2]:
                self.activity[name] = (*seen, now)
            elif now - last[2] >= idle and peer.pending_out is None:
                self._take_down(name)
                retired += 1
        if retired:
            self.counters["retired"] += retired
            log.info("%d idle peers retired (no traffic for %ds)", retired, idle)
        return retired

    def tick(self, now: float) -> None:
        """About once a second: reservations, replay marks, idle peers."""
        self.reserve_sequences()
        if self.marks.due(self._receiving(), now):
            self.marks.save(self._receiving(), now)
        self.probe_budget = PROBES_PER_TICK
        if now >= self.next_retire_check:
            self.next_retire_check = now + RETIRE_CHECK
            self.retire_idle(now)

    def _receiving(self) -> list[InboundSA]:
        return [entry.sa for entry in self.dp.spis.values()]

    def stopped(self, now: float) -> None:
        """The datapath has stopped: save exact marks and reservations."""
        self.reserve_sequences()
        self.marks.save(self._receiving(), now, clean=True)

    def _roamed(self, peer: Peer, old: Address, new: Address) -> None:
        """Persist an endpoint the Datapath learned from authenticated ESP."""
        self.counters["roamed"] += 1
        state = self.moats.get(peer.name)
        if state is None:
            return
        try:
            rec = self.db.get(peer.name)
            learned = Learned(
                address=IPv4Address(new[0]),
                port=new[1] or rec.learned.port,
                registered=rec.learned.registered,
            )
            state.record = self.db.update(rec.replace(learned=learned), rec.version)
        except (MoatError, ValueError) as exc:
            log.info(
                "moat %s moved to %s:%d, record not updated: %s", peer.name, *new, exc
            )

    # --- registrations ---------------------------------------------------------------

    def register_many(self, requests: list[dict[str, Any]], now: float) -> list[Any]:
        """Answer `register` requests: one group commit, then the datapath.

        Each answer is sent only after its record is durable and its SAs are
        installed. A moat asking twice in one batch is registered twice.
        """
        answers: list[Any] = [None] * len(requests)
        logins: dict[int, Login] = {}
        for i, req in enumerate(requests):
            try:
                logins[i] = parse_login(req)
            except Refused as exc:
                answers[i] = {"ok": False, "error": str(exc)}
        wall = dt.datetime.now(dt.UTC).replace(microsecond=0)  # as the TOML holds it
        while logins:
            # one round: every moat at most once
            batch: dict[str, Login] = {}
            slots: dict[str, int] = {}
            for i, login in list(logins.items()):
                if login.moat_id not in batch:
                    batch[login.moat_id], slots[login.moat_id] = login, i
                    del logins[i]
            results = self.db.modify_many(batch, self._registration(batch, wall))
            self.counters["group_commits"] += 1
            for moat_id, i in slots.items():
                answers[i] = self._registered(moat_id, results[moat_id], now)
        self.counters["registered"] += sum(1 for a in answers if a["ok"])
        return answers

    def _registration(
        self, batch: dict[str, Login], wall: dt.datetime
    ) -> Callable[[MoatRecord], MoatRecord]:
        def change(rec: MoatRecord) -> MoatRecord:
            return registered(rec, self.settings, batch[rec.id].origin, wall)

        return change

    def _registered(
        self, moat_id: str, result: MoatRecord | MoatError, now: float
    ) -> dict[str, Any]:
        if isinstance(result, MoatError):
            log.info("moat %s: registration refused: %s", moat_id, result)
            if isinstance(result, RecordError):
                self.problems[f"{moat_id}.toml"] = str(result)
                self._remove(moat_id)
            return {"ok": False, "error": str(result)}
        self.problems.pop(f"{moat_id}.toml", None)
        if self.apply(result, now) == "failed":
            return {"ok": False, "error": "the portal could not install the SAs"}
        log.info("moat %s registered from %s", moat_id, result.learned.address)
        return {"ok": True, **answer_for(self.settings, result)}

    # --- sequence reservation -------------------------------------------------------

    def _read_reserved(self) -> dict[str, list[int]]:
        try:
            data = json.loads(self.sequence_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 2}

    def _restart_sequence(self, moat_id: str, spi: int) -> int:
        retired = self.retired_out.get(moat_id)
        if retired is not None and retired[0] == spi:
            return retired[1]  # retired in this run: its reservation still holds
        entry = self.reserved.get(moat_id)
        if entry is not None and entry[0] == spi:
            return int(entry[1])
        return SEQUENCE_BLOCK

    def reserve_sequences(self) -> None:
        """Reserve the next block for every SA past half of its block."""
        for name, peer in self.dp.peers.items():
            spi, seq = peer.out_sa.cfg.spi, peer.out_sa.seq
            entry = self.reserved.get(name)
            limit = (
                entry[1] if entry is not None and entry[0] == spi else SEQUENCE_BLOCK
            )
            if seq + SEQUENCE_BLOCK // 2 > limit:
                self.reserved[name] = [spi, seq + SEQUENCE_BLOCK]
                self._reserved_dirty = True
        if self._reserved_dirty:
            atomic_write(self.sequence_path, json.dumps(self.reserved).encode(), 0o600)
            self._reserved_dirty = False

    # --- status ---------------------------------------------------------------------

    def status(self, verbose: bool = False) -> dict[str, Any]:
        ready = sum(
            1
            for s in self.moats.values()
            if s.record.sa is not None and s.record.learned.address is not None
        )
        out: dict[str, Any] = {
            "moats": len(self.moats),
            "ready": ready,  # registered: a peer is built on the first packet
            "up": len(self.dp.peers),  # peers built
            "probes": len(self.probes),  # probe SAs (no peer until an ICV passes)
            "peer_idle": self.settings.peer_idle,
            "replay_marks": {"sas": len(self.marks.marks), **self.marks.counters},
            "load_seconds": round(self.load_seconds, 3),
            "problems": self.problems,
            "failed": {k: s.problem for k, s in self.moats.items() if s.problem},
            "counters": self.counters,
            "datapath": dict(self.dp.counters),
        }
        if verbose:
            out["peers"] = self.dp.status()["peers"]
        return out


class PortalControl(ControlServer):
    """The datapath loop's control socket, speaking portal/control.py.

    Root may ask anything; the ssh user (sshd's forced command) may only
    register. Registrations waiting together are answered as one batch.
    """

    def __init__(self, path: str, portal: Portal) -> None:
        super().__init__(path, portal.status)
        self.portal = portal
        self.sock.listen(CONTROL_BACKLOG)
        self.ssh_uid = _open_to_ssh_user(path, portal.settings.ssh_user)

    timeout = CLIENT_TIMEOUT

    def serve_one(self) -> None:
        """Answer every connection waiting now; never raises OSError."""
        waiting: list[tuple[socket.socket, dict[str, Any]]] = []
        for _ in range(REGISTRATION_BATCH):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                break
            try:
                conn.settimeout(self.timeout)
                line = _read_line(conn)
                uid = _peer_uid(conn)
                privileged = uid == ROOT_UID
                req = _registration(line) if privileged or uid == self.ssh_uid else None
                if req is not None:
                    waiting.append((conn, req))
                    continue
                _answer(conn, handle(self.portal, line, privileged))
            except OSError as exc:
                log.debug("control connection failed: %s", exc)
            conn.close()
        if not waiting:
            return
        try:
            answers = self.portal.register_many(
                [req for _, req in waiting], time.monotonic()
            )
        except OSError as exc:  # the group commit failed: nothing was written
            log.error("registrations not written: %s", exc)
            error = {"ok": False, "error": "the portal could not write; try later"}
            answers = [error] * len(waiting)
        for (conn, _), answer in zip(waiting, answers, strict=True):
            try:
                _answer(conn, answer)
            except OSError as exc:
                log.debug("moat %s left before its answer: %s", answer.get("moat"), exc)
            conn.close()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_LINE:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _answer(conn: socket.socket, answer: dict[str, Any]) -> None:
    conn.sendall(json.dumps(answer).encode() + b"\n")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
    return int(PEERCRED.unpack(creds)[1])


def _registration(line: bytes) -> dict[str, Any] | None:
    """The request if it is a `register`."""
    try:
        req = json.loads(line)
    except ValueError:
        return None
    return req if isinstance(req, dict) and req.get("op") == "register" else None


def _open_to_ssh_user(path: str, user: str) -> int | None:
    """Let the ssh user's forced command connect: root:<its group> 0660."""
    if user == "root":
        return ROOT_UID
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        log.warning("ssh user %s does not exist: registrations refused", user)
        return None
    os.chown(path, ROOT_UID, entry.pw_gid)
    os.chmod(path, 0o660)
    log.info("control socket open to %s (gid %d) for registrations", user, entry.pw_gid)
    return entry.pw_uid


def handle(portal: Portal, line: bytes, privileged: bool = True) -> dict[str, Any]:
    """One control request; only root (`privileged`) may do more than ping."""
    try:
        req = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "not JSON"}
    if not isinstance(req, dict):
        return {"ok": False, "error": "not an object"}
    op = req.get("op")
    if op == "ping":
        return {"ok": True}
    if not privileged:
        return {"ok": False, "error": f"op {op!r} not allowed"}
    if op == "status":
        return {"ok": True, **portal.status(bool(req.get("verbose")))}
    if op == "reload":
        moat_id = req.get("id")
        if not isinstance(moat_id, str):
            return {"ok": False, "error": "reload needs an id"}
        return {"ok": True, "result": portal.reload(moat_id, time.monotonic())}
    if op == "register":
        answer: dict[str, Any] = portal.register_many([req], time.monotonic())[0]
        return answer
    return {"ok": False, "error": f"unknown op {op!r}"}


def _kernel_routes(tun: Tun, portal: Portal) -> None:
    """The pool, plus any moat subnet outside it, to the TUN device (batched)."""
    pool = portal.settings.pool
    prefixes = [pool] + [
        s.record.subnet
        for s in portal.moats.values()
        if not s.record.subnet.subnet_of(pool)
    ]
    batch = "".join(f"route replace {p} dev {tun.name}\n" for p in prefixes)
    res = subprocess.run(
        ["ip", "-batch", "-"], input=batch, capture_output=True, text=True
    )
    if res.returncode != 0:
        log.warning("kernel routes: %s", res.stderr.strip())


def tun_mtu(settings: PortalSettings, outer_mtu: int = OUTER_MTU) -> int:
    """The TUN MTU the MTU policy wants (as `moat tunnel` chooses it)."""
    if settings.mtu_policy in ("virtual-large", "aggfrag"):
        return MAX_PACKET
    if settings.mtu_policy in ("classic", "clamp-mss"):
        return outer_mtu
    key = bytes(TRANSFORM_KEY_BYTES[settings.transform])
    sa = OutboundSA(SAConfig(spi=SPI_PROBE, transform=settings.transform, key=key))
    return sa.max_payload(esp_space(outer_mtu, 4, settings.encapsulation))


def serve(db: Database, settings: PortalSettings, tun_name: str = DEFAULT_TUN) -> int:
    portal = Portal(db, settings)
    portal.load(time.monotonic())
    status = portal.status()
    log.info(
        "portal: %d moats loaded in %.2fs, %d tunnels up, %d records skipped",
        status["moats"], portal.load_seconds, status["up"], len(status["problems"]),
    )  # fmt: skip
    print(
        f"portal: {status['moats']} moats loaded in {portal.load_seconds:.2f}s,"
        f" {status['up']} tunnels up, {len(status['problems'])} skipped",
        flush=True,
    )
    tun = Tun(tun_name)
    sock: OuterSocket | None = None
    control: PortalControl | None = None
    try:
        try:
            if settings.encapsulation == "udp":
                sock = UdpSocket(settings.endpoint, settings.port)
            else:
                sock = RawEspSocket(settings.endpoint)
        except OSError as exc:
            raise MoatError(
                f"cannot open the ESP socket on {settings.endpoint}: {exc.strerror}"
            ) from None
        tun.set_mtu(tun_mtu(settings))
        tun.set_up()
        _kernel_routes(tun, portal)
        control = PortalControl(settings.control, portal)
        loop = EventLoop(portal.dp, tun, {settings.encapsulation: sock}, control)
        poll = portal.dp.poll

        def poll_and_tick(now: float) -> None:
            poll(now)
            portal.tick(now)

        portal.dp.poll = poll_and_tick  # type: ignore[method-assign]
        loop.run()
        portal.stopped(time.monotonic())
        log.info("portal stopped")
        return 0
    finally:
        if control is not None:
            control.close()
        if sock is not None:
            sock.close()
        tun.close()
