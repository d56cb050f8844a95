"""Asking a running Moat daemon over its control socket (a Unix stream
socket: one request line in, one JSON document out, then close).

Kept to the standard library's socket and json: the console imports it on a
128 MiB box without loading the daemon's own modules.
"""

from __future__ import annotations

import json
import socket
from typing import Any

QUERY_TIMEOUT = 5.0


def query(
    path: str, request: str = "status", timeout: float = QUERY_TIMEOUT
) -> dict[str, Any]:
    """Send `request`, return the decoded answer (OSError, ValueError)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
