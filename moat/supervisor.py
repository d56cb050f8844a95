"""`moat supervise`: start the configured Moat services and keep them up.

Every service is a child `moat VERB ARGS...`, taken from the [services.NAME]
tables of the configuration (/var/moat/moat.toml, else the board default
/etc/moat/moat.toml, else built-in defaults with no services):

    [supervisor]
    ready_after = 2.0          # seconds up before a service counts as ready
    backoff_min = 1.0          # restart delay, doubled per quick failure
    backoff_max = 60.0
    stable_after = 60.0        # a run this long resets the delay
    ready_timeout = 0.0        # > 0: call the timeout hooks if not ready by then
    ready_hooks = []           # "module:function" called once all are ready
    timeout_hooks = []         # "module:function" called on ready_timeout
    log_dir = "/var/log/moat"  # one log per service, rotated by size

    [services.dhcpd]
    verb = "dhcpd"
    args = ["--interface", "private"]
    enabled = true

A verb this build does not have is skipped with a warning. When every
enabled service has been up for ready_after seconds the supervisor prints
"moat ready" on its standard output (the console) and calls the ready hooks
(READY_HOOKS, then ready_hooks from the config) with the Supervisor: this is
where a new slot gets marked good once its services are up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moat.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_PATHS = (Path("/var/moat/moat.toml"), Path("/etc/moat/moat.toml"))
LOG_MAX_BYTES = 256 * 1024
STOP_GRACE = 5.0
READY_LINE = "moat ready"

Hook = Callable[["Supervisor"], None]
# modules append here to be called when the box is ready (or not in time)
READY_HOOKS: list[Hook] = []
TIMEOUT_HOOKS: list[Hook] = []


@dataclass
class ServiceSpec:
    name: str
    verb: str
    args: list[str] = field(default_factory=list)
    enabled: bool = True


@dataclass
class Config:
    ready_after: float = 2.0
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 60.0
    ready_timeout: float = 0.0
    ready_hooks: list[str] = field(default_factory=list)
    timeout_hooks: list[str] = field(default_factory=list)
    log_dir: Path = Path("/var/log/moat")
    program: list[str] = field(default_factory=list)  # default: this moat
    services: list[ServiceSpec] = field(default_factory=list)
    source: str = "built-in defaults"


_NUMBERS = (
    "ready_after",
    "backoff_min",
    "backoff_max",
    "stable_after",
    "ready_timeout",
)
_STRING_LISTS = ("ready_hooks", "timeout_hooks", "program")


def _string_list(value: Any, source: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, where, "must be a list of strings")
    return list(value)


def parse_config(data: dict[str, Any], source: str) -> Config:
    cfg = Config(source=source)
    sup = data.get("supervisor", {})
    if not isinstance(sup, dict):
        raise ConfigError(source, "supervisor", "must be a table")
    for key, value in sup.items():
        where = f"supervisor.{key}"
        if key in _NUMBERS:
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(source, where, "must be a number >= 0")
            setattr(cfg, key, float(value))
        elif key in _STRING_LISTS:
            setattr(cfg, key, _string_list(value, source, where))
        elif key == "log_dir":
            if not isinstance(value, str):
                raise ConfigError(source, where, "must be a path")
            cfg.log_dir = Path(value)
        else:
            raise ConfigError(source, where, "unknown setting")
    if cfg.backoff_min <= 0 or cfg.backoff_max < cfg.backoff_min:
        raise ConfigError(
            source, "supervisor.backoff_max", "must be >= backoff_min > 0"
        )

    services = data.get("services", {})
    if not isinstance(services, dict):
        raise ConfigError(source, "services", "must be a table of tables")
    for name, table in services.items():
        where = f"services.{name}"
        if not isinstance(table, dict):
            raise ConfigError(source, where, "must be a table")
        unknown = set(table) - {"verb", "args", "enabled"}
        if unknown:
            raise ConfigError(source, where, f"unknown keys {sorted(unknown)}")
        verb = table.get("verb", name)
        if not isinstance(verb, str) or not verb:
            raise ConfigError(source, f"{where}.verb", "must be a verb name")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(source, f"{where}.enabled", "must be true or false")
        args = _string_list(table.get("args", []), source, f"{where}.args")
        cfg.services.append(ServiceSpec(name, verb, args, enabled))
    return cfg


def load_config(paths: tuple[Path, ...] = CONFIG_PATHS) -> Config:
    for path in paths:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), "syntax", str(exc)) from exc
        return parse_config(data, str(path))
    return Config()


def next_backoff(delay: float, ran_for: float, cfg: Config) -> float:
    """The delay before the next restart, given the last one and the run."""
    if ran_for >= cfg.stable_after:
        return cfg.backoff_min
    return min(max(delay * 2, cfg.backoff_min), cfg.backoff_max)


def moat_program() -> list[str]:
    """argv prefix that runs this same moat program (frozen or not)."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "moat"]


def resolve_hook(spec: str, source: str) -> Hook:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ConfigError(source, "supervisor hooks", f"{spec!r}: want module:function")
    try:
        hook = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(source, "supervisor hooks", f"{spec!r}: {exc}") from exc
    if not callable(hook):
        raise ConfigError(source, "supervisor hooks", f"{spec!r} is not callable")
    return hook


@dataclass
class ServiceState:
    spec: ServiceSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0  # when a stopped service is started again
    restarts: int = 0
    delay: float = 0.0
    partial: bytes = b""  # output after the last newline

    def up_for(self, now: float) -> float:
        if self.process is None or self.process.returncode is not None:
            return 0.0
        return now - self.started_at


class RotatingLog:
    """A service's output file, renamed to .1 when it passes max_bytes."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, data: bytes) -> None:
        try:
            if self.path.exists() and self.path.stat().st_size > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with open(self.path, "ab") as f:
                f.write(data)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)


class Supervisor:
    """One loop: start due services, copy their output, reap exits, check
    readiness. No asyncio: on the box every import costs start-up time."""

    TICK = 0.2

    def __init__(self, cfg: Config, verbs: set[str], out: Any = None) -> None:
        self.cfg = cfg
        self.out = out if out is not None else sys.stdout
        self.program = cfg.program or moat_program()
        self.services: dict[str, ServiceState] = {}
        for spec in cfg.services:
            if not spec.enabled:
                continue
            if spec.verb not in verbs:
                log.warning(
                    "service %s: no verb %r in this build", spec.name, spec.verb
                )
                continue
            self.services[spec.name] = ServiceState(spec)
        self.logs = {
            name: RotatingLog(cfg.log_dir / f"{name}.log") for name in self.services
        }
        self.ready_hooks = [*READY_HOOKS] + [
            resolve_hook(h, cfg.source) for h in cfg.ready_hooks
        ]
        self.timeout_hooks = [*TIMEOUT_HOOKS] + [
            resolve_hook(h, cfg.source) for h in cfg.timeout_hooks
        ]
        self.ready = False
        self.timed_out = False
        self.stopping = False
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        # on the serial console the recovery menu may have left a prompt
        # without its newline: start a line of our own
        fresh = "\n" if _isatty(self.out) else ""
        print(fresh + text, file=self.out, flush=True)

    def all_ready(self, now: float) -> bool:
        return all(
            s.up_for(now) >= self.cfg.ready_after for s in self.services.values()
        )

    def stop(self, *_: object) -> None:
        self.stopping = True

    def _start(self, state: ServiceState, now: float) -> None:
        spec = state.spec
        argv = [*self.program, spec.verb, *spec.args]
        try:
            state.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            log.error("service %s: cannot start %s: %s", spec.name, argv, exc)
            state.process = None
            self._schedule_restart(state, now, 0.0)
            return
        assert state.process.stdout is not None
        os.set_blocking(state.process.stdout.fileno(), False)
        state.started_at = now
        log.info("service %s started (pid %d)", spec.name, state.process.pid)

    def _schedule_restart(self, state: ServiceState, now: float, ran: float) -> None:
        state.delay = next_backoff(state.delay, ran, self.cfg)
        state.restart_at = now + state.delay
        state.restarts += 1
        log.info("service %s: restart in %.1f s", state.spec.name, state.delay)

    def _drain(self, state: ServiceState) -> bool:
        """Copy available output to the service log; False at end of file."""
        proc = state.process
        if proc is None or proc.stdout is None:
            return False
        try:
            data = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        if data:
            self.logs[state.spec.name].write(data)
            return True
        return False

    def _reap(self, state: ServiceState, now: float) -> None:
        proc = state.process
        if proc is None or proc.poll() is None:
            return
        while self._drain(state):
            pass
        if proc.stdout is not None:
            proc.stdout.close()
        ran = now - state.started_at
        log.warning(
            "service %s exited %d after %.1f s", state.spec.name, proc.returncode, ran
        )
        state.process = None
        self._schedule_restart(state, now, ran)

    def _call(self, hooks: list[Hook], what: str) -> None:
        for hook in hooks:
            try:
                hook(self)
            except Exception:
                log.exception("%s hook %r failed", what, hook)

    def _check_ready(self, now: float) -> None:
        if not self.ready and self.all_ready(now):
            self.ready = True
            took = now - self.started
            log.info("all %d services ready after %.1f s", len(self.services), took)
            self.say(f"{READY_LINE} ({len(self.services)} services)")
            self._call(self.ready_hooks, "ready")
        timeout = self.cfg.ready_timeout
        late = bool(timeout) and now - self.started >= timeout
        if not self.ready and not self.timed_out and late:
            self.timed_out = True
            log.error("services not ready after %.0f s", now - self.started)
            self._call(self.timeout_hooks, "timeout")

    def step(self, now: float) -> None:
        """One turn of the loop (tests call it directly)."""
        for state in self.services.values():
            if state.process is None and now >= state.restart_at:
                self._start(state, now)
        readable = [
            s.process.stdout
            for s in self.services.values()
            if s.process is not None and s.process.stdout is not None
        ]
        if readable:
            ready, _, _ = select.select(readable, [], [], self.TICK)
            for state in self.services.values():
                if state.process is not None and state.process.stdout in ready:
                    self._drain(state)
        else:
            time.sleep(self.TICK)
        now = time.monotonic()
        for state in self.services.values():
            self._reap(state, now)
        self._check_ready(now)

    def _stop_children(self) -> None:
        procs = [s.process for s in self.services.values() if s.process is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        log.info(
            "supervising %d services from %s: %s",
            len(self.services),
            self.cfg.source,
            ", ".join(self.services) or "none",
        )
        while not self.stopping:
            self.step(time.monotonic())
        log.info("stopping")
        self._stop_children()
        return 0


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="configuration file (default: /var, then /etc)"
    )


class RotatingLogHandler(logging.Handler):
    """logging into a RotatingLog (logging.handlers costs imports at boot)."""

    def __init__(self, sink: RotatingLog) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write((self.format(record) + "\n").encode())
        except Exception:
            self.handleError(record)


def _log_to_file(log_dir: Path) -> None:
    try:
        handler = RotatingLogHandler(RotatingLog(log_dir / "supervisor.log"))
    except OSError as exc:
        log.warning("no log file in %s: %s", log_dir, exc)
        return
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))
    for other in root.handlers:
        if other is not handler and other.level == logging.NOTSET:
            other.setLevel(logging.WARNING)  # the console gets warnings only


def run(args: argparse.Namespace) -> int:
    from moat.cli import VERBS

    cfg = load_config((args.config,)) if args.config else load_config()
    if args.config and cfg.source != str(args.config):
        raise ConfigError(str(args.config), "file", "not found")
    _log_to_file(cfg.log_dir)
    return Supervisor(cfg, set(VERBS)).run()
