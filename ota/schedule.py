"""`moat ota watch`: check the portal's repository on a schedule.

The repository is reached through the tunnel, so failures to fetch are
normal (tunnel down, portal busy): they are retried with exponential backoff
(capped at the interval) and jitter so thousands of moats do not call the
portal in step. A found update is installed into the idle slot; it starts at
the next reboot, or at once with `--reboot`.

`next_check` is the pure schedule: the outcome of the last check and `now`
in, the time of the next check out.
"""

from __future__ import annotations

import enum
import logging
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the TUF client is imported when a check runs
    from ota.client import Installer

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 3600.0
RETRY_MIN = 60.0
JITTER = 0.1  # +- 10 %


class Outcome(enum.Enum):
    UP_TO_DATE = "up-to-date"  # or refused by policy: wait a full interval
    INSTALLED = "installed"
    UNREACHABLE = "unreachable"  # retry sooner, backing off


@dataclass
class Schedule:
    interval: float = DEFAULT_INTERVAL
    retry_min: float = RETRY_MIN
    failures: int = 0

    def next_check(
        self, now: float, outcome: Outcome, rand: Callable[[], float] = random.random
    ) -> float:
        if outcome is Outcome.UNREACHABLE:
            self.failures += 1
            delay = min(self.interval, self.retry_min * 2 ** (self.failures - 1))
        else:
            self.failures = 0
            delay = self.interval
        return now + delay * (1 + JITTER * (2 * rand() - 1))


def check_once(installer: Installer, url: str | None) -> Outcome:
    from ota.client import OtaRefused, Source

    """One scheduled check: install when there is an update for us."""
    try:
        installer.install(Source(url, None))
    except OtaRefused as exc:
        text = str(exc)
        if text.startswith("cannot fetch"):
            log.warning("ota watch: %s", text)
            return Outcome.UNREACHABLE
        if "older version" in text or "image in this source" in text:
            log.info("ota watch: up to date (%s)", text)
        else:
            log.warning("ota watch: %s", text)
            installer.say(f"ota: {text}")
        return Outcome.UP_TO_DATE
    return Outcome.INSTALLED


def watch(
    installer: Installer,
    url: str | None,
    schedule: Schedule,
    reboot: list[str] | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
) -> None:
    done = 0
    while rounds is None or done < rounds:
        outcome = check_once(installer, url)
        done += 1
        if outcome is Outcome.INSTALLED and reboot:
            installer.say("ota: rebooting into the update")
            subprocess.run(reboot, check=False)
            return
        now = clock()
        sleep(max(0.0, schedule.next_check(now, outcome) - now))
