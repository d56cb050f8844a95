"""The supervisor's hooks that prove a new slot (or give up on it).

moat.toml on the box:

    [supervisor]
    ready_timeout = 240                     # services not ready by then: give up
    ready_hooks = ["ota.supervise:on_ready"]
    timeout_hooks = ["ota.supervise:on_timeout"]

`on_ready` (every enabled service up) starts a small thread that feeds
`ota.prove.ProveHook` every TICK seconds with the services' state and, when a
`tunnel` service is configured, whether the tunnel has carried packets from
the portal; the hook marks the slot good or reboots. `on_timeout` gives up at
once on a slot on trial: the supervisor already waited ready_timeout. Both
also report, at the first call, a fall-back GRUB made at this boot.

Only the light modules are imported here (ota.config, ota.bootenv,
ota.prove): no TUF client, no `cryptography`. The supervisor lives for the
whole uptime of a 128 MiB box; see tests/test_ota_supervise.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from ota.config import OtaConfig, record_failed
from ota.prove import DEFAULT_DEADLINE, DEFAULT_SETTLE, Action, ProveHook

log = logging.getLogger(__name__)

TICK = 2.0
CONFIG = Path(os.environ.get("MOAT_OTA_CONFIG", "/usr/lib/moat/ota.json"))

_lock = threading.Lock()
_hook: ProveHook | None = None
_thread: threading.Thread | None = None


def _tunnel_configured(sup: Any) -> bool:
    return any(s.spec.verb == "tunnel" for s in getattr(sup, "services", {}).values())


def tunnel_up() -> bool:
    """The running tunnel has received authenticated packets from a peer."""
    try:
        from datapath.cli import query
        from datapath.config import DEFAULT_CONTROL_SOCKET

        status = query(DEFAULT_CONTROL_SOCKET)
        return any(p.get("rx_packets", 0) > 0 for p in status.get("peers", {}).values())
    except (ImportError, OSError, ValueError, AttributeError):
        return False


def _make_hook(sup: Any, cfg: OtaConfig) -> ProveHook:
    commands = cfg.extra.get("console", {}).get("commands", {})
    reboot_cmd = commands.get("reboot", ["reboot"])

    def say(text: str) -> None:
        sup.say(text)

    def reboot() -> None:
        log.warning("ota: rebooting (%s)", reboot_cmd)
        subprocess.run(reboot_cmd, check=False)

    return ProveHook(
        cfg.store(),
        cfg.running(),
        say,
        reboot,
        lambda version: record_failed(cfg.state_dir, version),
        deadline=float(cfg.extra.get("prove_deadline", DEFAULT_DEADLINE)),
        settle=float(cfg.extra.get("prove_settle", DEFAULT_SETTLE)),
    )


def _ensure(sup: Any) -> ProveHook | None:
    global _hook
    with _lock:
        if _hook is None:
            try:
                cfg = OtaConfig.load(CONFIG)
                _hook = _make_hook(sup, cfg)
                _hook.start(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - never take the supervisor down
                log.error("ota: cannot prove this slot: %s", exc)
                sup.say(f"ota: cannot check this slot: {exc}")
                return None
        return _hook


def _run(sup: Any, hook: ProveHook) -> None:
    with_tunnel = _tunnel_configured(sup)
    while True:
        now = time.monotonic()
        services = bool(sup.all_ready(now))
        action = hook.tick(now, services, tunnel_up() if with_tunnel else None)
        if action is not Action.NONE or hook.prover is None or hook.prover.done:
            return
        time.sleep(TICK)


def on_ready(sup: Any) -> None:
    global _thread
    hook = _ensure(sup)
    if hook is None or hook.prover is None or hook.prover.done:
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(
                target=_run, args=(sup, hook), name="ota-prove", daemon=True
            )
            _thread.start()


def on_timeout(sup: Any) -> None:
    hook = _ensure(sup)
    if hook is None or hook.prover is None or hook.prover.done:
        return
    hook.prover.expire(time.monotonic())
    hook.tick(time.monotonic(), False, None)


def reset() -> None:
    """Forget state (tests)."""
    global _hook, _thread
    with _lock:
        _hook, _thread = None, None
