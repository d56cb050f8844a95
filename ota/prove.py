"""Prove-or-fall-back: a slot on trial must show it works, or we reboot.

After GRUB boots a slot on trial (ota.cfg decremented its tries), the
supervisor feeds `Prover.tick(now, services_up, tunnel_up)` every few
seconds. Once every service is up (and the tunnel, when one is configured)
and has stayed up for `settle` seconds, the slot is marked good and the
version floor is raised. If that does not happen by `deadline`, we reboot:
GRUB tries the slot again while tries are left, then boots the good slot, and
at that boot `at_boot` reports the fall-back and clears the trial.

Pure logic: time is an argument, the boot state comes in, decisions come out.
`ProveHook` applies the decisions to the boot environment.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from ota import bootenv
from ota.bootenv import NO_SLOT, BlockStore, BootState
from ota.version import is_newer

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 300.0
DEFAULT_SETTLE = 15.0
REPORT_EVERY = 30.0


class Action(enum.Enum):
    NONE = "none"
    MARK_GOOD = "mark-good"
    REBOOT = "reboot"
    CLEAR_FAILED_TRIAL = "clear-failed-trial"


@dataclass(frozen=True)
class Decision:
    action: Action
    message: str | None = None


NOTHING = Decision(Action.NONE)


class Prover:
    def __init__(
        self,
        state: BootState,
        running: str,
        started: float,
        deadline: float = DEFAULT_DEADLINE,
        settle: float = DEFAULT_SETTLE,
    ) -> None:
        self.state = state
        self.running = running
        self.started = started
        self.deadline = deadline
        self.settle = settle
        self.proving = running == state.trial
        self.done = not self.proving
        self._healthy_since: float | None = None
        self._last_report = started
        self._last_health: tuple[bool, bool | None] | None = None

    def _label(self, slot: str) -> str:
        return f"slot {slot} ({self.state.versions.get(slot, NO_SLOT)})"

    def at_boot(self) -> Decision:
        s, run = self.state, self.running
        if self.proving:
            return Decision(
                Action.NONE,
                f"{self._label(run)} on trial ({s.tries} more tries after this "
                f"boot): proving within {self.deadline:.0f} s",
            )
        if s.trial != NO_SLOT and run == s.good and s.tries == 0:
            return Decision(
                Action.CLEAR_FAILED_TRIAL,
                f"{self._label(s.trial)} failed to prove itself; fell back to "
                f"{self._label(run)}",
            )
        if run != s.good:
            return Decision(
                Action.NONE,
                f"running {self._label(run)}, chosen by hand; good slot is "
                f"{s.good}, nothing is proven or changed",
            )
        return Decision(Action.NONE, f"{self._label(run)} is the good slot")

    def expire(self, now: float) -> None:
        """Make the deadline pass now (the supervisor gave up waiting)."""
        self.deadline = min(self.deadline, max(0.0, now - self.started))

    def tick(self, now: float, services_up: bool, tunnel_up: bool | None) -> Decision:
        """`tunnel_up` is None when no tunnel is configured."""
        if self.done:
            return NOTHING
        healthy = services_up and tunnel_up is not False
        if healthy and self._healthy_since is None:
            self._healthy_since = now
        elif not healthy:
            self._healthy_since = None

        # proven: healthy long enough
        if self._healthy_since is not None and now - self._healthy_since >= self.settle:
            self.done = True
            return Decision(
                Action.MARK_GOOD,
                f"{self._label(self.running)} proved itself after "
                f"{now - self.started:.0f} s: marked good, floor raised",
            )

        # deadline passed: reboot, GRUB counts the tries
        what = _health_words(services_up, tunnel_up)
        if now - self.started >= self.deadline:
            self.done = True
            nxt = (
                f"GRUB tries it {self.state.tries} more time(s)"
                if self.state.tries
                else f"GRUB falls back to {self._label(self.state.good)}"
            )
            return Decision(
                Action.REBOOT,
                f"{self._label(self.running)} not healthy after "
                f"{self.deadline:.0f} s ({what}): rebooting; {nxt}",
            )

        # progress report on change or every REPORT_EVERY seconds
        health = (services_up, tunnel_up)
        if health != self._last_health or now - self._last_report >= REPORT_EVERY:
            self._last_health, self._last_report = health, now
            left = self.deadline - (now - self.started)
            return Decision(
                Action.NONE,
                f"proving {self._label(self.running)}: {what}; {left:.0f} s left",
            )
        return NOTHING


def _health_words(services_up: bool, tunnel_up: bool | None) -> str:
    words = "services up" if services_up else "services not all up"
    if tunnel_up is not None:
        words += ", tunnel up" if tunnel_up else ", tunnel down"
    return words


def mark_good(state: BootState, slot: str) -> BootState:
    version = state.versions.get(slot, NO_SLOT)
    floor = state.floor
    if version != NO_SLOT and is_newer(version, floor):
        floor = version
    return replace(state, good=slot, trial=NO_SLOT, tries=0, floor=floor)


def clear_trial(state: BootState) -> BootState:
    return replace(state, trial=NO_SLOT, tries=0)


class ProveHook:
    """The supervisor's side: call `start` once at boot, then `tick` regularly.

    `say` shows a line on the console and in the log; `reboot` reboots the box;
    `record_failed(version)` remembers a version that did not prove itself.
    """

    def __init__(
        self,
        store: BlockStore,
        running: str,
        say: Callable[[str], None],
        reboot: Callable[[], None],
        record_failed: Callable[[str], None] = lambda _v: None,
        deadline: float = DEFAULT_DEADLINE,
        settle: float = DEFAULT_SETTLE,
    ) -> None:
        self.store = store
        self.running = running
        self.say = say
        self.reboot = reboot
        self.record_failed = record_failed
        self.deadline = deadline
        self.settle = settle
        self.prover: Prover | None = None
        self._lock = threading.Lock()  # ticks may come from two threads

    def start(self, now: float) -> None:
        with self._lock:
            state = bootenv.load(self.store).state
            self.prover = Prover(state, self.running, now, self.deadline, self.settle)
            self._apply(self.prover.at_boot())

    def tick(self, now: float, services_up: bool, tunnel_up: bool | None) -> Action:
        if self.prover is None:
            self.start(now)
        assert self.prover is not None
        with self._lock:
            decision = self.prover.tick(now, services_up, tunnel_up)
            self._apply(decision)
        return decision.action

    def _apply(self, decision: Decision) -> None:
        if decision.message:
            level = (
                logging.WARNING if decision.action is not Action.NONE else logging.INFO
            )
            log.log(level, "ota: %s", decision.message)
            self.say(f"ota: {decision.message}")
        if decision.action is Action.MARK_GOOD:
            bootenv.save(self.store, lambda s: mark_good(s, self.running))
        elif decision.action is Action.CLEAR_FAILED_TRIAL:
            assert self.prover is not None
            failed = self.prover.state.trial
            self.record_failed(self.prover.state.versions.get(failed, NO_SLOT))
            bootenv.save(self.store, clear_trial)
        elif decision.action is Action.REBOOT:
            self.reboot()
