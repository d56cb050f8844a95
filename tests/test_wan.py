"""WAN settings (the console's wan.json, read by `moat wan`) and the live
/var restore the console uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moat import varbackup
from moat.errors import ConfigError
from services import wan


def test_static_settings_checked() -> None:
    good = wan.WanSettings.static("192.0.2.10/24", "192.0.2.1", "192.0.2.53")
    assert good.to_json() == {
        "mode": "static",
        "address": "192.0.2.10/24",
        "gateway": "192.0.2.1",
        "dns": "192.0.2.53",
    }
    for address, gateway, why in (
        ("192.0.2.10/24", "198.51.100.1", "not inside"),
        ("192.0.2.10/32", "192.0.2.10", "prefix"),
        ("192.0.2.10/24", "192.0.2.10", "address itself"),
        ("300.1.1.1/24", "192.0.2.1", "does not appear"),
        ("192.0.2.10/24", "", "does not appear"),
    ):
        with pytest.raises(ValueError, match=why):
            wan.WanSettings.static(address, gateway)


def test_load_missing_dhcp_static_and_bad(tmp_path: Path) -> None:
    path = tmp_path / "wan.json"
    assert wan.load(path) == wan.WanSettings("dhcp")
    wan.save(path, wan.WanSettings.static("10.0.2.20/24", "10.0.2.2"))
    again = wan.load(path)
    assert again.mode == "static" and str(again.gateway) == "10.0.2.2"
    for text, where in (
        ("{", "syntax"),
        ("[]", "file"),
        ('{"mode": "pppoe"}', "mode"),
        ('{"mode": "static", "address": 5}', "static"),
        (
            '{"mode": "static", "address": "10.0.0.1/8", "gateway": "11.0.0.1"}',
            "static",
        ),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=where):
            wan.load(path)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.dictionaries(
            st.sampled_from(["mode", "address", "gateway", "dns", "x"]),
            st.one_of(
                st.sampled_from(["dhcp", "static", "10.0.0.9/24", "10.0.0.1", ""]),
                st.text(max_size=20),
                st.integers(),
                st.none(),
            ),
        ).map(json.dumps),
    )
)
def test_any_file_is_settings_or_a_config_error(text: str) -> None:
    """Whatever wan.json holds, `moat wan` gets settings or a one-line error."""
    try:
        data = json.loads(text)
    except ValueError:
        return
    try:
        got = wan.WanSettings.parse(data, "wan.json")
    except ConfigError:
        return
    assert wan.WanSettings.parse(got.to_json(), "again") == got


def _wait_exec(pid: int, word: bytes) -> None:
    """Until the child runs its own program (Popen may return before exec)."""
    deadline = time.monotonic() + 10
    while word not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_restart_service_signals_only_a_wan_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "wan.pid"
    assert not wan.restart_service(pid_file)  # no file
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    keeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "moat", "wan"]
    )
    try:
        _wait_exec(keeper.pid, b"wan")
        pid_file.write_text(f"{other.pid}\n")
        assert not wan.restart_service(pid_file)  # stale pid of something else
        assert other.poll() is None
        pid_file.write_text(f"{keeper.pid}\n")
        assert wan.restart_service(pid_file)
        assert keeper.wait(timeout=10) == -15
    finally:
        other.kill()
        keeper.kill()
        other.wait()


def test_live_restore_replaces_var(tmp_path: Path) -> None:
    device = tmp_path / "backup.bin"
    device.write_bytes(b"\0" * (2 * 2**20))
    var = tmp_path / "var"
    for name, data in {"moat/keep": b"old\n", "moat/changed": b"v1\n"}.items():
        (var / name).parent.mkdir(parents=True, exist_ok=True)
        (var / name).write_bytes(data)
    (var / "log").mkdir()
    varbackup.commit(var, device)
    (var / "moat/changed").write_bytes(b"v2\n")
    (var / "moat/new").write_bytes(b"made after the backup\n")
    (var / "later").mkdir()
    (var / "log/today.log").write_bytes(b"kept: logs are not in backups\n")
    varbackup.restore(device, var, replace=True)
    assert (var / "moat/keep").read_bytes() == b"old\n"
    assert (var / "moat/changed").read_bytes() == b"v1\n"
    assert not (var / "moat/new").exists() and not (var / "later").exists()
    assert (var / "log/today.log").exists()


def test_live_restore_without_backup_removes_nothing(tmp_path: Path) -> None:
    device = tmp_path / "backup.bin"
    device.write_bytes(b"\0" * (2 * 2**20))
    var = tmp_path / "var"
    (var / "moat").mkdir(parents=True)
    (var / "moat/precious").write_bytes(b"x")
    with pytest.raises(varbackup.VarBackupError):
        varbackup.restore(device, var, replace=True)
    assert (var / "moat/precious").exists()


def test_static_wan_waits_and_keeps_its_pid_file(tmp_path: Path) -> None:
    """`moat wan` with static settings and a stand-in ip(8) on PATH: the ip
    commands run in order, the service stays up until SIGTERM."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "ip.calls"
    (bindir / "ip").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bindir / "ip").chmod(0o755)
    settings_file = tmp_path / "wan.json"
    wan.save(settings_file, wan.WanSettings.static("10.0.2.20/24", "10.0.2.2"))
    pid_file = tmp_path / "wan.pid"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    argv = [sys.executable, "-m", "moat", "wan", "--interface", "wild0"]
    argv += ["--settings", str(settings_file), "--pid-file", str(pid_file)]
    argv += ["--static-mark", str(tmp_path / "mark")]
    proc = subprocess.Popen(argv, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "mark").exists() and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.1)
        assert calls.read_text().splitlines() == [
            "link set dev wild0 up",
            "addr flush dev wild0",
            "addr add 10.0.2.20/24 dev wild0",
            "route replace default via 10.0.2.2 dev wild0",
        ]
        assert int(pid_file.read_text()) == proc.pid
        assert wan.restart_service(pid_file)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
