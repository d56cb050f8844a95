"""The recovery console driven through a pty with pexpect, as over a serial line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from netns import wait_for
from ota_world import World

from ota import bootenv
from ota.console import check_password, hash_password

TIMEOUT = 30
MENU_PROMPT = "Choose 1-12"
SLEEP = "import time; time.sleep(60)"


class Box:
    def __init__(self, tmp: Path) -> None:
        self.world = World(tmp / "w")
        self.tmp = tmp
        self.calls = tmp / "calls.log"
        self.var = tmp / "var"
        self.var.mkdir()
        self.log = tmp / "moat.log"
        self.log.write_text("".join(f"log line {i}\n" for i in range(100)))
        record = f'echo "$0 $*" >> {self.calls}'

        def stand_in(name: str) -> list[str]:
            return ["sh", "-c", record, name]

        self.config = tmp / "ota.json"
        self.config.write_text(
            json.dumps(
                self.world.config_json(
                    running_slot="a",
                    console={
                        "commands": {
                            name: stand_in(name)
                            for name in (
                                "reboot",
                                "poweroff",
                                "ping",
                                "register",
                                "var_restore",
                                "var_commit",
                                "dhcp",
                                "ip",
                            )
                        }
                        | {
                            "addresses": ["echo", "wild UP 192.0.2.7/24"],
                            "shell": ["/bin/sh"],
                        },
                        "password_file": str(tmp / "admin.pw"),
                        "wan_file": str(self.var / "moat/wan.json"),
                        "wan_pid_file": str(tmp / "wan.pid"),
                        "log_files": [str(self.log)],
                        "var_dir": str(self.var),
                        "log_file": str(tmp / "console.log"),
                        "status_files": {"portal": str(tmp / "tunnel.status")},
                        "service_log_dir": str(tmp / "svclogs"),
                    },
                )
            )
        )
        (tmp / "tunnel.status").write_text("up, portal 198.51.100.1\n")
        (tmp / "svclogs").mkdir()
        (tmp / "svclogs/dhcpd.log").write_text("starting\nserving 10.0.0.0/24\n")

    def calls_made(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def spawn(self, *extra: str) -> pexpect.spawn:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        child = pexpect.spawn(
            sys.executable,
            ["-m", "moat", "console", "--config", str(self.config), *extra],
            env=env,
            encoding="utf-8",
            timeout=TIMEOUT,
        )
        child.expect(MENU_PROMPT)
        return child


def test_idle_menu_closes_for_init_to_wait_again(box: Box) -> None:
    """--idle-exit: a used menu stays; an idle one ends (init's script then
    waits for Enter with no Python process in memory)."""
    c = box.spawn("--idle-exit", "3")
    c.sendline("99")
    c.expect("is not a menu number")
    c.expect(MENU_PROMPT)
    c.expect("no input for a while: the menu closes", timeout=TIMEOUT)
    c.expect(pexpect.EOF, timeout=TIMEOUT)
    c.wait()
    assert c.exitstatus == 0


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


@pytest.fixture
def child(box: Box) -> Iterator[pexpect.spawn]:
    c = box.spawn()
    yield c
    c.terminate(force=True)


def choose(child: pexpect.spawn, item: str, *answers: str) -> None:
    child.sendline(item)
    for a in answers:
        child.sendline(a)


def test_menu_lists_every_item(box: Box) -> None:
    c = box.spawn()
    c.sendline("")
    c.expect("12\\) shell \\(administrator password\\)")
    for text in ("1\\) status", "6\\) restore /var", "8\\) boot the other slot"):
        c.sendline("")
        c.expect(text)
    c.terminate(force=True)


def test_bad_input_and_ctrl_c_do_not_kill_it(child: pexpect.spawn) -> None:
    for bad in ("99", "0", "abc", "1; sh", "$(reboot)"):
        child.sendline(bad)
        child.expect("is not a menu number")
    child.sendintr()  # ^C as typed on the terminal
    child.sendline("")
    child.expect("control characters ignored")
    child.sendcontrol("\\")
    child.sendcontrol("z")
    child.sendline("")
    child.expect(MENU_PROMPT)
    os.kill(child.pid, signal.SIGINT)  # even a real signal
    os.kill(child.pid, signal.SIGQUIT)
    os.kill(child.pid, signal.SIGTSTP)
    child.sendline("1")
    child.expect("slot a: 1.0.0")
    assert child.isalive()


def test_status(child: pexpect.spawn) -> None:
    choose(child, "1")
    child.expect("product moat, board pc-x86_64, running 1.0.0")
    child.expect("slot a: 1.0.0 +running, good")
    child.expect("slot b: -")
    child.expect("version floor 1.0.0")
    child.expect("wild UP 192.0.2.7/24")
    child.expect("tunnel: not running")
    child.expect("dhcpd: serving 10.0.0.0/24")
    child.expect("portal: up, portal 198.51.100.1")
    child.expect(MENU_PROMPT)
    assert "INFO" not in child.before  # log lines go to the file, not the menu


def test_recent_log(child: pexpect.spawn) -> None:
    choose(child, "2")
    child.expect("last 30 lines of")
    child.expect("log line 70")
    child.expect("log line 99")


def test_ping_validates_host(child: pexpect.spawn, box: Box) -> None:
    choose(child, "3", "; rm -rf /")
    child.expect("not a host name or address")
    choose(child, "3", "-f")
    child.expect("not a host name or address")
    choose(child, "3", "192.0.2.1")
    child.expect(MENU_PROMPT)
    choose(child, "3", "portal.example.net")
    child.expect(MENU_PROMPT)
    child.sendline("")
    child.expect(MENU_PROMPT)
    assert box.calls_made() == ["ping 192.0.2.1", "ping portal.example.net"]


def test_wan_dhcp_static_and_bad(child: pexpect.spawn, box: Box) -> None:
    wan = box.var / "moat/wan.json"
    service = subprocess.Popen([sys.executable, "-c", SLEEP, "moat", "wan"])
    try:
        wait_for(lambda: b"wan" in Path(f"/proc/{service.pid}/cmdline").read_bytes())
        (box.tmp / "wan.pid").write_text(f"{service.pid}\n")
        choose(child, "4", "1")
        child.expect("saved to")
        child.expect("the WAN service restarts with these settings")
        child.expect(MENU_PROMPT)
        assert service.wait(timeout=TIMEOUT) == -signal.SIGTERM
    finally:
        service.kill()
    assert json.loads(wan.read_text()) == {"mode": "dhcp"}
    choose(child, "4", "2", "192.0.2.10/24", "198.51.100.1", "")
    child.expect("not saved: gateway is not inside")
    choose(child, "4", "2", "300.1.1.1/24", "192.0.2.1", "")
    child.expect("not saved")
    choose(child, "4", "3")
    child.expect("not saved: answer 1 or 2")
    choose(child, "4", "2", "192.0.2.10/24", "192.0.2.1", "192.0.2.53")
    child.expect("saved to")
    child.expect("the WAN service is not running; it uses them when it starts")
    child.expect(MENU_PROMPT)
    assert json.loads(wan.read_text()) == {
        "mode": "static",
        "address": "192.0.2.10/24",
        "gateway": "192.0.2.1",
        "dns": "192.0.2.53",
    }


def test_reregister(child: pexpect.spawn, box: Box) -> None:
    choose(child, "5")
    child.expect(MENU_PROMPT)
    assert box.calls_made() == ["register "]


def test_restore_var_needs_confirmation(child: pexpect.spawn, box: Box) -> None:
    choose(child, "6", "no")
    child.expect("cancelled")
    choose(child, "6", "yes")
    child.expect("/var restored from its backup")
    assert box.calls_made() == ["var_restore "]


def test_factory_reset_erases_var_and_reboots(child: pexpect.spawn, box: Box) -> None:
    (box.var / "moat").mkdir()
    (box.var / "moat/registration.json").write_text("{}")
    (box.var / "lost+found").mkdir()
    choose(child, "7", "yes")
    child.expect("cancelled")
    assert (box.var / "moat/registration.json").exists()
    choose(child, "7", "RESET")
    child.expect("factory reset done; rebooting")
    child.expect(pexpect.EOF)
    assert [p.name for p in box.var.iterdir()] == ["lost+found"]
    assert box.calls_made() == ["var_commit ", "reboot "]


def test_boot_other_slot(child: pexpect.spawn, box: Box) -> None:
    choose(child, "8")
    child.expect("slot b holds no installed system")
    bundle, _ = box.world.publish("1.1.0")
    box.world.install(bundle)
    store = box.world.config.store()
    bootenv.save(store, lambda s: bootenv.BootState(**{**s.__dict__, "trial": "-"}))
    choose(child, "8", "yes")
    child.expect("slot b will boot once on trial")
    child.expect("rebooting")
    child.expect(MENU_PROMPT)
    s = bootenv.load(store).state
    assert (s.good, s.trial, s.tries) == ("a", "b", 1)
    assert box.calls_made() == ["reboot "]


def test_install_from_file(child: pexpect.spawn, box: Box) -> None:
    choose(child, "9", "/nonexistent/update.moat")
    child.expect("no such file")
    bad, _ = box.world.publish("0.5.0")
    choose(child, "9", str(bad))
    child.expect("refused: older version")
    good, _ = box.world.publish("1.1.0")
    choose(child, "9", str(good))
    child.expect("installed 1.1.0 in slot b")
    child.expect("update installed; choose reboot")
    assert box.world.state().trial == "b"


def test_reboot_and_poweroff(child: pexpect.spawn, box: Box) -> None:
    choose(child, "10", "")
    child.expect("cancelled")
    choose(child, "10", "yes")
    child.expect("rebooting")
    choose(child, "11", "yes")
    child.expect("powering off")
    child.expect(MENU_PROMPT)
    assert box.calls_made() == ["reboot ", "poweroff "]


def test_shell_only_with_password(box: Box) -> None:
    c = box.spawn()
    choose(c, "12")
    c.expect("no administrator password is set on this box: no shell")
    (box.tmp / "admin.pw").write_text(json.dumps(hash_password("correct horse")))
    choose(c, "12", "guess1", "guess2", "guess3")
    for _ in range(3):
        c.expect("wrong password")
    c.expect(MENU_PROMPT)
    choose(c, "12", "correct horse")
    c.expect("starting a shell")
    c.sendline("echo SHELL-$((6*7))")
    c.expect("SHELL-42")
    c.sendline("exit")
    c.expect("shell ended")
    c.expect(MENU_PROMPT)
    c.terminate(force=True)


def test_password_hash() -> None:
    record = hash_password("s3cret-pass")
    assert check_password(record, "s3cret-pass")
    assert not check_password(record, "s3cret-pasS")
    assert not check_password({"alg": "md5"}, "x")
    assert "s3cret" not in json.dumps(record)


def test_set_password_verb(box: Box) -> None:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    cmd = [sys.executable, "-m", "moat", "console", "--config", str(box.config)]
    short = subprocess.run(
        [*cmd, "set-password"], input="short\n", capture_output=True, text=True, env=env
    )
    assert short.returncode != 0 and "shorter than 8" in short.stderr
    ok = subprocess.run(
        [*cmd, "set-password"],
        input="long enough pw\n",
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    record = json.loads((box.tmp / "admin.pw").read_text())
    assert check_password(record, "long enough pw")
