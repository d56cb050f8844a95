"""What the long-lived service verbs share: stopping on SIGTERM/SIGINT and a
status file that `--status` prints.

The status file is volatile (it belongs on /run): it is replaced by rename so a
reader never sees half of it, but not fsynced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from services.status import (  # noqa: F401 - the services import them here
    print_status,
    publish_status,
    write_status,
)

log = logging.getLogger(__name__)


async def status_loop(
    path: Path, status: Callable[[], dict[str, Any]], interval: float = 1.0
) -> None:
    """Rewrite the status file every `interval` seconds until cancelled."""
    while True:
        publish_status(path, status())
        await asyncio.sleep(interval)


Source = tuple[str, int]
DatagramHandler = Callable[["Datagrams", bytes, Source, float], None]


class Datagrams(asyncio.DatagramProtocol):
    """A UDP endpoint handing each datagram, its source and its arrival time
    (wall clock, taken first) to `on_datagram`."""

    def __init__(self, on_datagram: DatagramHandler) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        now = time.time()
        self.on_datagram(self, data, (str(addr[0]), int(addr[1])), now)

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error: %s", exc)

    def send(self, data: bytes, destination: Source) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, destination)


def run_service(name: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop)` until it returns; SIGTERM and SIGINT set `stop`."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("%s: started (pid %d)", name, os.getpid())
        await main(stop)
        log.info("%s: stopped", name)

    asyncio.run(runner())
    return 0
