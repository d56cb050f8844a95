"""`moat dns`: the LAN's DNS server (asyncio adapter around the sans-IO parts).

Listens on UDP and TCP at the configured private-side addresses; keeps each
corporate zone as a secondary (services.dns.secondary drives the timers, this
module does the SOA checks and transfers with dnspython); forwards the rest to
the corporate resolvers (services.dns.forwarder) through the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import struct
import time
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.xfr

from moat.errors import MoatError
from services.dns import config as dnsconfig
from services.dns import zone as zonedata
from services.dns.cache import Cache
from services.dns.forwarder import Forwarder
from services.dns.handler import Decision, QueryHandler, Verdict, ZoneSlot
from services.dns.localnames import LocalNames
from services.dns.secondary import Action, Secondary
from services.runtime import (
    Datagrams,
    Source,
    print_status,
    publish_status,
    run_service,
    status_loop,
)

log = logging.getLogger(__name__)

TCP_LENGTH = struct.Struct("!H")
TCP_IDLE_TIMEOUT = 10.0
MAX_TCP_CLIENTS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML configuration file")
    parser.add_argument(
        "--hosts", help="hosts-like file of local names (overrides [local])"
    )
    parser.add_argument(
        "--status", action="store_true", help="print the running server's status"
    )


def run(args: argparse.Namespace) -> int:
    cfg = dnsconfig.load(args.config)
    if args.status:
        return print_status(cfg.status_file)
    if args.hosts:
        local = cfg.local or dnsconfig.LocalConfig("lan.", None, None)
        cfg = dnsconfig.DnsConfig(
            **{
                **cfg.__dict__,
                "local": dnsconfig.LocalConfig(local.domain, Path(args.hosts), None),
            }
        )
    server = DnsServer(cfg)
    return run_service("dns", server.serve)


class DnsServer:
    def __init__(self, cfg: dnsconfig.DnsConfig) -> None:
        self.cfg = cfg
        self.slots = [
            ZoneSlot(Secondary(z.name, z.max_age), set(z.primaries), z.tsig)
            for z in cfg.zones
        ]
        self.zone_cfg = {z.name: z for z in cfg.zones}
        self.wakeups = {slot.secondary.name: asyncio.Event() for slot in self.slots}
        local = None
        if cfg.local is not None:
            local = LocalNames(
                cfg.local.domain, cfg.local.hosts_file, cfg.local.lease_file
            )
        self.cache = Cache(cfg.cache)
        self.handler = QueryHandler(
            self.slots, local, self.cache, bool(cfg.resolvers), cfg.allow_query
        )
        self.forwarder = Forwarder(cfg.resolvers, cfg.forward_timeout)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.tcp_clients = 0
        self.clock_base = time.time()
        self.monotonic_base = time.monotonic()
        self.started = time.monotonic()

    # -- life -----------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._load_copies()
        transports = []
        servers = []
        for address in self.cfg.listen:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: Datagrams(self._on_datagram),
                    local_addr=(address, self.cfg.port),
                )
                transports.append(transport)
                servers.append(
                    await asyncio.start_server(self._tcp_client, address, self.cfg.port)
                )
            except OSError as exc:
                raise MoatError(
                    f"cannot listen on {address} port {self.cfg.port}: {exc.strerror}"
                ) from exc
            log.info("listening on %s port %d (UDP, TCP)", address, self.cfg.port)
        for slot in self.slots:
            self.spawn(self._secondary_loop(slot))
        self.spawn(status_loop(self.cfg.status_file, self.status))

        await stop.wait()

        # shut down
        for transport in transports:
            transport.close()
        for srv in servers:
            srv.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        publish_status(self.cfg.status_file, self.status())

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- queries --------------------------------------------------------------

    def _on_datagram(
        self, endpoint: Datagrams, wire: bytes, source: Source, now: float
    ) -> None:
        decision = self.decide(wire, source, tcp=False)
        if decision.verdict is Verdict.REPLY and decision.reply:
            endpoint.send(decision.reply, source)
        elif decision.verdict is Verdict.FORWARD and decision.query is not None:
            self.spawn(self._forward_udp(endpoint, decision.query, source))

    async def _forward_udp(
        self, endpoint: Datagrams, query: dns.message.Message, source: Source
    ) -> None:
        endpoint.send(await self.forward(query, tcp=False), source)

    def decide(self, wire: bytes, source: tuple[str, int], tcp: bool) -> Decision:
        decision = self.handler.handle(wire, source, self.now(), tcp=tcp)
        if decision.notify_zone is not None:
            slot = next(
                s for s in self.slots if s.secondary.name == decision.notify_zone
            )
            slot.secondary.notify(decision.notify_serial, self.now())
            self.wakeups[decision.notify_zone].set()
        return decision

    async def forward(self, query: dns.message.Message, tcp: bool) -> bytes:
        try:
            upstream = await self.forwarder.resolve(query)
        except Exception:
            log.exception("forwarding failed")
            upstream = None
        return self.handler.forwarded(query, upstream, self.now(), tcp=tcp)

    async def _tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        if self.tcp_clients >= MAX_TCP_CLIENTS:
            self.handler.counters["drop_tcp_busy"] += 1
            writer.close()
            return
        self.tcp_clients += 1
        try:
            while True:
                header = await asyncio.wait_for(
                    reader.readexactly(TCP_LENGTH.size), TCP_IDLE_TIMEOUT
                )
                (length,) = TCP_LENGTH.unpack(header)
                wire = await asyncio.wait_for(
                    reader.readexactly(length), TCP_IDLE_TIMEOUT
                )
                decision = self.decide(wire, (str(peer[0]), int(peer[1])), tcp=True)
                reply = decision.reply
                if decision.verdict is Verdict.FORWARD and decision.query:
                    reply = await self.forward(decision.query, tcp=True)
                if reply:
                    writer.write(TCP_LENGTH.pack(len(reply)) + reply)
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.tcp_clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- secondary zones ------------------------------------------------------

    def now(self) -> float:
        """The zone clock: wall-clock seconds at start, then monotonic.

        Zone ages must not jump when NTP steps the clock (a box that boots
        with its clock in 1970 would otherwise find every copy 56 years old
        after the first step), and a clock behind the newest stored copy is
        taken to be wrong: the zone clock starts at that copy's time.
        """
        return self.clock_base + time.monotonic() - self.monotonic_base

    def _load_copies(self) -> None:
        stored = {
            slot.secondary.name: zonedata.load(self.cfg.state_dir, slot.secondary.name)
            for slot in self.slots
        }
        newest = max((c[1] for c in stored.values() if c is not None), default=0.0)
        if newest > time.time():
            log.warning("clock is behind the stored zone copies; using their time")
        self.clock_base = max(time.time(), newest)
        self.monotonic_base = time.monotonic()
        for slot in self.slots:
            copy = stored[slot.secondary.name]
            if copy is None:
                continue
            data, saved_at = copy
            timers = zonedata.soa_timers(data)
            if timers is None:
                continue
            slot.data = data
            slot.secondary.loaded(timers, saved_at, self.now())

    async def _secondary_loop(self, slot: ZoneSlot) -> None:
        name = slot.secondary.name
        while True:
            action = slot.secondary.due(self.now())
            if action is not None:
                await self._perform(slot, action)
                continue
            wake_at = slot.secondary.next_timer()
            delay = 3600.0 if wake_at is None else max(0.0, wake_at - self.now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeups[name].wait(), delay)
            self.wakeups[name].clear()

    async def _perform(self, slot: ZoneSlot, action: Action) -> None:
        zcfg = self.zone_cfg[slot.secondary.name]
        errors = []
        for primary in zcfg.primaries:
            try:
                if action is Action.CHECK_SOA:
                    serial = await self._check_soa(slot, primary, zcfg)
                    slot.secondary.soa_answer(serial, self.now())
                    if slot.secondary.wanted_serial is None:
                        await self._save(slot)
                else:
                    await self._transfer(slot, primary, zcfg, action)
                return
            except (dns.exception.DNSException, OSError, TimeoutError) as exc:
                errors.append(f"{primary}: {type(exc).__name__} {exc}")
            except Exception as exc:  # dnspython raises a few plain ones
                log.exception("zone %s: %s failed", slot.secondary.name, action.value)
                errors.append(f"{primary}: {type(exc).__name__} {exc}")
        slot.secondary.failed(self.now(), "; ".join(errors) or "no primary")

    async def _check_soa(
        self, slot: ZoneSlot, primary: str, zcfg: dnsconfig.ZoneConfig
    ) -> int:
        query = dns.message.make_query(slot.origin, dns.rdatatype.SOA)
        if zcfg.tsig is not None:
            query.use_tsig(zcfg.tsig)
        reply = await dns.asyncquery.udp_with_fallback(
            query, primary, timeout=zcfg.transfer_timeout, port=zcfg.primary_port
        )
        response = reply[0]
        if response.rcode() != dns.rcode.NOERROR or not (response.flags & dns.flags.AA):
            raise dns.exception.DNSException(
                f"SOA check answered {dns.rcode.to_text(response.rcode())}"
            )
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.SOA and rrset.name == slot.origin:
                return int(rrset[0].serial)
        raise dns.exception.DNSException("SOA check answer has no SOA")

    async def _transfer(
        self,
        slot: ZoneSlot,
        primary: str,
        zcfg: dnsconfig.ZoneConfig,
        action: Action,
    ) -> None:
        tsig: dict[str, Any] = {}
        if zcfg.tsig is not None:
            tsig = {"keyring": zcfg.tsig, "keyname": zcfg.tsig.name}
        if action is Action.IXFR and slot.data is not None:
            target = slot.data  # deltas applied in one transaction
            query, _ = dns.xfr.make_query(target, **tsig)
        else:
            target = zonedata.new_zone(slot.secondary.name)
            query, _ = dns.xfr.make_query(target, serial=None, **tsig)
        await dns.asyncquery.inbound_xfr(
            primary,
            target,
            query=query,
            port=zcfg.primary_port,
            timeout=zcfg.transfer_timeout,
            lifetime=zcfg.transfer_timeout * 3,
        )
        timers = zonedata.soa_timers(target)
        if timers is None:
            raise dns.exception.DNSException("transferred zone has no SOA")
        slot.data = target
        slot.secondary.transferred(timers, self.now(), action)
        await self._save(slot)

    async def _save(self, slot: ZoneSlot) -> None:
        if slot.data is None or slot.secondary.last_ok is None:
            return
        try:
            await asyncio.to_thread(
                zonedata.save, self.cfg.state_dir, slot.data, slot.secondary.last_ok
            )
        except OSError as exc:
            log.error("zone %s: cannot store copy: %s", slot.secondary.name, exc)

    # -- status ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.now()
        return {
            "service": "dns",
            "uptime": round(time.monotonic() - self.started, 1),
            "zones": [slot.secondary.status(now) for slot in self.slots],
            "queries": dict(sorted(self.handler.counters.items())),
            "upstream": dict(sorted(self.forwarder.counters.items())),
            "cache": self.cache.status(),
        }
