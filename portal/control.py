"""The portal daemon's control socket: one JSON object per line, each way.

Requests: {"op": "reload", "id": ID} (re-read one moat's record and apply
it: add, change, re-key or remove that moat's tunnel only), {"op": "status"},
{"op": "ping"} and {"op": "register", "id": ID, "ssh_connection": ...,
"command": ...} (sshd's forced command, portal/forced_command.py). Answers:
{"ok": true, ...} or {"ok": false, "error": ...}. The socket is a unix
stream socket, root:<ssh user's group> 0660; only root may do more than
register and ping (the daemon checks the peer's uid).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from moat.errors import MoatError

MAX_LINE = 1 << 20


class ControlError(MoatError):
    pass


def request(path: str, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request and wait for its answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(obj).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_LINE:
                    raise ControlError("answer too long")
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"control socket {path}: unreadable answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"control socket {path}: unreadable answer")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "request failed")))
    return answer
