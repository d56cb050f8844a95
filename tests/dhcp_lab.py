"""Helpers for DHCP namespace tests: a LAN bridge, our dhcpd, client hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from netns import Host, Lab, wait_for

REPO = Path(__file__).resolve().parent.parent


def lan(
    lab: Lab, clients: list[str], ifnames: dict[str, str] | None = None
) -> tuple[Host, dict[str, Host]]:
    """A server namespace with bridge `br0` (10.99.0.1/24), one client
    namespace per name, each plugged into the bridge as interface `eth0`
    (or the name given in `ifnames`)."""
    srv = lab.host("srv")
    srv.ip("link", "add", "br0", "type", "bridge")
    srv.ip("addr", "add", "10.99.0.1/24", "dev", "br0")
    srv.ip("link", "set", "br0", "up")
    hosts = {}
    for i, name in enumerate(clients):
        host = lab.host(name)
        ifname = (ifnames or {}).get(name, "eth0")
        lab.link(srv, f"p{i}", None, host, ifname, None)
        srv.ip("link", "set", f"p{i}", "master", "br0")
        hosts[name] = host
    return srv, hosts


def dhcpd_config(tmp: Path, **extra: Any) -> Path:
    table: dict[str, Any] = {
        "interface": "br0",
        "address": "10.99.0.1",
        "subnet": "10.99.0.0/24",
        "pool_start": "10.99.0.100",
        "pool_end": "10.99.0.149",
        "domain": "home.example",
        "search": ["corp.example", "home.example"],
        "ntp_servers": ["10.99.0.1"],
        "mtu": 1400,
        "lease_time": 3600,
        "lease_file": str(tmp / "dhcpd.leases"),
        "status_file": str(tmp / "dhcpd.status.json"),
    }
    table.update(extra)
    lines = ["[dhcpd]"]
    reservations = table.pop("reservations", [])
    for key, value in table.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for r in reservations:
        lines.append("[[dhcpd.reservations]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in r.items()]
    path = tmp / "moat.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_dhcpd(srv: Host, config: Path, log: Path) -> subprocess.Popen[Any]:
    out = log.open("ab")
    proc = srv.popen(
        sys.executable,
        "-m",
        "moat",
        "dhcpd",
        "-vv",
        "--config",
        str(config),
        stdout=out,
        stderr=out,
        cwd=REPO,
    )
    wait_for(lambda: "dhcpd serving" in log.read_text(), timeout=20)
    return proc


def leases(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "dhcpd.leases"
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["leases"])


def hook(tmp: Path, name: str, body: str) -> Path:
    """A client hook script that logs one line per event to `<name>.events`."""
    path = tmp / f"{name}.sh"
    events = tmp / f"{name}.events"
    path.write_text(f"#!/bin/sh\nEVENTS={events}\n{body}\n")
    path.chmod(0o755)
    return path


def events(tmp: Path, name: str) -> list[list[str]]:
    path = tmp / f"{name}.events"
    if not path.exists():
        return []
    return [line.split(" ", 2) for line in path.read_text().splitlines()]


UDHCPC_HOOK = """
case "$1" in
  bound|renew)
    ip addr replace "$ip/$mask" dev "$interface"
    echo "$1 $ip $ntpsrv|$search|$domain|$mtu" >> "$EVENTS" ;;
  deconfig)
    ip addr flush dev "$interface"
    echo "deconfig" >> "$EVENTS" ;;
esac
"""

DHCLIENT_HOOK = """
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT)
    ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface"
    echo "$reason $new_ip_address $new_ntp_servers|$new_domain_search" >> "$EVENTS" ;;
  RELEASE|EXPIRE|STOP)
    echo "$reason $old_ip_address" >> "$EVENTS"
    ip addr flush dev "$interface" ;;
esac
"""

DHCPCD_HOOK = """
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT)
    echo "$reason $new_ip_address $new_ntp_servers|$new_domain_search" >> "$EVENTS" ;;
  RELEASE|EXPIRE|STOP|NAK)
    echo "$reason $old_ip_address" >> "$EVENTS" ;;
esac
"""
