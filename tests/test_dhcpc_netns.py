"""Our DHCP client (`moat dhcpc`) against dnsmasq acting as the ISP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from dhcp_lab import REPO
from netns import Host, Lab, wait_for

pytestmark = pytest.mark.netns


def dnsmasq(
    isp: Host, tmp: Path, tag: str, first: str, last: str
) -> subprocess.Popen[Any]:
    """dnsmasq as the ISP's DHCP server, only inside the namespace; T1 3 s."""
    log = (tmp / f"dnsmasq-{tag}.log").open("ab")
    return isp.popen(
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
        "--interface=wan", "--bind-interfaces", "--dhcp-authoritative", "--no-ping",
        f"--dhcp-range={first},{last},2m",
        "--dhcp-option=option:T1,3", "--dhcp-option=option:T2,6", "--log-dhcp",
        f"--dhcp-leasefile={tmp}/dnsmasq-{tag}.leases",
        f"--pid-file={tmp}/dnsmasq-{tag}.pid",
        stdout=log, stderr=log,
    )  # fmt: skip


def in_range(address: str, first: str, last: str) -> bool:
    return IPv4Address(first) <= IPv4Address(address) <= IPv4Address(last)


def test_client_follows_isp(lab: Lab, tmp_path: Path) -> None:
    isp, moat = lab.host("isp"), lab.host("moat")
    lab.link(isp, "wan", "192.0.2.1/24", moat, "wild0", None)
    first = dnsmasq(isp, tmp_path, "a", "192.0.2.50", "192.0.2.59")

    events = tmp_path / "hook.events"
    hook = tmp_path / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        'echo "$MOAT_DHCP_EVENT|$MOAT_DHCP_OLD_ADDRESS|$MOAT_DHCP_NEW_ADDRESS|'
        f'$MOAT_DHCP_INTERFACE|$MOAT_DHCP_ROUTER" >> {events}\n'
    )
    hook.chmod(0o755)
    log = tmp_path / "dhcpc.log"
    out = log.open("ab")
    argv = [
        sys.executable, "-m", "moat", "dhcpc", "-vv", "--interface", "wild0",
        "--hook", f"{hook}", "--hostname", "moat1", "--min-rebind-wait", "1",
        "--status-file", str(tmp_path / "dhcpc.status.json"),
        "--state-file", str(tmp_path / "dhcpc.state.json"),
    ]  # fmt: skip
    client = moat.popen(*argv, cwd=REPO, stdout=out, stderr=out)

    def hook_lines() -> list[list[str]]:
        if not events.exists():
            return []
        return [line.split("|") for line in events.read_text().splitlines()]

    # bound: address, default route, hook with no old address
    wait_for(lambda: len(hook_lines()) >= 1, timeout=30)
    event, old, new, interface, router = hook_lines()[0]
    assert (event, old, interface, router) == ("bound", "", "wild0", "192.0.2.1")
    assert in_range(new, "192.0.2.50", "192.0.2.59")
    assert f"inet {new}/24" in moat.run("ip", "-4", "addr", "show", "wild0").stdout
    assert "default via 192.0.2.1" in moat.run("ip", "route").stdout
    moat.run("ping", "-c1", "-W2", "192.0.2.1")
    status_file = tmp_path / "dhcpc.status.json"
    wait_for(lambda: json.loads(status_file.read_text())["address"] == new, 10)
    assert json.loads(status_file.read_text())["state"] in ("bound", "renewing")

    # renews at T1 (unicast REQUEST, dnsmasq ACKs again); the hook stays quiet
    dnsmasq_log = tmp_path / "dnsmasq-a.log"
    wait_for(lambda: dnsmasq_log.read_text().count(f"DHCPACK(wan) {new}") >= 3, 30)
    assert len(hook_lines()) == 1

    # the ISP comes back with another range: NAK, new lease, hook old -> new
    first.send_signal(signal.SIGTERM)
    first.wait(10)
    dnsmasq(isp, tmp_path, "b", "192.0.2.100", "192.0.2.109")
    wait_for(lambda: len(hook_lines()) >= 3, timeout=40)
    lost, bound = hook_lines()[1:3]
    assert lost[:3] == ["lost", new, ""]
    assert bound[0] == "bound" and bound[1] == new
    assert in_range(bound[2], "192.0.2.100", "192.0.2.109")
    addrs = moat.run("ip", "-4", "addr", "show", "wild0").stdout
    assert f"inet {bound[2]}/24" in addrs and new not in addrs
    assert "NAK in renewing" in log.read_text()

    client.send_signal(signal.SIGTERM)
    assert client.wait(10) == 0
    assert "dhcpc stopped" in log.read_text()

    # restarted, it asks for its last address again and tells the hook
    state = json.loads((tmp_path / "dhcpc.state.json").read_text())
    assert state == {"address": bound[2]}
    moat.popen(*argv, cwd=REPO, stdout=out, stderr=out)
    wait_for(lambda: len(hook_lines()) >= 4, timeout=30)
    assert hook_lines()[3][:3] == ["bound", bound[2], bound[2]]
    assert "Traceback" not in log.read_text()
