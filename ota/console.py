"""`moat console`: the recovery menu on the serial port (ttyS0).

Made for a dumb 115200 8N1 terminal: plain numbered lines, no cursor control,
one answer per line. It cannot be killed from the keyboard: SIGINT, SIGQUIT
and SIGTSTP are ignored and the tty's ISIG flag is cleared, so Ctrl-C,
Ctrl-\\ and Ctrl-Z arrive as ordinary (invalid) input. Input is never handed
to a shell: every item is a fixed action with validated arguments, run
without a shell (argv lists). The one exception is item "shell", which starts
a login shell only after the administrator password set at provisioning
(`moat console set-password`, stored as an scrypt hash on /var).

Commands the menu runs come from the "console" table of the ota config
(/usr/lib/moat/ota.json), so tests can point them at harmless stand-ins.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from moat.control import query
from moat.durable import atomic_write
from moat.errors import MoatError
from ota import bootenv
from ota.config import OtaConfig
from services.wan import WAN_PID_FILE, WanSettings, restart_service
from services.wan import save as save_wan

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/usr/lib/moat/ota.json"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
MIN_PASSWORD = 8
PASSWORD_TRIES = 3
LOG_LINES = 30
COMMAND_TIMEOUT = 120.0
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
# the tunnel's control socket (datapath's default; not imported from there:
# the datapath's modules load the crypto libraries)
TUNNEL_SOCKET = "/run/moat/tunnel.sock"
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP)

DEFAULT_COMMANDS: dict[str, list[str]] = {
    "reboot": ["reboot"],
    "poweroff": ["poweroff"],
    "ping": ["ping", "-c", "3", "-W", "2"],
    "register": ["moat", "register", "--now"],
    "var_restore": ["moat", "var", "restore", "--replace"],
    "var_commit": ["moat", "var", "commit"],
    "shell": ["/bin/sh", "-l"],
    "addresses": ["ip", "-o", "-f", "inet", "addr", "show"],
}


class ConsoleError(MoatError):
    pass


# -- administrator password ---------------------------------------------------


def hash_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    import hashlib  # here: OpenSSL's libcrypto is not mapped until needed

    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return {
        "alg": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": salt.hex(),
        "hash": digest.hex(),
    }


def check_password(record: dict[str, Any], password: str) -> bool:
    import hashlib
    import hmac

    try:
        if record.get("alg") != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(record["salt"]),
            n=int(record["n"]),
            r=int(record["r"]),
            p=int(record["p"]),
            dklen=32,
        )
        return hmac.compare_digest(digest.hex(), record["hash"])
    except (KeyError, ValueError, TypeError):
        return False


# -- configuration -------------------------------------------------------------


@dataclass
class ConsoleConfig:
    ota: OtaConfig
    commands: dict[str, list[str]]
    password_file: Path
    wan_file: Path
    wan_pid_file: Path
    tunnel_socket: Path
    log_files: list[Path]
    var_dir: Path
    status_files: dict[str, Path]
    log_file: Path
    service_log_dir: Path

    @classmethod
    def from_ota(cls, ota: OtaConfig) -> ConsoleConfig:
        raw: dict[str, Any] = ota.extra.get("console", {})
        return cls(
            ota=ota,
            commands=DEFAULT_COMMANDS | raw.get("commands", {}),
            password_file=Path(
                raw.get("password_file", "/var/lib/moat/console/admin.pw")
            ),
            wan_file=Path(raw.get("wan_file", "/var/moat/wan.json")),
            wan_pid_file=Path(raw.get("wan_pid_file", WAN_PID_FILE)),
            tunnel_socket=Path(raw.get("tunnel_socket", TUNNEL_SOCKET)),
            log_files=[
                Path(p)
                for p in raw.get(
                    "log_files", ["/var/log/moat/supervisor.log", "/var/log/boot.log"]
                )
            ],
            var_dir=Path(raw.get("var_dir", "/var")),
            log_file=Path(raw.get("log_file", "/var/log/moat/console.log")),
            service_log_dir=Path(raw.get("service_log_dir", "/var/log/moat")),
            status_files={
                k: Path(v)
                for k, v in raw.get(
                    "status_files",
                    {},
                ).items()
            },
        )


# -- the terminal ----------------------------------------------------------------


@contextlib.contextmanager
def unkillable(fd: int) -> Iterator[None]:
    """Ignore the keyboard signals and clear ISIG while the menu runs."""
    old_handlers = {s: signal.signal(s, signal.SIG_IGN) for s in IGNORED_SIGNALS}
    old_attrs = None
    if os.isatty(fd):
        old_attrs = termios.tcgetattr(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ISIG  # lflags: ^C ^\ ^Z become plain characters
        attrs[3] |= termios.ICANON | termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    try:
        yield
    finally:
        if old_attrs is not None:
            termios.tcsetattr(fd, termios.TCSANOW, old_attrs)
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _child_defaults() -> None:
    """In a child (ping, shell): keyboard signals work again."""
    for s in IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_DFL)


class Console:
    def __init__(
        self, cfg: ConsoleConfig, inp: TextIO, out: TextIO, idle_exit: float = 0.0
    ) -> None:
        self.cfg = cfg
        self.idle_exit = idle_exit
        self.inp = inp
        self.out = out
        self.running = True
        self.items: list[tuple[str, Callable[[], None]]] = [
            ("status", self.status),
            ("recent log", self.recent_log),
            ("ping a host", self.ping),
            ("set WAN address (DHCP or static)", self.set_wan),
            ("re-register with the portal now", self.reregister),
            ("restore /var from its backup", self.restore_var),
            ("factory reset (erase /var and its backup)", self.factory_reset),
            ("boot the other slot", self.boot_other_slot),
            ("install an update from a file", self.install_file),
            ("reboot", self.reboot),
            ("power off", self.poweroff),
            ("shell (administrator password)", self.shell),
        ]

    # -- line I/O -------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(text.replace("\n", "\r\n") + "\r\n")
        self.out.flush()

    def ask(self, prompt: str) -> str | None:
        """One line of input, control characters removed; None on EOF."""
        self.out.write(prompt)
        self.out.flush()
        line = self.inp.readline()
        if line == "":
            return None
        if any(ord(c) < 32 and c not in "\r\n\t" for c in line):
            self.say("(control characters ignored)")
        return "".join(c for c in line if c.isprintable()).strip()

    def _input_within(self, prompt: str, seconds: float) -> bool:
        """Show the prompt; True once a line can be read, False after seconds.
        (A terminal in canonical mode hands over one line per read, so nothing
        waits unseen in the stream's buffer.)"""
        import select

        self.out.write(prompt)
        self.out.flush()
        ready, _, _ = select.select([self.inp], [], [], seconds)
        return bool(ready)

    def confirm(self, what: str, word: str = "yes") -> bool:
        answer = self.ask(f"{what} Type '{word}' to go on: ")
        if answer != word:
            self.say("cancelled")
            return False
        return True

    def run_command(
        self, name: str, *extra: str, timeout: float = COMMAND_TIMEOUT
    ) -> int:
        argv = [*self.cfg.commands[name], *extra]
        log.info("console runs %s", argv)
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=_child_defaults,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.say(f"{name}: failed: {exc}")
            return 127
        for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
            self.say(f"  {line}")
        if proc.returncode:
            self.say(f"{name}: exit status {proc.returncode}")
        return proc.returncode

    # -- menu -------------------------------------------------------------------

    def menu(self) -> None:
        self.say()
        self.say(
            f"Moat recovery console - {self.cfg.ota.product} {self.cfg.ota.version}"
        )
        for n, (label, _) in enumerate(self.items, 1):
            self.say(f"{n:2d}) {label}")

    def loop(self) -> None:
        self.menu()
        eofs = 0
        while self.running:
            prompt = f"Choose 1-{len(self.items)} (Enter: menu): "
            if self.idle_exit and not self._input_within(prompt, self.idle_exit):
                self.say()
                self.say("no input for a while: the menu closes")
                return
            choice = self.ask("" if self.idle_exit else prompt)
            if choice is None:
                eofs += 1
                if eofs >= 3 and not os.isatty(self.inp.fileno()):
                    return  # the other end is gone; init starts us again
                time.sleep(0.2)
                continue
            eofs = 0
            if choice == "":
                self.menu()
                continue
            if not choice.isdigit() or not 1 <= int(choice) <= len(self.items):
                self.say(f"'{choice[:20]}' is not a menu number")
                continue
            label, action = self.items[int(choice) - 1]
            self.say(f"-- {label}")
            try:
                action()
            except (MoatError, OSError, bootenv.BootEnvError, ValueError) as exc:
                self.say(f"failed: {exc}")
                log.warning("console %s failed: %s", label, exc)

    # -- items -----------------------------------------------------------------

    def status(self) -> None:
        from ota.cli import status_lines  # light: no TUF client

        for line in status_lines(self.cfg.ota):
            self.say(line)
        self.say("addresses:")
        self.run_command("addresses", timeout=10)
        self.say(f"tunnel: {tunnel_summary(self.cfg.tunnel_socket)}")
        self.say("services (last line of each log):")
        for line in service_lines(self.cfg.service_log_dir):
            self.say(f"  {line}")
        for name, path in self.cfg.status_files.items():
            try:
                text = path.read_text().strip() or "(empty)"
            except OSError:
                text = "unknown (no status file)"
            self.say(f"{name}: {text}")

    def recent_log(self) -> None:
        for path in self.cfg.log_files:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            self.say(f"last {LOG_LINES} lines of {path}:")
            for line in lines[-LOG_LINES:]:
                self.say(f"  {line[:200]}")
            return
        self.say("no log file found")

    def ping(self) -> None:
        host = self.ask("host or address to ping: ")
        if not host or not _valid_host(host):
            self.say("not a host name or address")
            return
        self.run_command("ping", host, timeout=30)

    def set_wan(self) -> None:
        mode = self.ask("WAN by 1) DHCP or 2) static address? ")
        if mode == "1":
            settings = WanSettings("dhcp")
        elif mode == "2":
            addr = self.ask("address/prefix (e.g. 192.0.2.10/24): ") or ""
            gw = self.ask("gateway: ") or ""
            dns = self.ask("DNS server (Enter: none): ") or ""
            try:
                settings = WanSettings.static(addr, gw, dns)
            except ValueError as exc:
                self.say(f"not saved: {exc}")
                return
        else:
            self.say("not saved: answer 1 or 2")
            return
        save_wan(self.cfg.wan_file, settings)
        self.say(f"saved to {self.cfg.wan_file}: {settings.to_json()}")
        self.restart_wan()

    def restart_wan(self) -> None:
        if restart_service(self.cfg.wan_pid_file):
            self.say("the WAN service restarts with these settings")
        else:
            self.say("the WAN service is not running; it uses them when it starts")

    def reregister(self) -> None:
        self.run_command("register")

    def restore_var(self) -> None:
        if not self.confirm(
            "Replace /var with its last backup (changes since are lost)."
        ):
            return
        if self.run_command("var_restore") == 0:
            self.say("/var restored from its backup")

    def factory_reset(self) -> None:
        if not self.confirm(
            "Erase /var and its backup (registration, settings, password), then "
            "reboot.",
            "RESET",
        ):
            return
        removed = 0
        for child in self.cfg.var_dir.iterdir():
            if child.name == "lost+found":
                continue
            _remove(child)
            removed += 1
        os.sync()
        self.say(f"/var erased ({removed} entries); committing the empty backup")
        self.run_command("var_commit")
        self.say("factory reset done; rebooting")
        self.run_command("reboot")
        self.running = False

    def boot_other_slot(self) -> None:
        store = self.cfg.ota.store()
        state = bootenv.load(store).state
        running = self.cfg.ota.running()
        other = bootenv.other_slot(running)
        version = state.versions.get(other, bootenv.NO_SLOT)
        if version == bootenv.NO_SLOT:
            self.say(f"slot {other} holds no installed system; not switching")
            return
        if not self.confirm(f"Boot slot {other} ({version}) on trial, then reboot."):
            return
        bootenv.save(store, lambda s: replace(s, trial=other, tries=1))
        self.say(
            f"slot {other} will boot once on trial; it stays only if it proves "
            f"itself, otherwise slot {state.good} boots again"
        )
        self.reboot(confirmed=True)

    def install_file(self) -> None:
        path = self.ask("path of the update bundle (e.g. /mnt/usb/update.moat): ")
        if not path:
            self.say("no file given")
            return
        bundle = Path(path)
        if not bundle.is_file():
            self.say(f"{bundle}: no such file")
            return
        # the TUF client is imported only here: it costs the box seconds and
        # megabytes the menu does not otherwise need
        from ota.client import Installer, OtaRefused, Source

        try:
            Installer(self.cfg.ota, say=self.say).install(Source(None, bundle))
        except OtaRefused as exc:
            self.say(str(exc))
            return
        self.say("update installed; choose reboot to start it")

    def reboot(self, confirmed: bool = False) -> None:
        if confirmed or self.confirm("Reboot the box."):
            self.say("rebooting")
            self.run_command("reboot")

    def poweroff(self) -> None:
        if self.confirm("Power the box off (someone must switch it on again)."):
            self.say("powering off")
            self.run_command("poweroff")

    def shell(self) -> None:
        try:
            record = json.loads(self.cfg.password_file.read_text())
        except (OSError, ValueError):
            self.say("no administrator password is set on this box: no shell")
            return
        for _ in range(PASSWORD_TRIES):
            password = self._read_secret("administrator password: ")
            if password is not None and check_password(record, password):
                break
            time.sleep(1)
            self.say("wrong password")
        else:
            log.warning(
                "console: shell refused after %d wrong passwords", PASSWORD_TRIES
            )
            return
        log.warning("console: administrator shell started")
        self.say("starting a shell; exit it to come back to the menu")
        subprocess.run(
            self.cfg.commands["shell"], preexec_fn=_child_defaults, check=False
        )
        self.say("shell ended")

    def _read_secret(self, prompt: str) -> str | None:
        fd = self.inp.fileno()
        if not os.isatty(fd):
            return self.ask(prompt)
        old = termios.tcgetattr(fd)
        new = termios.tcgetattr(fd)
        new[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, new)
        try:
            return self.ask(prompt)
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, old)
            self.say()


def tunnel_summary(control_socket: Path) -> str:
    """One line from the running tunnel's control socket."""
    try:
        status = query(str(control_socket))
    except (OSError, ValueError) as exc:
        return f"not running ({exc})"
    peers = status.get("peers", {})
    words = [
        f"{name} {p.get('endpoint')} rx {p.get('rx_packets', 0)} "
        f"tx {p.get('tx_packets', 0)}"
        for name, p in peers.items()
    ]
    return f"up {status.get('uptime', '?')} s; " + ("; ".join(words) or "no peers")


def service_lines(log_dir: Path) -> list[str]:
    """Each supervised service's name and the last line it logged."""
    lines = []
    for path in sorted(log_dir.glob("*.log")):
        if path.stem in ("console", "supervisor"):
            continue
        try:
            last = (path.read_text(errors="replace").strip().splitlines() or [""])[-1]
        except OSError:
            continue
        lines.append(f"{path.stem}: {last[:120]}")
    return lines or ["(no service logs)"]


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(HOSTNAME_RE.fullmatch(host)) and not host.startswith("-")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


# -- verb ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("MOAT_OTA_CONFIG", DEFAULT_CONFIG)),
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="leave the menu after this long without input (0: never); init "
        "then waits for Enter again without a Python process in memory",
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=["menu", "set-password", "apply-wan"],
        default="menu",
        help="menu (default); set-password: at provisioning (reads stdin "
        "twice, or once when not a tty); apply-wan: restart the WAN service, "
        "which reads the saved WAN settings",
    )


def run(args: argparse.Namespace) -> int:
    cfg = ConsoleConfig.from_ota(OtaConfig.load(args.config))
    if args.action == "set-password":
        return _set_password(cfg)
    if args.action == "apply-wan":
        Console(cfg, sys.stdin, sys.stdout).restart_wan()
        return 0
    _log_to_file(cfg.log_file)
    with unkillable(sys.stdin.fileno()):
        try:
            Console(cfg, sys.stdin, sys.stdout, idle_exit=args.idle_exit).loop()
        except OSError as exc:  # the line went away (hang-up, EIO)
            log.warning("console output failed: %s; exiting for init to restart", exc)
            return 1
    return 0


def _log_to_file(path: Path) -> None:
    """Keep log lines off the menu: the terminal shows only what `say` writes."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            root.removeHandler(handler)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError:
        return
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)


def _set_password(cfg: ConsoleConfig) -> int:
    if sys.stdin.isatty():
        first = getpass.getpass("new administrator password: ")
        if getpass.getpass("again: ") != first:
            raise ConsoleError("the two passwords differ; nothing changed")
    else:
        first = sys.stdin.readline().rstrip("\n")
    if len(first) < MIN_PASSWORD:
        raise ConsoleError(f"password shorter than {MIN_PASSWORD} characters")
    cfg.password_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(
        cfg.password_file, json.dumps(hash_password(first)).encode(), mode=0o600
    )
    print(f"administrator password set ({cfg.password_file})")
    return 0
