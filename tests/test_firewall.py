"""Wild-side lockdown: rendering, config errors, and an nmap scan in namespaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dhcp_lab import REPO, dhcpd_config, start_dhcpd
from netns import Host, Lab, wait_for

from moat.errors import ConfigError
from services import firewall

BASE = {
    "wild_interface": "wild0",
    "private_interface": "lan0",
    "tunnel_interface": "tun0",
    "portal_address": "192.0.2.9",
}


def test_render_policy() -> None:
    rules = firewall.render(firewall.parse({"firewall": BASE}))
    assert rules.startswith("# moat")
    assert "table inet moat\ndelete table inet moat\n" in rules
    assert rules.count("policy drop") == 2  # input and forward
    wild = rules.split("chain wild_input {")[1].split("\n\t}")[0]
    assert "ip saddr 192.0.2.9 ip protocol esp" in wild
    assert "ip saddr 192.0.2.9 udp dport 4500" in wild
    assert "udp sport 67 udp dport 68" in wild
    assert "ip saddr 192.0.2.9 tcp sport 22 ct state established" in wild
    assert wild.strip().endswith('counter drop comment "wild-drop"')
    forward = rules.split("chain forward {")[1]
    assert '"lan0" oifname "tun0"' in forward and '"tun0" oifname "lan0"' in forward
    assert "wild0" not in forward
    assert "udp dport { 53, 67, 123 }" in rules


@pytest.mark.parametrize(
    "change, field",
    [
        ({"wild_interface": 'x" accept; #'}, "firewall.wild_interface"),
        ({"portal_address": "portal"}, "firewall.portal_address"),
        ({"private_services": ["tcp/23"]}, "firewall.private_services"),
        ({"private_services": ["icmp/1"]}, "firewall.private_services"),
        ({"tunnel_services": ["udp/37"]}, "firewall.tunnel_services"),
        ({"portal_ssh_port": 0}, "firewall.portal_ssh_port"),
        ({"tunnel_interface": "lan0"}, "firewall.tunnel_interface"),
    ],
)
def test_config_errors(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        firewall.parse({"firewall": {**BASE, **change}}, "moat.toml")
    assert info.value.field == field


def test_print_verb(tmp_path: Path, moat_cmd: list[str]) -> None:
    config = tmp_path / "moat.toml"
    config.write_text(
        "[firewall]\n" + "".join(f'{k} = "{v}"\n' for k, v in BASE.items())
    )
    res = subprocess.run(
        [*moat_cmd, "firewall", "--config", str(config), "--print"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "chain wild_input" in res.stdout


# namespaces: wild segment (scanner, portal) | moat | private LAN (+ TUN)

LISTENERS = """
import socket, selectors
sel = selectors.DefaultSelector()
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 8080)); tcp.listen(); sel.register(tcp, selectors.EVENT_READ)
for port in (9999, 4500):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    sel.register(u, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is tcp:
            c, _ = s.accept(); c.sendall(b"hello\\n"); c.close()
        else:
            data, peer = s.recvfrom(2048); s.sendto(b"echo:" + data, peer)
"""

UDP_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recv(100).decode())
except TimeoutError:
    print("timeout")
"""

ESP_SEND = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
s.sendto(struct.pack("!II", 0x1234, 1) + bytes(32), (sys.argv[1], 0))
"""


def nmap_open(host: Host, *args: str) -> list[str]:
    res = host.run("nmap", "-n", "-Pn", "-T5", "-oG", "-", *args, timeout=240)
    ports = []
    for line in res.stdout.splitlines():
        if "Ports:" in line:
            for item in line.split("Ports:")[1].split("\t")[0].split(","):
                fields = item.strip().split("/")
                if len(fields) > 2 and fields[1] == "open":
                    ports.append(f"{fields[2]}/{fields[0]}")
    return ports


def scan_until(host: Host, target: str, fast: list[str]) -> list[str]:
    """TCP ports 1-10000 found open, retried until 8080 shows up (3 tries)."""
    for _ in range(3):
        found = nmap_open(host, "-sS", "-p", "1-10000", *fast, target)
        if "tcp/8080" in found:
            break
    return found


@pytest.mark.netns
def test_lockdown_scan(lab: Lab, tmp_path: Path) -> None:
    moat = lab.host("moat", forwarding=True)
    wan, scan, portal, home = (lab.host(n) for n in ("wan", "scan", "portal", "home"))
    wan.ip("link", "add", "br0", "type", "bridge")
    wan.ip("link", "set", "br0", "up")
    for i, (host, addr) in enumerate(
        [(moat, "192.0.2.2/24"), (scan, "192.0.2.66/24"), (portal, "192.0.2.9/24")]
    ):
        lab.link(wan, f"w{i}", None, host, "wild0" if host is moat else "eth0", addr)
        wan.ip("link", "set", f"w{i}", "master", "br0")
    lab.link(moat, "lan0", "10.99.0.1/24", home, "eth0", "10.99.0.50/24")
    home.ip("route", "add", "default", "via", "10.99.0.1")
    scan.ip("route", "add", "10.99.0.0/24", "via", "192.0.2.2")
    moat.ip("tuntap", "add", "dev", "tun0", "mode", "tun")
    moat.ip("addr", "add", "172.31.255.1/30", "dev", "tun0")
    moat.ip("link", "set", "tun0", "up")
    moat.ip("route", "add", "172.16.0.0/16", "dev", "tun0")

    # services listening on every address: without the lockdown, the scan sees them
    moat.popen(sys.executable, "-c", LISTENERS)
    start_dhcpd(moat, dhcpd_config(tmp_path, interface="lan0"), tmp_path / "d.log")
    fast = ["--max-retries", "0", "--min-rate", "20000"]
    wait_for(lambda: nmap_open(scan, "-sS", "-p", "8080", "192.0.2.2"), 10)
    # (a probe lost on a busy machine would hide a port: positive scans retry)
    assert scan_until(scan, "192.0.2.2", fast) == ["tcp/8080"]

    # the lockdown
    config = tmp_path / "moat.toml"
    config.write_text(
        config.read_text()
        + "[firewall]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in BASE.items())
        + 'private_services = ["udp/53", "tcp/53", "udp/67", "udp/123", '
        '"tcp/8080", "udp/9999"]\n'
    )
    moat.run(
        sys.executable, "-m", "moat", "firewall", "--config", str(config), cwd=REPO
    )
    wait_for(lambda: "echo:" in home.run(sys.executable, "-c", UDP_PROBE,
                                         "10.99.0.1", "9999").stdout, 10)  # fmt: skip

    # from the wild side nothing is open, TCP or UDP, on any port
    assert nmap_open(scan, "-sS", "-p-", *fast, "192.0.2.2") == []
    assert nmap_open(scan, "-sU", "-p-", *fast, "192.0.2.2") == []
    probe = [sys.executable, "-c", UDP_PROBE, "192.0.2.2", "4500"]
    assert scan.run(*probe).stdout.strip() == "timeout"
    # ... except what the tunnel needs, from the portal only
    assert portal.run(*probe).stdout.strip() == "echo:probe"
    before = firewall_counters(moat)
    portal.run(sys.executable, "-c", ESP_SEND, "192.0.2.2")
    scan.run(sys.executable, "-c", ESP_SEND, "192.0.2.2")
    after = firewall_counters(moat)
    assert after["esp-from-portal"] == before["esp-from-portal"] + 1
    assert after["wild-drop"] > before["wild-drop"]
    scan.run("ping", "-c1", "-W1", "10.99.0.50", check=False)
    assert scan.run("ping", "-c1", "-W1", "10.99.0.50", check=False).returncode != 0

    # the same services answer on the private side
    assert scan_until(home, "10.99.0.1", fast) == ["tcp/8080"]
    udp = [sys.executable, "-c", UDP_PROBE, "10.99.0.1", "9999"]
    assert home.run(*udp).stdout.strip() == "echo:probe"
    leased = home.run(
        "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "3", "-T", "1",
        "-s", "/bin/true", timeout=30,
    )  # fmt: skip
    assert "lease of 10.99.0.1" in leased.stderr + leased.stdout

    # forwarding: private -> tunnel only, never private -> wild
    assert home.run("ping", "-c1", "-W1", "192.0.2.66", check=False).returncode != 0
    home.run("ping", "-c1", "-W1", "172.16.0.1", check=False)  # into the TUN
    final = firewall_counters(moat)
    assert final["private-to-tunnel"] >= 1
    assert final["forward-drop"] >= 2


def firewall_counters(moat: Host) -> dict[str, int]:
    code = "from services.firewall import counters; print(repr(counters()))"
    res = moat.run(sys.executable, "-c", code, cwd=REPO)
    value: dict[str, int] = eval(res.stdout)  # our own repr() of a dict[str, int]
    return value
