"""Our DHCP server against real clients: busybox udhcpc, ISC dhclient, dhcpcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dhcp_lab import (
    DHCLIENT_HOOK,
    DHCPCD_HOOK,
    REPO,
    UDHCPC_HOOK,
    dhcpd_config,
    events,
    hook,
    lan,
    leases,
    start_dhcpd,
)
from netns import Lab, wait_for

pytestmark = pytest.mark.netns

RESERVED_MAC = "02:00:00:00:77:01"
RESERVED_IP = "10.99.0.77"


GARBAGE = """
import random, socket, sys
rng = random.Random(4)
discover = bytes.fromhex(
    "010106000000002a0000000000000000000000000000000000000000020000000a01"
) + bytes(202) + bytes.fromhex("63825363") + bytes([53, 1, 1, 50, 4, 10, 99, 0, 7, 255])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(400):
    if i % 2:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600)))
    else:
        data = bytearray(discover)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(236, len(data))] = rng.getrandbits(8)
    s.sendto(bytes(data), (sys.argv[1], 67))
"""


def last(tmp: Path, name: str, kind: str) -> list[str] | None:
    found = [e for e in events(tmp, name) if e[0] == kind]
    return found[-1] if found else None


def test_three_real_clients(
    lab: Lab, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # dhcpcd keeps /var/lib/dhcpcd/IFNAME.lease: a name of our own, removed after
    dhcpcd_if = f"dc{os.getpid() % 100000}"
    request.addfinalizer(
        lambda: Path(f"/var/lib/dhcpcd/{dhcpcd_if}.lease").unlink(True)
    )
    srv, hosts = lan(lab, ["u", "d", "c", "g"], {"c": dhcpcd_if})
    hosts["g"].ip("addr", "add", "10.99.0.250/24", "dev", "eth0")
    hosts["u"].ip("link", "set", "eth0", "address", RESERVED_MAC)
    # T1 of 4 s so dhclient and dhcpcd renew by themselves during the test
    config = dhcpd_config(
        tmp_path,
        lease_time=60,
        renewal_time=4,
        rebinding_time=50,
        reservations=[{"mac": RESERVED_MAC, "address": RESERVED_IP}],
    )
    log = tmp_path / "dhcpd.log"
    server = start_dhcpd(srv, config, log)

    # garbage first: random and mutated datagrams are dropped and counted (the
    # counters are checked at the restart below); the clients still get leases
    hosts["g"].run(sys.executable, "-c", GARBAGE, "10.99.0.1")

    # udhcpc: stays in the foreground, releases on SIGTERM (-R)
    udhcpc = hosts["u"].popen(
        "busybox", "udhcpc", "-i", "eth0", "-f", "-R", "-t", "5", "-T", "2",
        "-s", str(hook(tmp_path, "u", UDHCPC_HOOK)),
        "-O", "ntpsrv", "-O", "search", "-O", "mtu", "-x", "hostname:busybox",
    )  # fmt: skip
    # dhclient: foreground after binding, its hook configures the address
    conf = tmp_path / "dhclient.conf"
    conf.write_text(
        "timeout 20; retry 1;\nrequest subnet-mask, routers, domain-name-servers,"
        " domain-search, ntp-servers;\n"
    )
    dh_args = [
        "-4", "-cf", str(conf), "-lf", str(tmp_path / "dhclient.leases"),
        "-pf", str(tmp_path / "dhclient.pid"),
        "-sf", str(hook(tmp_path, "d", DHCLIENT_HOOK)),
    ]  # fmt: skip
    hosts["d"].popen("dhclient", "-1", "-d", "-v", *dh_args, "eth0")
    # dhcpcd: no fork, no IPv4LL, no ARP probe
    dhcpcd = hosts["c"].popen(
        "dhcpcd", "-4", "-B", "-f", "/dev/null", "-t", "20", "-L", "-A",
        "-c", str(hook(tmp_path, "c", DHCPCD_HOOK)), "--nohook", "resolv.conf",
        "-o", "ntp_servers", "-o", "domain_search", dhcpcd_if,
    )  # fmt: skip

    # every client bound, with our options, on distinct addresses
    bound_u = wait_for(lambda: last(tmp_path, "u", "bound"), timeout=30)
    bound_d = wait_for(lambda: last(tmp_path, "d", "BOUND"), timeout=30)
    bound_c = wait_for(lambda: last(tmp_path, "c", "BOUND"), timeout=30)
    assert bound_u[1] == RESERVED_IP  # reservation honoured
    assert bound_u[2] == "10.99.0.1|corp.example home.example|home.example|1400"
    assert bound_d[2] == "10.99.0.1|corp.example. home.example."
    assert bound_c[2] == "10.99.0.1|corp.example home.example"
    addrs = {bound_u[1], bound_d[1], bound_c[1]}
    assert len(addrs) == 3
    stored = {lease["address"]: lease for lease in leases(tmp_path)}
    assert addrs <= set(stored)
    assert stored[RESERVED_IP]["hostname"] == "busybox"
    hosts["d"].run("ping", "-c1", "-W2", "10.99.0.1")
    # the status file is rewritten every few seconds
    status_argv = [sys.executable, "-m", "moat", "dhcpd", "--config", str(config)]

    def active_leases() -> bool:
        res = subprocess.run(
            [*status_argv, "--status"], capture_output=True, text=True, cwd=REPO
        )
        return res.returncode == 0 and (
            json.loads(res.stdout)["leases"]["active_leases"] == 3
        )

    wait_for(active_leases, timeout=20, interval=0.5)

    # dhclient and dhcpcd renew at T1 by themselves; udhcpc on SIGUSR1
    wait_for(lambda: last(tmp_path, "d", "RENEW"), timeout=30)
    wait_for(lambda: last(tmp_path, "c", "RENEW"), timeout=30)
    udhcpc.send_signal(signal.SIGUSR1)
    renew_u = wait_for(lambda: last(tmp_path, "u", "renew"), timeout=30)
    assert renew_u[1] == RESERVED_IP
    assert last(tmp_path, "d", "RENEW") == ["RENEW", *bound_d[1:]]

    # restart the server: leases survive, the clients keep their addresses
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert "dhcpd stopped" in log.read_text()
    counters = log.read_text().split("dhcpd counters:")[1]
    assert "drop_malformed=" in counters and "drop_malformed_option=" in counters
    start_dhcpd(srv, config, log)
    renews = len([e for e in events(tmp_path, "u") if e[0] == "renew"])
    udhcpc.send_signal(signal.SIGUSR1)
    wait_for(
        lambda: len([e for e in events(tmp_path, "u") if e[0] == "renew"]) > renews,
        timeout=30,
    )
    assert last(tmp_path, "u", "renew") == renew_u
    assert {lease["address"] for lease in leases(tmp_path)} >= addrs
    # a newcomer after the restart gets none of the remembered addresses
    hosts["g"].ip("addr", "flush", "dev", "eth0")
    hosts["g"].run(
        "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "2",
        "-s", str(hook(tmp_path, "g", UDHCPC_HOOK)), timeout=30,
    )  # fmt: skip
    newcomer = last(tmp_path, "g", "bound")
    assert newcomer is not None and newcomer[1] not in addrs

    # release: udhcpc on SIGTERM with -R, dhclient -r, dhcpcd -k
    udhcpc.send_signal(signal.SIGTERM)
    udhcpc.wait(10)
    hosts["d"].run("dhclient", "-r", "-v", *dh_args, "eth0", timeout=30)
    hosts["c"].run("dhcpcd", "-4", "-k", dhcpcd_if, timeout=30)
    dhcpcd.wait(10)

    def released() -> bool:
        state = {lease["address"]: lease["state"] for lease in leases(tmp_path)}
        return all(state.get(a) == "released" for a in addrs)

    wait_for(released, timeout=30)
    assert "lease_write_failed" not in log.read_text()


def test_decline_and_exhaustion(lab: Lab, tmp_path: Path) -> None:
    srv, hosts = lan(lab, ["squat", "a", "b"])
    # a host squatting on the first pool address without a lease
    hosts["squat"].ip("addr", "add", "10.99.0.100/24", "dev", "eth0")
    config = dhcpd_config(tmp_path, pool_start="10.99.0.100", pool_end="10.99.0.101")
    log = tmp_path / "dhcpd.log"
    start_dhcpd(srv, config, log)

    # udhcpc -a probes the offered address with ARP and declines it
    hosts["a"].run(
        "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "8", "-T", "2",
        "-a", "-A", "2", "-s", str(hook(tmp_path, "a", UDHCPC_HOOK)),
        timeout=60,
    )  # fmt: skip
    assert last(tmp_path, "a", "bound") is not None
    assert last(tmp_path, "a", "bound")[1] == "10.99.0.101"  # type: ignore[index]
    parked = json.loads((tmp_path / "dhcpd.leases").read_text())["parked"]
    assert [p["address"] for p in parked] == ["10.99.0.100"]
    assert "declined 10.99.0.100" in log.read_text()

    # the pool is now empty: another client gets nothing, the server warns
    res = hosts["b"].run(
        "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "2", "-T", "1",
        "-s", str(hook(tmp_path, "b", UDHCPC_HOOK)),
        check=False, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1
    assert "WARNING" in log.read_text() and "exhausted" in log.read_text()
    assert last(tmp_path, "b", "bound") is None


def test_config_error_names_field(tmp_path: Path, moat_cmd: list[str]) -> None:
    config = dhcpd_config(tmp_path, pool_end="10.98.0.1")
    res = subprocess.run(
        [*moat_cmd, "dhcpd", "--config", str(config)], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert "dhcpd.pool_end" in res.stderr and "Traceback" not in res.stderr


def test_missing_interface_is_a_clear_error(
    tmp_path: Path, moat_cmd: list[str]
) -> None:
    config = dhcpd_config(tmp_path, interface="nosuchif0")
    res = subprocess.run(
        [*moat_cmd, "dhcpd", "--config", str(config)], capture_output=True, text=True
    )
    assert res.returncode == 1
    assert "cannot serve on nosuchif0" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(
        [*moat_cmd, "dhcpc", "--interface", "nosuchif0"], capture_output=True, text=True
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
