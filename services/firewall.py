"""`moat firewall`: the wild-side lockdown, as one nftables table of our own.

Rendered from table [firewall] of the moat's TOML file and loaded with
`nft -f`, which applies the whole file as one transaction: the table is
created (if missing), deleted and re-created, so a reload never leaves a
moment without rules and never touches other tables.

    [firewall]
    wild_interface = "wild0"        # towards the ISP
    private_interface = "lan0"      # the home LAN
    tunnel_interface = "tun0"       # the ESP datapath's TUN device
    portal_address = "203.0.113.1"  # the security portal (ESP peer, ssh)
    portal_ssh_port = 22
    private_services = ["udp/53", "tcp/53", "udp/67", "udp/123"]
    tunnel_services = []            # e.g. ["udp/53"] for NOTIFY from HQ

Policy:
- wild side in: only ESP (IP protocol 50) and UDP 4500 (NAT-T) from the
  portal, DHCP replies (UDP 67 -> 68), the return half of our own ssh
  connections to the portal, and ICMP errors about our own flows (path MTU);
  everything else dropped and counted.
- private side in: the listed services, ping, replies; the rest rejected.
- tunnel in: the listed services, ping, replies; the rest dropped.
- forwarding: only private <-> tunnel. Never private -> wild directly.
The moat offers no web, telnet, ftp, inetd or time (37) service anywhere.
Every accept and drop rule has a counter and a comment naming it
(`nft list table inet moat`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from moat.errors import ConfigError, MoatError
from services.configfile import load_toml

SECTION = "firewall"
TABLE = "moat"
NAT_T_PORT = 4500  # RFC 3948
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
SERVICE = re.compile(r"^(tcp|udp)/([0-9]{1,5})$")
DEFAULT_PRIVATE_SERVICES = ["udp/53", "tcp/53", "udp/67", "udp/123"]
# never opened, whatever the configuration says
FORBIDDEN_PORTS = {21: "ftp", 23: "telnet", 37: "time", 80: "http", 443: "https"}


@dataclass
class FirewallConfig:
    wild_interface: str
    private_interface: str
    tunnel_interface: str
    portal_address: IPv4Address
    portal_ssh_port: int = 22
    private_services: list[tuple[str, int]] = field(default_factory=list)
    tunnel_services: list[tuple[str, int]] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="TOML file with [firewall]"
    )
    parser.add_argument(
        "--print", action="store_true", help="print the nftables rules, apply nothing"
    )


def run(args: argparse.Namespace) -> int:
    config = load(args.config)
    rules = render(config)
    if args.print:
        print(rules, end="")
        return 0
    apply(rules)
    return 0


# configuration


def load(path: str) -> FirewallConfig:
    return parse(load_toml(path), path)


def parse(document: dict[str, Any], source: str = "") -> FirewallConfig:
    table = document.get(SECTION)
    if not isinstance(table, dict):
        raise ConfigError(source, SECTION, "missing table [firewall]")

    def error(name: str, problem: str) -> ConfigError:
        return ConfigError(source, f"{SECTION}.{name}", problem)

    def interface(name: str) -> str:
        value = table.get(name)
        if not isinstance(value, str) or not IFNAME.match(value):
            raise error(name, "must be an interface name (1-15 of A-Z a-z 0-9 _ . -)")
        return value

    def services(name: str, default: list[str]) -> list[tuple[str, int]]:
        value = table.get(name, default)
        if not isinstance(value, list):
            raise error(name, 'must be a list like ["udp/53", "tcp/53"]')
        out = []
        for item in value:
            match = SERVICE.match(item) if isinstance(item, str) else None
            if not match or not 0 < int(match.group(2)) < 65536:
                raise error(name, f'{item!r} is not "tcp/PORT" or "udp/PORT"')
            port = int(match.group(2))
            if port in FORBIDDEN_PORTS:
                raise error(
                    name, f"port {port} ({FORBIDDEN_PORTS[port]}) is never served"
                )
            out.append((match.group(1), port))
        return out

    try:
        portal = IPv4Address(table.get("portal_address", ""))
    except ValueError as exc:
        raise error("portal_address", f"not an IPv4 address ({exc})") from exc
    ssh_port = table.get("portal_ssh_port", 22)
    if (
        not isinstance(ssh_port, int)
        or isinstance(ssh_port, bool)
        or not 0 < ssh_port < 65536
    ):
        raise error("portal_ssh_port", "must be a port number")
    names = [
        interface(n)
        for n in ("wild_interface", "private_interface", "tunnel_interface")
    ]
    if len(set(names)) != 3:
        raise error(
            "tunnel_interface", "wild, private and tunnel interfaces must differ"
        )
    return FirewallConfig(
        wild_interface=names[0],
        private_interface=names[1],
        tunnel_interface=names[2],
        portal_address=portal,
        portal_ssh_port=ssh_port,
        private_services=services("private_services", DEFAULT_PRIVATE_SERVICES),
        tunnel_services=services("tunnel_services", []),
    )


# rules


def _service_rules(services: list[tuple[str, int]], zone: str) -> list[str]:
    rules = []
    for proto in ("tcp", "udp"):
        ports = sorted({port for p, port in services if p == proto})
        if ports:
            rules.append(
                f"{proto} dport {{ {', '.join(map(str, ports))} }} counter accept "
                f'comment "{zone}-{proto}-services"'
            )
    return rules


def render(c: FirewallConfig) -> str:
    """The nft script: replaces table inet moat in one transaction."""
    portal = c.portal_address
    wild = [
        f'ip saddr {portal} ip protocol esp counter accept comment "esp-from-portal"',
        f"ip saddr {portal} udp dport {NAT_T_PORT} counter accept "
        f'comment "nat-t-from-portal"',
        f"udp sport {DHCP_SERVER_PORT} udp dport {DHCP_CLIENT_PORT} counter accept "
        f'comment "dhcp-replies"',
        f"ip saddr {portal} tcp sport {c.portal_ssh_port} ct state established "
        f'counter accept comment "ssh-to-portal-replies"',
        # path MTU and unreachables about flows we started (ESP, NAT-T, ssh)
        "ct state related icmp type { destination-unreachable, time-exceeded } "
        'counter accept comment "icmp-errors-for-our-flows"',
        'counter drop comment "wild-drop"',
    ]
    private = [
        'ct state established,related counter accept comment "private-replies"',
        'icmp type echo-request counter accept comment "private-ping"',
        *_service_rules(c.private_services, "private"),
        'counter reject comment "private-reject"',
    ]
    tunnel = [
        'ct state established,related counter accept comment "tunnel-replies"',
        'icmp type echo-request counter accept comment "tunnel-ping"',
        *_service_rules(c.tunnel_services, "tunnel"),
        'counter drop comment "tunnel-drop"',
    ]
    priv, tun = c.private_interface, c.tunnel_interface
    forward = [
        'ct state invalid counter drop comment "forward-invalid"',
        f'iifname "{priv}" oifname "{tun}" counter accept comment "private-to-tunnel"',
        f'iifname "{tun}" oifname "{priv}" counter accept comment "tunnel-to-private"',
        'counter drop comment "forward-drop"',
    ]
    input_ = [
        'iif "lo" accept',
        'ct state invalid counter drop comment "input-invalid"',
        f'iifname "{c.wild_interface}" jump wild_input',
        f'iifname "{priv}" jump private_input',
        f'iifname "{tun}" jump tunnel_input',
        'counter drop comment "input-other-interface"',
    ]

    def chain(name: str, rules: list[str], hook: str | None = None) -> str:
        head = f"\tchain {name} {{\n"
        if hook:
            head += f"\t\ttype filter hook {hook} priority filter; policy drop;\n"
        return head + "".join(f"\t\t{r}\n" for r in rules) + "\t}\n"

    return (
        f"# moat wild-side lockdown (rendered by moat firewall)\n"
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        + chain("input", input_, "input")
        + chain("wild_input", wild)
        + chain("private_input", private)
        + chain("tunnel_input", tunnel)
        + chain("forward", forward, "forward")
        + "}\n"
    )


def apply(rules: str) -> None:
    try:
        res = subprocess.run(
            ["nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MoatError(f"nft: {exc}") from exc
    if res.returncode != 0:
        raise MoatError(f"nft -f failed: {res.stderr.strip()}")


def counters() -> dict[str, int]:
    """Packets per commented rule of our table (for status and tests)."""
    res = subprocess.run(
        ["nft", "-j", "list", "table", "inet", TABLE],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        raise MoatError(f"nft list failed: {res.stderr.strip()}")
    out: dict[str, int] = {}
    for item in json.loads(res.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                out[rule["comment"]] = int(expr["counter"]["packets"])
    return out
