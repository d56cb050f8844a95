"""The supervisor hooks, with a stand-in supervisor and a file-backed box."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ota_world import World

import ota.supervise
from ota import bootenv


class FakeSupervisor:
    def __init__(self, ready: bool, tunnel: bool = False) -> None:
        self.lines: list[str] = []
        self.ready = ready
        verbs = ["dhcpd"] + (["tunnel"] if tunnel else [])
        self.services = {
            v: SimpleNamespace(spec=SimpleNamespace(verb=v)) for v in verbs
        }

    def say(self, text: str) -> None:
        self.lines.append(text)

    def all_ready(self, now: float) -> bool:
        return self.ready


@pytest.fixture
def trial_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    world = World(tmp_path)
    bundle, _ = world.publish("1.1.0")
    world.install(bundle)
    assert bootenv.grub_boot(world.config.store()).slot == "b"
    calls = tmp_path / "calls"
    config = world.config_json(
        version="1.1.0",
        running_slot="b",
        prove_settle=0.5,
        prove_deadline=60,
        console={"commands": {"reboot": ["sh", "-c", f"echo reboot >> {calls}"]}},
    )
    path = tmp_path / "ota.json"
    path.write_text(json.dumps(config))
    monkeypatch.setattr(ota.supervise, "CONFIG", path)
    monkeypatch.setattr(ota.supervise, "TICK", 0.1)
    ota.supervise.reset()
    world.calls = calls  # type: ignore[attr-defined]
    yield world
    ota.supervise.reset()


def wait_for(cond: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_ready_hook_marks_trial_slot_good(trial_box: World) -> None:
    sup = FakeSupervisor(ready=True)
    ota.supervise.on_ready(sup)
    wait_for(lambda: trial_box.state().good == "b")
    s = trial_box.state()
    assert (s.trial, s.floor) == ("-", "1.1.0")
    assert any("on trial" in line for line in sup.lines)
    assert any("marked good" in line for line in sup.lines)


def test_tunnel_configured_but_down_never_marks_good(trial_box: World) -> None:
    sup = FakeSupervisor(ready=True, tunnel=True)
    ota.supervise.on_ready(sup)
    time.sleep(1.5)
    assert trial_box.state().trial == "b"
    assert any("tunnel down" in line for line in sup.lines)
    ota.supervise.on_timeout(sup)
    wait_for(lambda: trial_box.calls.exists())  # type: ignore[attr-defined]
    assert trial_box.state().good == "a"


def test_timeout_hook_reboots_a_trial_slot(trial_box: World) -> None:
    sup = FakeSupervisor(ready=False)
    ota.supervise.on_timeout(sup)
    assert trial_box.calls.read_text() == "reboot\n"  # type: ignore[attr-defined]
    assert any("rebooting" in line for line in sup.lines)
    assert trial_box.state().trial == "b"  # GRUB counts the tries


@pytest.mark.parametrize("module", ["ota.supervise", "ota.console", "ota.cli"])
def test_long_running_modules_import_no_tuf_or_cryptography(module: str) -> None:
    # the supervisor and the console run for the box's whole uptime in 128 MiB:
    # the TUF client in them left too little memory for a second moat process
    code = (
        f"import sys, {module}; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.split())
    assert "ota" in loaded
    heavy = {"tuf", "securesystemslib", "cryptography", "urllib3", "ssl", "datapath"}
    assert not loaded & heavy, loaded & heavy
