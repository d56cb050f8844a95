"""The black-hole network: a client behind a moat, a tunnel across an
"internet" with a smaller interior MTU that drops all ICMP, a portal, and two
servers behind it, one well-behaved and one "naughty" (DF on, large MSS, no
TCP MTU probing, ICMP filtered in front of it).

    client 10.1.0.2 -- moat (moat tunnel) -- r1 ==MTU== r2 -- portal (moat tunnel)
                                                               |-- naughty 10.2.1.10
                                                               |-- good    10.2.2.10

Only the r1 == r2 link has the small MTU: both tunnel ends see 1500-byte
links, so neither can know the interior minimum except by probing. Both
routers drop every ICMP message they forward or would send. The LAN links
have MTU 65535, so the client asks for a large MSS and DF packets of any size
reach the tunnel.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from netns import Host, Lab, wait_for
from tunnel_pair import ENV, SAKeys, Side, moat_argv

LAN_MTU = 65535
NO_ICMP = "meta l4proto { icmp, ipv6-icmp } drop;"
NFT_NO_ICMP = f"""
table inet noicmp {{
  chain forward_filter {{ type filter hook forward priority 0; {NO_ICMP} }}
  chain output_filter {{ type filter hook output priority 0; {NO_ICMP} }}
}}
"""
NFT_NAUGHTY = f"""
table inet front {{
  chain input_filter {{ type filter hook input priority 0; {NO_ICMP} }}
}}
"""
SERVER = r"""
import hashlib, socket, sys
size, port = int(sys.argv[1]), int(sys.argv[2])
block = hashlib.sha256(b"moat").digest() * 2048   # 64 KiB, deterministic
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    left = size
    try:
        while left:
            n = min(left, len(block)); c.sendall(block[:n]); left -= n
    except OSError:
        pass
    c.close()
"""
CLIENT = r"""
import hashlib, json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic(); h = hashlib.sha256(); got = 0; done = False
try:
    s = socket.create_connection((host, port), timeout=timeout)
    while time.monotonic() - start < timeout:
        s.settimeout(max(0.1, timeout - (time.monotonic() - start)))
        data = s.recv(1 << 16)
        if not data:
            done = True
            break
        got += len(data); h.update(data)
except OSError:
    pass
print(json.dumps({"bytes": got, "seconds": time.monotonic() - start,
                  "done": done, "sha256": h.hexdigest()}))
"""
UDP_SINK = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    while True:
        data = s.recv(70000)
        print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
except OSError:
    pass
"""
UDP_SEND = r"""
import hashlib, socket, sys, os
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF
for size in map(int, sys.argv[3:]):
    data = os.urandom(size - 28)
    s.sendto(data, (sys.argv[1], int(sys.argv[2])))
    print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def expected_sha256(size: int) -> str:
    block = hashlib.sha256(b"moat").digest() * 2048
    h = hashlib.sha256()
    left = size
    while left:
        n = min(left, len(block))
        h.update(block[:n])
        left -= n
    return h.hexdigest()


def retransmits(host: Host) -> int:
    lines = host.run("cat", "/proc/net/snmp").stdout.splitlines()
    tcp = [line.split() for line in lines if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("RetransSegs")])


class Figure5:
    def __init__(self, lab: Lab, tmp: Path, interior_mtu: int) -> None:
        self.lab, self.tmp = lab, tmp
        h = self.hosts = {
            name: lab.host(name, forwarding=name in ("moat", "r1", "r2", "portal"))
            for name in ("client", "moat", "r1", "r2", "portal", "naughty", "good")
        }
        lab.link(h["client"], "lan0", "10.1.0.2/24", h["moat"], "lan0", "10.1.0.1/24",
                 mtu=LAN_MTU)  # fmt: skip
        lab.link(h["moat"], "wild0", "192.168.10.1/24", h["r1"], "eth0",
                 "192.168.10.2/24")  # fmt: skip
        lab.link(h["r1"], "eth1", "192.168.30.1/24", h["r2"], "eth1",
                 "192.168.30.2/24", mtu=interior_mtu)  # fmt: skip
        lab.link(h["r2"], "eth0", "192.168.20.2/24", h["portal"], "wild0",
                 "192.168.20.1/24")  # fmt: skip
        lab.link(h["portal"], "lan1", "10.2.1.1/24", h["naughty"], "eth0",
                 "10.2.1.10/24", mtu=LAN_MTU)  # fmt: skip
        lab.link(h["portal"], "lan2", "10.2.2.1/24", h["good"], "eth0",
                 "10.2.2.10/24", mtu=LAN_MTU)  # fmt: skip
        h["client"].ip("route", "add", "default", "via", "10.1.0.1")
        h["moat"].ip("route", "add", "default", "via", "192.168.10.2")
        h["r1"].ip("route", "add", "192.168.20.0/24", "via", "192.168.30.2")
        h["r2"].ip("route", "add", "192.168.10.0/24", "via", "192.168.30.1")
        h["portal"].ip("route", "add", "default", "via", "192.168.20.2")
        for server, gateway in (("naughty", "10.2.1.1"), ("good", "10.2.2.1")):
            h[server].ip("route", "add", "default", "via", gateway)
        for router in ("r1", "r2"):
            h[router].run("nft", "-f", "-", input=NFT_NO_ICMP)
        # the naughty server: no TCP MTU probing, ICMP filtered in front of it
        h["naughty"].run("sysctl", "-qw", "net.ipv4.tcp_mtu_probing=0")
        h["naughty"].run("nft", "-f", "-", input=NFT_NAUGHTY)
        h["good"].run("sysctl", "-qw", "net.ipv4.tcp_mtu_probing=0")
        self.procs: list[subprocess.Popen[Any]] = []

    # tunnels

    def start_tunnels(self, policy: str, tag: str) -> None:
        ab = SAKeys.random(0x1000 + len(tag) * 16 + os.getpid() % 16, "aes-gcm-128")
        ba = SAKeys.random(0x20000 + len(tag) * 16, "aes-gcm-128")
        sides = {
            "moat": Side("moat", "192.168.10.1", "10.1.255.1", ["10.1.0.0/16"],
                         ["10.2.0.0/16"], "192.168.20.1", sa_in=ba, sa_out=ab,
                         control=str(self.tmp / f"moat-{tag}.sock")),
            "portal": Side("portal", "192.168.20.1", "10.2.255.1", ["10.2.0.0/16"],
                           ["10.1.0.0/16"], "192.168.10.1", sa_in=ab, sa_out=ba,
                           control=str(self.tmp / f"portal-{tag}.sock")),
        }  # fmt: skip
        self.controls = {}
        for name, side in sides.items():
            side.extra["mtu_policy"] = policy
            side.extra["keepalive"] = 0
            path = self.tmp / f"{name}-{tag}.toml"
            path.write_text(side.toml())
            log = open(self.tmp / f"{name}-{tag}.log", "ab")  # noqa: SIM115
            proc = self.hosts[name].popen(
                *moat_argv("tunnel", "--config", str(path)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**ENV, "MOAT_LOG_LEVEL": "INFO"},
            )
            self.procs.append(proc)
            self.controls[name] = side.control
            wait_for(lambda s=side: os.path.exists(s.control), timeout=30)

    def stop_tunnels(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def status(self, name: str) -> dict[str, Any]:
        res = subprocess.run(
            moat_argv("tunnel", "--status", "--json", "--control", self.controls[name]),
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        peers = json.loads(res.stdout)["peers"]
        peer: dict[str, Any] = next(iter(peers.values()))
        return peer

    def envelope(self, name: str) -> int:
        return int(self.status(name)["policy"]["envelope"])

    def wait_converged(self, interior_mtu: int, timeout: float = 40) -> None:
        """Both ends have probed their way to (nearly) the interior MTU."""

        def done() -> bool:
            return all(
                self.status(n)["policy"]["path_mtu"]["state"] == "search_complete"
                for n in ("moat", "portal")
            )

        wait_for(done, timeout=timeout, interval=0.5)
        for name in ("moat", "portal"):
            assert interior_mtu - 16 <= self.envelope(name) <= interior_mtu + 3

    # traffic

    def serve(self, size: int, port: int = 5001) -> None:
        for server in ("naughty", "good"):
            proc = self.hosts[server].popen(
                "python3", "-c", SERVER, str(size), str(port), stdout=subprocess.PIPE
            )
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"

    def download(self, server: str, timeout: float, port: int = 5001) -> dict[str, Any]:
        host = self.hosts[server]
        addr = "10.2.1.10" if server == "naughty" else "10.2.2.10"
        before = retransmits(host)
        res = self.hosts["client"].run(
            "python3", "-c", CLIENT, addr, str(port), str(timeout), timeout=timeout + 30
        )
        out: dict[str, Any] = json.loads(res.stdout)
        out["retransmits"] = retransmits(host) - before
        return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| interior MTU | policy | server | completed | seconds | MB received "
        "| retransmits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mtu']} | {r['policy']} | {r['server']} | "
            f"{'yes' if r['done'] else 'NO (hung)'} | {r['seconds']:.1f} | "
            f"{r['bytes'] / 1e6:.1f} | {r['retransmits']} |"
        )
    return "\n".join(lines)
