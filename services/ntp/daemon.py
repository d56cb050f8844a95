"""`moat ntpd`: client of the portal's NTP server and server for the LAN.

Configuration (TOML):

    upstream = "10.99.0.1"        # the portal's NTP server
    upstream_port = 123
    listen = ["192.168.1.1"]      # private-side addresses served
    port = 123
    poll = 64                     # seconds between requests (first 4: 2 s)
    step_threshold = 0.128        # step the clock when off by more
    set_clock = true              # false (or --no-set-clock): only report
    status_file = "/run/moat/ntp.status.json"

The clock is stepped with clock_settime(CLOCK_REALTIME) when the filtered
offset exceeds step_threshold. TODO: smaller offsets are not slewed (adjtimex);
between steps the clock free-runs, which is well inside what the LAN needs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from moat.errors import MoatError
from services.configfile import read_section
from services.ntp import packet
from services.ntp.client import NtpClient, Sample
from services.ntp.server import NtpServer
from services.runtime import (
    Datagrams,
    print_status,
    publish_status,
    run_service,
    status_loop,
)

log = logging.getLogger(__name__)

BURST_REQUESTS = 4  # like iburst: the first requests go out quickly
BURST_INTERVAL = 2.0


@dataclass(frozen=True)
class NtpConfig:
    upstream: tuple[str, int]
    listen: list[str]
    port: int
    poll: float
    step_threshold: float
    set_clock: bool
    status_file: Path


def load_config(path: str | Path) -> NtpConfig:
    top = read_section(path)
    return NtpConfig(
        upstream=(top.address("upstream"), top.port("upstream_port", 123)),
        listen=top.addresses("listen", []),
        port=top.port("port", 123),
        poll=top.number("poll", 64.0, low=0.5, high=86400),
        step_threshold=top.number("step_threshold", 0.128, low=0.001),
        set_clock=top.get("set_clock", bool, True),
        status_file=Path(top.get("status_file", str, "/run/moat/ntp.status.json")),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML configuration file")
    parser.add_argument(
        "--no-set-clock",
        action="store_true",
        help="never change the host clock; only measure and report the offset",
    )
    parser.add_argument(
        "--status", action="store_true", help="print the running daemon's status"
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.status:
        return print_status(cfg.status_file)
    daemon = NtpDaemon(cfg, set_clock=cfg.set_clock and not args.no_set_clock)
    return run_service("ntpd", daemon.serve)


class NtpDaemon:
    def __init__(self, cfg: NtpConfig, set_clock: bool) -> None:
        self.cfg = cfg
        self.set_clock = set_clock
        self.client = NtpClient(cfg.upstream)
        self.server = NtpServer()
        self.steps = 0
        self.started = time.time()

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        transports: list[asyncio.DatagramTransport] = []
        for address in self.cfg.listen:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: Datagrams(self._on_request),
                    local_addr=(address, self.cfg.port),
                )
            except OSError as exc:
                raise MoatError(
                    f"cannot listen on {address} port {self.cfg.port}: {exc.strerror}"
                ) from exc
            transports.append(transport)
            log.info("serving NTP on %s port %d", address, self.cfg.port)
        family = socket.AF_INET6 if ":" in self.cfg.upstream[0] else socket.AF_INET
        upstream, proto = await loop.create_datagram_endpoint(
            lambda: Datagrams(self._on_reply),
            family=family,
            local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0),
        )
        transports.append(upstream)
        log.info(
            "polling %s port %d every %.0fs; clock %s",
            *self.cfg.upstream,
            self.cfg.poll,
            "set from it" if self.set_clock else "NOT set (report only)",
        )
        tasks = [
            loop.create_task(self._poll(cast(Datagrams, proto))),
            loop.create_task(status_loop(self.cfg.status_file, self.status)),
        ]

        await stop.wait()

        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in transports:
            transport.close()
        publish_status(self.cfg.status_file, self.status())

    # -- client side ------------------------------------------------------------

    async def _poll(self, proto: Datagrams) -> None:
        sent = 0
        while True:
            proto.send(self.client.request(time.time()), self.cfg.upstream)
            sent += 1
            interval = self.cfg.poll * (1 << self.client.backoff)
            if sent < BURST_REQUESTS:
                interval = min(interval, BURST_INTERVAL)
            await asyncio.sleep(interval)

    def _on_reply(
        self, proto: Datagrams, data: bytes, source: tuple[str, int], now: float
    ) -> None:
        result = self.client.response(data, source, now)
        if isinstance(result, Sample):
            log.debug("sample offset %+.6f delay %.6f", result.offset, result.delay)
            self._discipline()

    def _discipline(self) -> None:
        selected = self.client.selected
        if selected is None or abs(selected.offset) <= self.cfg.step_threshold:
            return
        if not self.set_clock:
            self.client.counters["steps_not_taken"] += 1
            return
        offset = selected.offset
        try:
            time.clock_settime(time.CLOCK_REALTIME, time.time() + offset)
        except OSError as exc:
            self.client.counters["step_failures"] += 1
            log.error("cannot set the clock: %s", exc)
            return
        self.steps += 1
        self.client.after_step(offset)
        log.warning("clock stepped by %+.3fs from %s", offset, self.cfg.upstream[0])

    # -- server side ------------------------------------------------------------

    def _on_request(
        self, proto: Datagrams, data: bytes, source: tuple[str, int], now: float
    ) -> None:
        receive_ts = packet.from_unix(now)
        clock = self.client.clock_state(now)
        reply = self.server.respond(
            data, receive_ts, packet.from_unix(time.time()), clock
        )
        if reply is not None:
            proto.send(reply, source)

    # -- status -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "service": "ntpd",
            "uptime": round(now - self.started, 1),
            "set_clock": self.set_clock,
            "steps": self.steps,
            "client": self.client.status(now),
            "server": dict(sorted(self.server.counters.items())),
        }
