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
daemon with SIGUSR1 or registers once if none runs), the schedule (every
`interval` seconds, default hourly, or sooner if the portal says so), and
the running tunnel itself: every STATUS_POLL seconds the daemon reads the
tunnel's status from its control socket and registers early when an SA
nears its sequence-number limit (the outbound SA's `needs_rekey`, set by
its soft limit or `[register] rekey_packets`; the inbound SA past the soft
limit of its sequence space) or when nothing came from the portal for
`no_answer_after` seconds (default 30, doubling while it does not help)
while the moat kept sending (the portal lost the SA's state: a crash, a
restore). Registration is make-before-break: the tunnel keeps the old SAs
until the new ones carry traffic. Failures are retried with exponential
backoff and jitter.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapath.config import DEFAULT_MTU_POLICY, MTU_POLICIES
from datapath.esp import ESN_SEQ_LIMIT, SEQ_LIMIT, SOFT_LIMIT_MARGIN
from datapath.loop import query
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
TUNNEL_REKEY_GRACE = 2.0
STATUS_POLL = 5.0  # seconds between looks at the running tunnel's status
NO_ANSWER_AFTER = 30.0  # sending, but nothing from the portal for this long
EARLY_MIN_INTERVAL = 10.0  # seconds between two early (status-driven) registrations
# curve25519 first: ~20 ms of CPU per registration instead of ~140 ms
DEFAULT_KEX = "curve25519-sha256,sntrup761x25519-sha512@openssh.com"
KEX_PATTERN = re.compile(r"[a-z0-9@.-]+(,[a-z0-9@.-]+)*\Z")
MOAT_ARGV = (
    [sys.executable, "-m", "moat"]
    if not getattr(sys, "frozen", False)
    else [sys.executable]
)


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
    state_file: Path
    tun: str
    tunnel_control: Path
    rekey_packets: int = 0  # 0: the SA's own soft limit
    kex: str = DEFAULT_KEX
    no_answer_after: int = int(NO_ANSWER_AFTER)


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

    def kex() -> str:
        value = text("kex", DEFAULT_KEX)
        if not KEX_PATTERN.match(value):
            raise ConfigError(str(path), "register.kex", "algorithm names, commas")
        return value

    def number(key: str, default: int) -> int:
        value = reg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(str(path), f"register.{key}", "must be > 0")
        return value

    tunnel_pid = reg.get("tunnel_pidfile")
    rekey_packets = reg.get("rekey_packets", 0)
    if (
        isinstance(rekey_packets, bool)
        or not isinstance(rekey_packets, int)
        or rekey_packets < 0
    ):
        raise ConfigError(str(path), "register.rekey_packets", "must be >= 0")
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
        state_file=base / text("state_file", "registration.json"),
        tun=text("tun", "moat0"),
        tunnel_control=base / text("tunnel_control", "tunnel.sock"),
        rekey_packets=rekey_packets,
        kex=kex(),
        no_answer_after=number("no_answer_after", int(NO_ANSWER_AFTER)),
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
        "-o", f"KexAlgorithms={cfg.kex}",  # the portal's order (portal.toml)
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
        state = json.loads(cfg.state_file.read_text())
    except (OSError, ValueError):
        return None
    gen = state.get("generation") if isinstance(state, dict) else None
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
        if answer["portal"].get("mtu_policy", DEFAULT_MTU_POLICY) not in MTU_POLICIES:
            raise ValueError("unknown mtu_policy")
        if not answer["networks"]:
            raise ValueError("no networks behind the portal")
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
    log.info(
        "registered %s from %s: generation %s",
        cfg.id,
        answer.get("seen", {}).get("address"),
        answer["generation"],
    )
    return answer


def tunnel_config_text(cfg: MoatConfig, answer: dict[str, Any]) -> str:
    """A `moat tunnel` configuration (datapath/config.py) from the answer.

    The outer socket is bound to the wildcard address: the wild-side address
    changes with DHCP while the tunnel keeps running. A short rekey grace:
    the moat switches to the new outbound SA soon after a registration, the
    portal follows as soon as it sees that SA used (make-before-break).
    """
    portal = answer["portal"]
    networks = ", ".join(f'"{ipaddress.IPv4Network(n)}"' for n in answer["networks"])
    subnet = ipaddress.IPv4Network(answer["subnet"])

    def sa_table(name: str, sa: dict[str, Any]) -> list[str]:
        return [
            f"[sa.{name}]",
            f"spi = {int(sa['spi'])}",
            f'transform = "{sa["transform"]}"',
            f'key = "{bytes.fromhex(sa["key"]).hex()}"',
            "",
        ]

    lines = [
        f"# written by `moat register` (generation {int(answer['generation'])})",
        "[tunnel]",
        'name = "portal"',
        f'encapsulation = "{portal["encapsulation"]}"',
        f'mtu_policy = "{portal.get("mtu_policy", DEFAULT_MTU_POLICY)}"',
        f"rekey_grace = {TUNNEL_REKEY_GRACE}",
        f"rekey_packets = {cfg.rekey_packets}",
        f'control_socket = "{cfg.tunnel_control}"',
        "",
        "[tun]",
        f'name = "{cfg.tun}"',
        f"routes = [{networks}]",
        "",
        "[outer]",
        'local = "0.0.0.0"',
        f'remote = "{ipaddress.IPv4Address(portal["address"])}"',
        f"port = {int(portal['port'])}",
        f"remote_port = {int(portal['port'])}",
        "",
        "[selectors]",
        f'local = ["{subnet}"]',
        f"remote = [{networks}]",
        "",
    ]
    lines += sa_table("in", answer["sa_in"])
    lines += sa_table("out", answer["sa_out"])
    return "\n".join(lines)


def write_tunnel_config(cfg: MoatConfig, answer: dict[str, Any]) -> None:
    atomic_write_text(cfg.tunnel_config, tunnel_config_text(cfg, answer), 0o600)
    state = {
        "generation": int(answer["generation"]),
        "address": answer.get("seen", {}).get("address"),
        "registered": time.time(),
        "rekey_after": int(answer.get("rekey_after", DEFAULT_INTERVAL)),
    }
    atomic_write_text(cfg.state_file, json.dumps(state) + "\n")


def signal_tunnel(
    cfg: MoatConfig, tunnel: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGHUP the tunnel: our child, else the pid in tunnel_pidfile."""
    try:
        if tunnel is not None:
            tunnel.send_signal(signal.SIGHUP)
            return
        if cfg.tunnel_pidfile is None:
            return
        pid = int(cfg.tunnel_pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as exc:
        log.warning("could not tell the tunnel to reload: %s", exc)


def soft_limit(esn: bool) -> int:
    """The sequence number at which an SA should be replaced (as OutboundSA)."""
    limit = ESN_SEQ_LIMIT if esn else SEQ_LIMIT
    return limit - int(limit * SOFT_LIMIT_MARGIN)


def rekey_reason(status: dict[str, Any]) -> str | None:
    """Why the tunnel's SAs should be replaced now, from its status, or None.

    Outbound: the tunnel's own `needs_rekey` (its soft limit, or
    `rekey_packets`). Inbound: the portal's sequence numbers on our current
    inbound SA passed the soft limit of the sequence space (the portal cannot
    start a registration, so the moat does); `rekey_packets` does not apply
    there: the portal's numbers jump ahead by a reservation block after each
    of its restarts. A rekey already under way (new outbound SA pending) is
    left to finish.
    """
    for name, peer in status.get("peers", {}).items():
        if peer.get("pending_out_spi"):
            continue
        out = peer.get("out_sa", {})
        if out.get("needs_rekey"):
            return (
                f"{name}: outbound SA {out.get('spi', 0):#x} needs rekeying"
                f" (sequence {out.get('seq')})"
            )
        for sa in peer.get("in_sas", []):
            if not sa.get("current"):
                continue
            highest = int(sa.get("highest_seq", 0))
            if highest >= soft_limit(bool(sa.get("esn", True))):
                return (
                    f"{name}: inbound SA {sa.get('spi', 0):#x} near its limit"
                    f" (sequence {highest})"
                )
    return None


class TunnelWatch:
    """Reads the running tunnel's status; says when to register early."""

    def __init__(self, cfg: MoatConfig) -> None:
        self.cfg = cfg
        self.next_poll = 0.0
        self.last_early = -EARLY_MIN_INTERVAL
        # (tx_bytes, rx_packets) when the portal was last heard, and when
        self.heard: tuple[int, int, float] | None = None
        # silence that triggers a registration; doubles while it does not help
        self.silence_limit = float(cfg.no_answer_after)

    def registered(self) -> None:
        self.heard = None  # new SAs: the clock starts again

    def check(self, now: float) -> str | None:
        """A reason to register now, or None; polls every STATUS_POLL s."""
        if now < self.next_poll:
            return None
        self.next_poll = now + STATUS_POLL
        try:
            status = query(str(self.cfg.tunnel_control))
        except (OSError, ValueError) as exc:
            log.debug("tunnel status unavailable: %s", exc)
            return None
        reason = rekey_reason(status) or self._silent(status, now)
        if reason is None or now - self.last_early < EARLY_MIN_INTERVAL:
            return None
        self.last_early = now
        return reason

    def _silent(self, status: dict[str, Any], now: float) -> str | None:
        """The moat kept sending for `no_answer_after` s and nothing came back:
        the portal may have lost the SA's state (a crash, a restored backup)."""
        peers = list(status.get("peers", {}).values())
        if len(peers) != 1:
            return None
        tx, rx = int(peers[0].get("tx_bytes", 0)), int(peers[0].get("rx_packets", 0))
        if self.heard is None or rx != self.heard[1] or tx < self.heard[0]:
            if self.heard is not None and rx != self.heard[1]:
                self.silence_limit = float(self.cfg.no_answer_after)  # answered
            self.heard = (tx, rx, now)
            return None
        silent = now - self.heard[2]
        if tx > self.heard[0] and silent >= self.silence_limit:
            # one-way traffic that no registration cures: ask less often
            self.silence_limit = min(2 * self.silence_limit, DEFAULT_INTERVAL)
            self.heard = (tx, rx, now)
            return f"no packet from the portal for {silent:.0f}s while sending"
        return None


def backoff(failures: int, rng: random.Random) -> float:
    """2, 4, 8 ... 300 s, each with up to 25 % jitter (no synchronised storm)."""
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** max(0, failures - 1)))
    return delay * (0.75 + rng.random() * 0.25)


class TunnelChild:
    """`moat tunnel` as our child: started after the first registration,
    told about new SAs with SIGHUP, restarted if it dies."""

    def __init__(self, cfg: MoatConfig) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None

    def registered(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_tunnel(self.cfg, self.proc)
            return
        argv = [*MOAT_ARGV, "tunnel", "--config", str(self.cfg.tunnel_config)]
        self.proc = subprocess.Popen(argv)
        log.info("tunnel started (pid %d)", self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_daemon(
    cfg: MoatConfig, stop: threading.Event | None = None, start_tunnel: bool = True
) -> int:
    """Register now, then on schedule or when woken; never gives up."""
    wake = threading.Event()
    stop = stop or threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: wake.set())

    def on_term(*_: object) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_term)
    atomic_write_text(cfg.pidfile, f"{os.getpid()}\n")
    tunnel = TunnelChild(cfg) if start_tunnel else None
    watch = TunnelWatch(cfg)
    rng = random.Random()
    failures = 0
    try:
        while not stop.is_set():
            try:
                answer = register_once(cfg)
                failures = 0
                watch.registered()
                if tunnel is not None:
                    tunnel.registered()
                else:
                    signal_tunnel(cfg)
                rekey_after = int(answer.get("rekey_after", cfg.interval))
                delay = float(min(cfg.interval, rekey_after))
            except RegistrationFailed as exc:
                failures += 1
                delay = backoff(failures, rng)
                log.warning(
                    "registration failed (%d): %s; retry in %.0fs", failures, exc, delay
                )
            # wake early: DHCP hook (SIGUSR1), or the tunnel died
            deadline = time.monotonic() + delay
            while not stop.is_set() and not wake.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if (
                    tunnel is not None
                    and tunnel.proc is not None
                    and not tunnel.alive()
                ):
                    log.warning(
                        "tunnel exited (%s); registering again", tunnel.proc.returncode
                    )
                    tunnel.proc = None
                    break
                if failures == 0 and (reason := watch.check(time.monotonic())):
                    log.info("registering early: %s", reason)
                    break
                wake.wait(min(left, 1.0))
            wake.clear()
    finally:
        if tunnel is not None:
            tunnel.stop()
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
    parser.add_argument(
        "--no-tunnel",
        action="store_true",
        help="with --daemon: do not run `moat tunnel` (signal tunnel_pidfile instead)",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.daemon:
        return run_daemon(cfg, start_tunnel=not args.no_tunnel)
    if args.now and wake_daemon(cfg):
        print("register daemon woken")
        return 0
    answer = register_once(cfg)
    signal_tunnel(cfg)
    print(
        f"registered {answer['moat']} from {answer.get('seen', {}).get('address')}:"
        f" generation {answer['generation']}, portal {answer['portal']['address']}"
    )
    return 0
