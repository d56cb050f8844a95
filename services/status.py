"""A service's status file, which `--status` prints.

The status file is volatile (it belongs on /run): it is replaced by rename so a
reader never sees half of it, but not fsynced. Standard library only: the
DHCP client on a 128 MiB box imports this without asyncio.
"""

from __future__ import annotations

import json
import logging
import os
import time
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


def publish_status(path: Path, status: dict[str, Any]) -> None:
    """write_status, logging instead of raising: status must not stop a service."""
    try:
        write_status(path, status)
    except OSError as exc:
        log.error("cannot write status %s: %s", path, exc)


def print_status(path: Path) -> int:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MoatError(
            f"no status at {path} (is the service running?): {exc}"
        ) from exc
    print(text, end="")
    return 0
