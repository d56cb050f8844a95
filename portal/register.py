"""`moat register`: the moat tells the portal where it is and gets new keys.

The moat runs the system OpenSSH client with its own key and the portal's
pinned host key (StrictHostKeyChecking=yes, no other known_hosts, no user
config, no agent). The portal learns the moat's address from the connection
itself and answers with a JSON document holding the next SA generation and
the portal's tunnel endpoint; this program writes the tunnel configuration
atomically and tells the running tunnel to swap SAs (SIGHUP to the pid in
the tunnel's pid file).

Triggers: boot (`moat register --daemon` starts with a registration), the
DHCP client's address-change hook (`moat register --now`, which wakes the
daemon with SIGUSR1 or registers once if none runs), and the schedule
(every `interval` seconds, default hourly, or sooner if the portal says so).
Failures are retried with exponential backoff and jitter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moat.durable import atomic_write_text
from moat.errors import ConfigError, MoatError

log = logging.getLogger(__name__)

SSH_BINARY = "ssh"
SSH_TIMEOUT = 60.0
CONNECT_TIMEOUT = 15
BACKOFF_FIRST = 2.0
BACKOFF_MAX = 300.0
DEFAULT_INTERVAL = 3600
PROTOCOL_VERSION = 1


class RegistrationFailed(MoatError):
    pass


@dataclass(frozen=True)
class MoatConfig:
    source: Path
    id: str
    portal: str
    port: int
    user: str
    identity: Path
    known_hosts: Path
    tunnel_config: Path
    interval: int
    tunnel_pidfile: Path | None
    pidfile: Path


def load_config(path: str | Path) -> MoatConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), "file", "missing") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "file", f"not valid TOML: {exc}") from None
    reg = doc.get("register")
    if not isinstance(reg, dict):
        raise ConfigError(str(path), "register", "missing table")
    base = path.parent

    def text(key: str, default: str | None = None) -> str:
        value = reg.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(str(path), f"register.{key}", "must be a string")
        return value

    def number(key: str, default: int) -> int:
        value = reg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(str(path), f"register.{key}", "must be > 0")
        return value

    tunnel_pid = reg.get("tunnel_pidfile")
    return MoatConfig(
        source=path,
        id=text("id"),
        portal=text("portal"),
        port=number("port", 22),
        user=text("user", "moat"),
        identity=base / text("identity", "id_ed25519"),
        known_hosts=base / text("known_hosts", "known_hosts"),
        tunnel_config=base / text("tunnel_config", "tunnel.toml"),
        interval=number("interval", DEFAULT_INTERVAL),
        tunnel_pidfile=base / tunnel_pid if isinstance(tunnel_pid, str) else None,
        pidfile=base / text("pidfile", "register.pid"),
    )


def ssh_argv(cfg: MoatConfig, generation: int | None) -> list[str]:
    command = f"register proto={PROTOCOL_VERSION}"
    if generation is not None:
        command += f" generation={generation}"
    return [
        SSH_BINARY,
        "-F", "/dev/null",  # no user or system config can weaken the options
        "-i", str(cfg.identity),
        "-p", str(cfg.port),
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={cfg.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        "-o", "ServerAliveInterval=10",
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
        "-T",
        f"{cfg.user}@{cfg.portal}",
        command,
    ]  # fmt: skip


def current_generation(cfg: MoatConfig) -> int | None:
    try:
        doc = tomllib.loads(cfg.tunnel_config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    gen = doc.get("generation")
    return gen if isinstance(gen, int) and not isinstance(gen, bool) else None


def parse_answer(stdout: str) -> dict[str, Any]:
    """The portal's JSON answer, checked for the fields the tunnel needs."""
    try:
        answer = json.loads(stdout)
    except ValueError:
        raise RegistrationFailed("portal answer is not JSON") from None
    if not isinstance(answer, dict):
        raise RegistrationFailed("portal answer is not an object")
    if not answer.get("ok"):
        raise RegistrationFailed(f"refused by the portal: {answer.get('error')}")
    try:
        for direction in ("sa_in", "sa_out"):
            sa = answer[direction]
            int(sa["spi"])
            bytes.fromhex(sa["key"])
            str(sa["transform"])
        str(answer["portal"]["address"])
        int(answer["portal"]["port"])
        int(answer["generation"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistrationFailed(f"portal answer incomplete: {exc}") from None
    return answer


def register_once(cfg: MoatConfig) -> dict[str, Any]:
    """One registration: ssh, check the answer, rewrite the tunnel config."""
    argv = ssh_argv(cfg, current_generation(cfg))
    try:
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=SSH_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise RegistrationFailed(f"{SSH_BINARY} not found") from None
    except subprocess.TimeoutExpired:
        raise RegistrationFailed(f"ssh timed out after {SSH_TIMEOUT:.0f}s") from None
    if res.returncode == 255:
        raise RegistrationFailed(f"ssh: {res.stderr.strip() or 'connection failed'}")
    try:
        answer = parse_answer(res.stdout)
    except RegistrationFailed as exc:
        detail = res.stderr.strip().splitlines()[-1:] if res.stderr else []
        raise RegistrationFailed(
            f"{exc}{': ' if detail else ''}{''.join(detail)}"
        ) from None
    write_tunnel_config(cfg, answer)
    signal_tunnel(cfg)
    log.info(
        "registered %s from %s: generation %s",
        cfg.id,
        answer.get("seen", {}).get("address"),
        answer["generation"],
    )
    return answer


def tunnel_config_text(answer: dict[str, Any], previous: str | None) -> str:
    """The tunnel's SA file: the answer as TOML, the last inbound SA kept.

    Keeping the previous inbound SA lets packets the portal sealed before it
    switched still arrive (make-before-break).
    """

    def sa_table(name: str, sa: dict[str, Any]) -> list[str]:
        return [
            f"[{name}]",
            f"spi = {int(sa['spi'])}",
            f'transform = "{sa["transform"]}"',
            f'key = "{bytes.fromhex(sa["key"]).hex()}"',
            "",
        ]

    portal = answer["portal"]
    lines = [
        "# written by `moat register`; replaced at every registration",
        f"generation = {int(answer['generation'])}",
        f'moat = "{answer["moat"]}"',
        f'remote = "{portal["address"]}"',
        f"remote_port = {int(portal['port'])}",
        f'encapsulation = "{portal["encapsulation"]}"',
        f'subnet = "{answer["subnet"]}"',
        "networks = [" + ", ".join(f'"{n}"' for n in answer["networks"]) + "]",
        f"rekey_after = {int(answer.get('rekey_after', DEFAULT_INTERVAL))}",
        "",
    ]
    lines += sa_table("sa_in", answer["sa_in"])
    lines += sa_table("sa_out", answer["sa_out"])
    if previous:
        lines += sa_table("sa_in_previous", json.loads(previous))
    return "\n".join(lines)


def write_tunnel_config(cfg: MoatConfig, answer: dict[str, Any]) -> None:
    previous = None
    try:
        old = tomllib.loads(cfg.tunnel_config.read_text())
        if isinstance(old.get("sa_in"), dict):
            previous = json.dumps(old["sa_in"])
    except (OSError, tomllib.TOMLDecodeError):
        pass
    atomic_write_text(cfg.tunnel_config, tunnel_config_text(answer, previous), 0o600)


def signal_tunnel(cfg: MoatConfig) -> None:
    if cfg.tunnel_pidfile is None:
        return
    try:
        pid = int(cfg.tunnel_pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as exc:
        log.warning(
            "could not tell the tunnel to reload (%s): %s", cfg.tunnel_pidfile, exc
        )


def backoff(failures: int, rng: random.Random) -> float:
    """2, 4, 8 ... 300 s, each with up to 25 % jitter (no synchronised storm)."""
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** max(0, failures - 1)))
    return delay * (0.75 + rng.random() * 0.25)


def run_daemon(cfg: MoatConfig, stop: threading.Event | None = None) -> int:
    """Register now, then on schedule or when woken; never gives up."""
    wake = threading.Event()
    stop = stop or threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: wake.set())

    def on_term(*_: object) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_term)
    atomic_write_text(cfg.pidfile, f"{os.getpid()}\n")
    rng = random.Random()
    failures = 0
    try:
        while not stop.is_set():
            try:
                answer = register_once(cfg)
                failures = 0
                delay = float(
                    min(cfg.interval, int(answer.get("rekey_after", cfg.interval)))
                )
            except RegistrationFailed as exc:
                failures += 1
                delay = backoff(failures, rng)
                log.warning(
                    "registration failed (%d): %s; retry in %.0fs", failures, exc, delay
                )
            wake.wait(delay)
            wake.clear()
    finally:
        cfg.pidfile.unlink(missing_ok=True)
    return 0


def wake_daemon(cfg: MoatConfig) -> bool:
    try:
        pid = int(cfg.pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError, IndexError):
        return False
    return True


# --- the verb ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="/var/moat/moat.toml", help="the moat's config file"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--daemon", action="store_true", help="register now, then on schedule"
    )
    mode.add_argument(
        "--now",
        action="store_true",
        help="wake the running daemon (address changed), or register once",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.daemon:
        return run_daemon(cfg)
    if args.now and wake_daemon(cfg):
        print("register daemon woken")
        return 0
    answer = register_once(cfg)
    print(
        f"registered {answer['moat']} from {answer.get('seen', {}).get('address')}:"
        f" generation {answer['generation']}, portal {answer['portal']['address']}"
    )
    return 0
