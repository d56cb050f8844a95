"""The event loop survives a bug in packet handling (counted, logged, dropped)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from datapath.loop import EventLoop
from datapath.tunnel import Datapath


class PipeTun:
    """Stands in for the TUN device: a pipe whose reads give 'packets'."""

    vnet_hdr = False

    def __init__(self) -> None:
        self.fd, self.w = os.pipe()
        os.set_blocking(self.fd, False)

    def fileno(self) -> int:
        return self.fd


def test_handler_exception_is_counted_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = Datapath()
    calls = []

    def broken_outbound(packet: bytes, now: float) -> None:
        calls.append(packet)
        raise ZeroDivisionError("bug")

    dp.outbound = broken_outbound  # type: ignore[method-assign]
    tun = PipeTun()
    loop = EventLoop(dp, tun, {})  # type: ignore[arg-type]

    def feed() -> None:
        # one packet, wait until the loop failed on it, another, then stop
        for _ in range(2):
            before = len(calls)
            os.write(tun.w, b"E" * 40)
            deadline = time.monotonic() + 20
            while len(calls) == before and time.monotonic() < deadline:
                time.sleep(0.01)
        loop.stop()

    threading.Thread(target=feed, daemon=True).start()
    with caplog.at_level(logging.ERROR, logger="datapath.loop"):
        loop.run()
    assert len(calls) == 2
    assert dp.counters["internal_error"] == 2
    # one traceback per interval, not one per failure
    assert caplog.text.count("internal error in packet handling") == 1
