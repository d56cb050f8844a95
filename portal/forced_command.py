"""sshd's forced command for a moat key: hand the login to the portal daemon.

sshd runs this for every registration (the AuthorizedKeysCommand names it in
`restrict,command="... --socket PATH --id ID"`), so it must start in a few
milliseconds: it runs as `python3 -I -S forced_command.py` (no site, no
environment, no script directory on sys.path) and imports only modules built
into the interpreter (`sys`, `posix`, `_socket`; `socket.py` alone would
double the start-up time).

It does not interpret anything: it sends the moat id (from its own argv,
fixed by the key lookup), SSH_CONNECTION (set by sshd from the TCP
connection) and SSH_ORIGINAL_COMMAND (what the moat asked for, as data) to
the running `moat portal run` over its control socket, and copies the
daemon's JSON answer to stdout. The daemon validates all three, writes the
record durably and applies the new SAs before it answers.

When the daemon is not running, the moat gets a JSON refusal saying so and
exit status 75 (EX_TEMPFAIL); `moat register` retries with its backoff. No
registration happens without the daemon: it owns the records and the
datapath that would carry the new SAs.
"""

import _socket
import posix
import sys

MAX_ARGUMENT = 4096  # longer environment values are refused here
MAX_ANSWER = 1 << 16
TIMEOUT = 30.0  # the daemon answers after its durable write
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 64  # EX_USAGE: sshd was configured wrongly
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the daemon is down or busy; try again
OK_PREFIX = b'{"ok": true'  # how the daemon's answer to a success begins
ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
MAX_ID = 63
PRINTABLE_ASCII = range(0x20, 0x7F)
JSON_ESCAPED = frozenset(b'"\\')


class Usage(Exception):
    """argv is not `--socket PATH --id ID` (a configuration error)."""


def parse_argv(argv: list[str]) -> tuple[str, str]:
    """(socket path, moat id) from exactly `--socket PATH --id ID`."""
    if len(argv) != 4 or argv[0] != "--socket" or argv[2] != "--id":
        raise Usage("usage: forced_command.py --socket PATH --id ID")
    path, moat_id = argv[1], argv[3]
    if not path.startswith("/"):
        raise Usage("--socket must be an absolute path")
    raw = moat_id.encode("utf-8", "surrogateescape")
    if not 0 < len(raw) <= MAX_ID or not set(raw) <= ID_CHARS or raw[0] == ord("-"):
        raise Usage("--id is not a moat id")
    return path, moat_id


def json_string(data: bytes) -> bytes:
    """`data` as a JSON string literal: bytes map to U+0000..U+00FF."""
    out = bytearray(b'"')
    for byte in data:
        if byte in PRINTABLE_ASCII and byte not in JSON_ESCAPED:
            out.append(byte)
        else:
            out += b"\\u%04x" % byte
    out += b'"'
    return bytes(out)


def request_line(moat_id: str, environ: dict[bytes, bytes]) -> bytes:
    """The control-socket request for this login (one JSON line)."""
    fields = [(b"op", b"register"), (b"id", moat_id.encode())]
    for name, key in ((b"SSH_CONNECTION", b"ssh_connection"),
                      (b"SSH_ORIGINAL_COMMAND", b"command")):  # fmt: skip
        value = environ.get(name)
        if value is not None:
            fields.append((key, value[:MAX_ARGUMENT]))
    body = b", ".join(json_string(k) + b": " + json_string(v) for k, v in fields)
    return b"{" + body + b"}\n"


def refusal(error: str) -> bytes:
    return b'{"ok": false, "error": ' + json_string(error.encode()) + b"}\n"


def ask_daemon(path: str, line: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send one request, return the answer (raises OSError)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line)
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < MAX_ANSWER:
            chunk = sock.recv(MAX_ANSWER)
            if not chunk:
                break
            answer += chunk
        return answer
    finally:
        sock.close()


def exit_status(answer: bytes) -> int:
    return EXIT_OK if answer.startswith(OK_PREFIX) else EXIT_REFUSED


def main(argv: list[str], environ: dict[bytes, bytes]) -> tuple[int, bytes]:
    """(exit status, what goes to stdout)."""
    try:
        path, moat_id = parse_argv(argv)
    except Usage as exc:
        return EXIT_USAGE, refusal(f"portal misconfigured: {exc}")
    try:
        answer = ask_daemon(path, request_line(moat_id, environ))
    except OSError:
        return EXIT_TEMPFAIL, refusal("the portal daemon is not running; try later")
    if not answer.endswith(b"\n"):
        return EXIT_TEMPFAIL, refusal("the portal daemon did not answer; try later")
    return exit_status(answer), answer


if __name__ == "__main__":
    status, output = main(sys.argv[1:], posix.environ)
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    sys.exit(status)
