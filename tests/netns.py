"""Network namespaces for tests: hosts with their own addresses, made and
removed by the test itself.

    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, "eth0", "10.1.0.1/24", b, "eth0", "10.1.0.2/24")
        a.run("ping", "-c1", "10.1.0.2")

Namespace names carry the test process id, so parallel runs do not collide.
On exit every process started in a namespace is killed and the namespaces are
deleted (veth pairs go with them).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

_counter = itertools.count()


def have_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Host:
    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self.procs: list[subprocess.Popen[Any]] = []

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        res = subprocess.run(self._argv(argv), timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {' '.join(argv)} -> {res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self._argv(argv), **kw)
        self.procs.append(proc)
        return proc

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)

    def ip(self, *args: str) -> None:
        self.run("ip", *args)

    def pids(self) -> list[int]:
        res = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True
        )
        return [int(p) for p in res.stdout.split()]


class Lab:
    def __init__(self, prefix: str = "mt") -> None:
        self.tag = f"{prefix}{os.getpid() % 100000}x{next(_counter)}"
        self.hosts: list[Host] = []

    def host(self, name: str, forwarding: bool = False) -> Host:
        host = Host(self, f"{self.tag}-{name}")
        subprocess.run(["ip", "netns", "add", host.name], check=True)
        self.hosts.append(host)
        host.ip("link", "set", "lo", "up")
        if forwarding:
            host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        return host

    def link(
        self,
        a: Host,
        ifa: str,
        addr_a: str | None,
        b: Host,
        ifb: str,
        addr_b: str | None,
        mtu: int | None = None,
    ) -> None:
        tmp_a, tmp_b = f"v{self.tag}a", f"v{self.tag}b"
        subprocess.run(
            ["ip", "link", "add", tmp_a[:15], "type", "veth", "peer", tmp_b[:15]],
            check=True,
        )
        for tmp, host, ifname, addr in (
            (tmp_a, a, ifa, addr_a),
            (tmp_b, b, ifb, addr_b),
        ):
            subprocess.run(
                ["ip", "link", "set", tmp[:15], "netns", host.name], check=True
            )
            host.ip("link", "set", tmp[:15], "name", ifname)
            if mtu:
                host.ip("link", "set", ifname, "mtu", str(mtu))
            if addr:
                host.ip("addr", "add", addr, "dev", ifname)
            host.ip("link", "set", ifname, "up")

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 3
            for proc in host.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for pid in host.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        self.hosts.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)
