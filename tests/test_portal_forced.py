"""The registration hot path without sshd: forced command, key lookup, daemon.

The forced command (portal/forced_command.py) and the AuthorizedKeysCommand
script run on every login; their input parsing gets property tests here, the
daemon's batch registration and its peer-credential rule get unit tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from portal_lab import two_moat_portal

from portal import forced_command as fc
from portal.daemon import Portal, PortalControl, handle
from portal.db import Database, key_file_name
from portal.provision import add_many, generate_identity
from portal.record import ID_PATTERN, normalise_ssh_key
from portal.session import Refused, parse_login
from portal.settings import FORCED_COMMAND, PortalSettings, settings_from_dict
from portal.sshd import keys_script

SSH_CONNECTION = b"198.51.100.7 40000 192.0.2.1 22"


@pytest.fixture
def portal(tmp_path: Path) -> tuple[Database, PortalSettings]:
    return two_moat_portal(tmp_path, ssh_user="root")


# --- the forced command's inputs --------------------------------------------------


def test_argv_exactly_socket_and_id() -> None:
    assert fc.parse_argv(["--socket", "/run/p.sock", "--id", "m-1"]) == (
        "/run/p.sock",
        "m-1",
    )
    for bad in (
        [],
        ["--id", "m1", "--socket", "/run/p.sock"],
        ["--socket", "rel.sock", "--id", "m1"],
        ["--socket", "/s", "--id", "M1"],
        ["--socket", "/s", "--id", "-m1"],
        ["--socket", "/s", "--id", "m1;id"],
        ["--socket", "/s", "--id", "m" * 64],
        ["--socket", "/s", "--id", "m1", "extra"],
    ):
        with pytest.raises(fc.Usage):
            fc.parse_argv(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=70), max_size=6))
def test_argv_parser_only_refuses(argv: list[str]) -> None:
    try:
        path, moat_id = fc.parse_argv(argv)
    except fc.Usage:
        return
    assert path.startswith("/") and moat_id.isascii()
    assert set(moat_id) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_json_string_round_trips_any_bytes(data: bytes) -> None:
    assert json.loads(fc.json_string(data)) == data.decode("latin-1")


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True),
    st.one_of(st.none(), st.binary(max_size=5000)),
    st.one_of(st.none(), st.binary(max_size=200)),
)
def test_request_line_is_one_json_object(
    moat_id: str, command: bytes | None, connection: bytes | None
) -> None:
    env = {b"PATH": b"/bin"}
    if command is not None:
        env[b"SSH_ORIGINAL_COMMAND"] = command
    if connection is not None:
        env[b"SSH_CONNECTION"] = connection
    line = fc.request_line(moat_id, env)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    req = json.loads(line)
    assert req["op"] == "register" and req["id"] == moat_id
    assert set(req) <= {"op", "id", "command", "ssh_connection"}  # no PATH
    if command is not None:
        assert req["command"] == command[: fc.MAX_ARGUMENT].decode("latin-1")


def test_daemon_down_is_a_temporary_refusal(tmp_path: Path) -> None:
    env = {b"SSH_ORIGINAL_COMMAND": b"register", b"SSH_CONNECTION": SSH_CONNECTION}
    status, out = fc.main(["--socket", str(tmp_path / "none.sock"), "--id", "m1"], env)
    assert status == fc.EXIT_TEMPFAIL
    answer = json.loads(out)
    assert answer["ok"] is False and "not running" in answer["error"]
    status, out = fc.main(["--id", "m1"], env)
    assert status == fc.EXIT_USAGE and json.loads(out)["ok"] is False


def test_runs_isolated_with_builtin_modules_only(tmp_path: Path) -> None:
    """As sshd runs it: `python3 -I -S`, importing nothing beyond start-up."""
    res = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", str(FORCED_COMMAND),
         "--socket", str(tmp_path / "x.sock"), "--id", "m1"],
        capture_output=True, text=True, env={"SSH_ORIGINAL_COMMAND": "register"},
    )  # fmt: skip
    assert res.returncode == fc.EXIT_TEMPFAIL
    assert json.loads(res.stdout)["ok"] is False
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines()}
    assert "_socket" in imported
    assert not imported & {"socket", "json", "re", "os", "site", "portal"}


# --- the key lookup script --------------------------------------------------------


def _fingerprint(blob: str) -> str:
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def test_keys_script_finds_keys_by_fingerprint(
    portal: tuple[Database, PortalSettings], tmp_path: Path
) -> None:
    """Generated keys until fingerprints with '/' and '+' were among them."""
    db, s = portal
    script = tmp_path / "keys.sh"
    script.write_text(keys_script(s, db.root))
    found = {"/": 0, "+": 0}
    n = 2
    while min(found.values()) == 0 or n < 6:
        n += 1
        _, pub = generate_identity(f"k{n}")
        add_many(db, s, [("", {"id": f"k{n}", "email": "k@example.com",
                               "ssh_key": normalise_ssh_key(pub)})])  # fmt: skip
        key_type, blob = normalise_ssh_key(pub).split()
        fp = _fingerprint(blob)
        for char in found:
            found[char] += char in fp
        assert key_file_name(blob) == fp[len("SHA256:") :].replace("/", "_")
        argv = ["sh", str(script), "root", key_type, blob, fp]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        assert out.startswith("restrict,command=") and f'--id k{n}"' in out
        assert out.rstrip().endswith(f"{key_type} {blob}")
        # right fingerprint, another key (or another user): nothing
        _, other = generate_identity("other")
        other_blob = normalise_ssh_key(other).split()[1]
        wrong_fp = fp[:-1] + ("B" if fp.endswith("A") else "A")
        for argv in ((key_type, other_blob, fp), (key_type, blob, wrong_fp)):
            res = subprocess.run(["sh", str(script), "root", *argv],
                                 capture_output=True, text=True)  # fmt: skip
            assert res.stdout == ""
        res = subprocess.run(["sh", str(script), "nobody", key_type, blob, fp],
                             capture_output=True, text=True)  # fmt: skip
        assert res.stdout == ""


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=4, max_size=4))
def test_keys_script_prints_nothing_for_garbage(
    tmp_path_factory: pytest.TempPathFactory, argv: list[str]
) -> None:
    script = _garbage_script(tmp_path_factory)
    args = [a for a in argv if "\x00" not in a]
    res = subprocess.run(["sh", str(script), *args], capture_output=True, text=True)
    assert res.stdout == ""


_SCRIPT: list[Path] = []


def _garbage_script(factory: pytest.TempPathFactory) -> Path:
    if not _SCRIPT:
        root = factory.mktemp("keys-db")
        (root / "keys").mkdir()
        s = settings_from_dict(
            {"endpoint": "192.0.2.1", "pool": "10.0.0.0/8", "host_key": "/x"}, "t"
        )
        script = root / "keys.sh"
        script.write_text(keys_script(s, root))
        _SCRIPT.append(script)
    return _SCRIPT[0]


# --- the daemon side --------------------------------------------------------------


def _req(moat_id: str, command: str = "register proto=1", address: str = "") -> dict:
    return {
        "op": "register",
        "id": moat_id,
        "command": command,
        "ssh_connection": f"{address or '198.51.100.7'} 40000 192.0.2.1 22",
    }


def test_batch_registers_durably_then_answers(
    portal: tuple[Database, PortalSettings],
) -> None:
    db, s = portal
    p = Portal(db, s)
    p.load(0.0)
    answers = p.register_many(
        [
            _req("m1"),
            _req("m1", address="198.51.100.8"),  # twice in one batch
            _req("m2"),  # static 192.0.2.50: refused from elsewhere
            _req("m2", "register; reboot", "192.0.2.50"),
            _req("../m1"),
            _req("m9"),
            _req("m2", address="192.0.2.50"),
        ],
        1.0,
    )
    assert [a["ok"] for a in answers] == [True, True, False, False, False, False, True]
    assert answers[0]["generation"] == 1 and answers[1]["generation"] == 2
    assert "static address" in answers[2]["error"]
    rec = db.get("m1")
    assert rec.version == 3 and rec.sa is not None and rec.sa.generation == 2
    assert str(rec.learned.address) == "198.51.100.8"
    assert answers[1]["sa_out"]["key"] == rec.sa.key_to_portal.hex()
    # what the moat was told is what the datapath holds
    assert p.moats["m1"].record == rec
    assert p.counters["registered"] == 3
    assert not list(db.moats_dir.glob(".*tmp*"))


def test_only_root_may_do_more_than_register(
    portal: tuple[Database, PortalSettings],
) -> None:
    db, s = portal
    p = Portal(db, s)
    p.load(0.0)
    assert handle(p, b'{"op": "status"}', privileged=False)["ok"] is False
    assert handle(p, b'{"op": "reload", "id": "m1"}', privileged=False)["ok"] is False
    assert handle(p, b'{"op": "ping"}', privileged=False)["ok"] is True
    answer = handle(p, json.dumps(_req("m1")).encode())
    assert answer["ok"] is True and answer["moat"] == "m1"


@pytest.fixture
def control(portal: tuple[Database, PortalSettings]) -> Iterator[Path]:
    """A PortalControl served by a thread (no datapath loop)."""
    db, s = portal
    p = Portal(db, s)
    p.load(0.0)
    server = PortalControl(s.control, p)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if select.select([server], [], [], 0.05)[0]:
                server.serve_one()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Path(s.control)
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_forced_command_through_the_control_socket(control: Path) -> None:
    env = {b"SSH_ORIGINAL_COMMAND": b"register proto=1",
           b"SSH_CONNECTION": SSH_CONNECTION}  # fmt: skip
    status, out = fc.main(["--socket", str(control), "--id", "m1"], env)
    assert status == fc.EXIT_OK and out.startswith(fc.OK_PREFIX)
    assert json.loads(out)["seen"]["address"] == "198.51.100.7"
    # injections are refused by the daemon, nothing runs
    for attack in (b"register; touch /tmp/x", b"register $(id)", b"sh -c id"):
        env[b"SSH_ORIGINAL_COMMAND"] = attack
        status, out = fc.main(["--socket", str(control), "--id", "m1"], env)
        assert status == fc.EXIT_REFUSED and json.loads(out)["ok"] is False
    # many at once: one batch, every one answered
    env[b"SSH_ORIGINAL_COMMAND"] = b"register"
    results: list[int] = []

    def one() -> None:
        results.append(fc.main(["--socket", str(control), "--id", "m1"], env)[0])

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [fc.EXIT_OK] * 20


def test_peer_that_is_not_root_may_only_register(
    control: Path, portal: tuple[Database, PortalSettings]
) -> None:
    """A child that dropped to nobody's uid is not the ssh user: only ping."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change uid")
    os.chmod(control, 0o666)
    control.parent.chmod(0o711)  # the test's own directory
    code = (  # chdir first: nobody cannot traverse pytest's directories
        "import os, socket, sys; os.chdir(os.path.dirname(sys.argv[1]));"
        "os.setgid(65534); os.setuid(65534);"
        "s = socket.socket(socket.AF_UNIX); s.connect(os.path.basename(sys.argv[1]));"
        "s.sendall(sys.argv[2].encode() + b'\\n'); print(s.makefile().readline())"
    )
    for req, ok in ((_req("m1"), False), ({"op": "status"}, False),
                    ({"op": "ping"}, True)):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", code, str(control), json.dumps(req)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert json.loads(out)["ok"] is ok, (req, out)
    assert portal[0].get("m1").sa is None


def test_unix_socket_peer_is_root_here(control: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the control socket treats root specially")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(control))
        sock.sendall(b'{"op": "status"}\n')
        assert json.loads(sock.makefile().readline())["ok"] is True


_FIELD = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=40),
    st.sampled_from(
        ["register", "register proto=1", "m1", "198.51.100.7 1 2.3.4.5 22"]
    ),
    st.lists(st.text(max_size=5), max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "id", "command", "ssh_connection",
                                        "subnet"]), _FIELD))  # fmt: skip
def test_daemon_login_parser_only_refuses(req: dict[str, object]) -> None:
    """Whatever reaches the daemon: a checked Login, or Refused."""
    try:
        login = parse_login(req)
    except Refused:
        return
    assert ID_PATTERN.match(login.moat_id)
    assert login.request.command == "register"
    assert login.origin.address.version == 4


def test_register_session_verb_is_the_same_client(
    portal: tuple[Database, PortalSettings], tmp_path: Path
) -> None:
    """`moat portal register-session` (a slower forced command) behaves alike."""
    db, _ = portal
    res = subprocess.run(
        [sys.executable, "-m", "moat", "portal", "--db", str(db.root),
         "register-session", "--socket", str(tmp_path / "none.sock"), "--id", "m1"],
        capture_output=True, env={**os.environ, "SSH_ORIGINAL_COMMAND": "register"},
    )  # fmt: skip
    assert res.returncode == fc.EXIT_TEMPFAIL
    assert "not running" in json.loads(res.stdout)["error"]


def test_failed_group_commit_answers_every_moat(
    portal: tuple[Database, PortalSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, s = portal
    p = Portal(db, s)
    p.load(0.0)
    before = db.get("m1")
    server = PortalControl(s.control, p)

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(db, "modify_many", disk_full)
    env = {b"SSH_ORIGINAL_COMMAND": b"register", b"SSH_CONNECTION": SSH_CONNECTION}
    results: list[tuple[int, bytes]] = []
    clients = [
        threading.Thread(
            target=lambda: results.append(
                fc.main(["--socket", s.control, "--id", "m1"], env)
            )
        )
        for _ in range(3)
    ]
    for t in clients:
        t.start()
    try:
        while any(t.is_alive() for t in clients):
            if select.select([server], [], [], 0.05)[0]:
                server.serve_one()
    finally:
        server.close()
    assert [r[0] for r in results] == [fc.EXIT_REFUSED] * 3
    assert all("could not write" in json.loads(r[1])["error"] for r in results)
    assert db.get("m1") == before


def test_rebuild_keys_moves_older_layouts(
    portal: tuple[Database, PortalSettings],
) -> None:
    """keys/ named by the SHA-256 of the base64 text (the older layout) is
    rewritten under fingerprints by `sshd-config` (Database.rebuild_keys)."""
    db, _ = portal
    blob = db.get("m1").key_blob
    current = db.keys_dir / str(key_file_name(blob))
    old = db.keys_dir / hashlib.sha256(blob.encode()).hexdigest()
    current.rename(old)
    assert db.id_for_key(blob) is None
    assert db.rebuild_keys() == 2
    assert not old.exists() and db.id_for_key(blob) == "m1"
    assert sorted(p.name for p in db.keys_dir.iterdir()) == sorted(
        str(key_file_name(db.get(m).key_blob)) for m in ("m1", "m2")
    )
