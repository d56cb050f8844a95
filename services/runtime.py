"""What the long-lived service verbs share: stopping on SIGTERM/SIGINT and a
status file that `--status` prints.

The status file is volatile (it belongs on /run): it is replaced by rename so a
reader never sees half of it, but not fsynced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from moat.errors import MoatError

log = logging.getLogger(__name__)


def write_status(path: Path, status: dict[str, Any]) -> None:
    status = {"written_at": round(time.time(), 3), "pid": os.getpid(), **status}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def print_status(path: Path) -> int:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MoatError(
            f"no status at {path} (is the service running?): {exc}"
        ) from exc
    print(text, end="")
    return 0


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
