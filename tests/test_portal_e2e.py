"""End to end: DHCP from the ISP, registration over sshd, traffic, changes.

    client ---- moat ======= isp ========= portal ---- corp
    10.200.0.2  10.200.0.1   100.64.0.1    198.51.100.2  10.10.0.5
                wild: DHCP   dnsmasq       sshd :2222
                (udhcpc)     198.51.100.1  moat portal run

The moat gets its wild address from dnsmasq (busybox udhcpc, whose script
calls `moat register --now`: the DHCP client's address-change hook),
`moat register --daemon` registers over ssh and runs `moat tunnel`; the
portal daemon carries every moat in one datapath. The test then changes the
moat's address at the ISP, rekeys under a TCP transfer and restarts the
portal, printing the time each takes to recover.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Host, Lab, wait_for
from portal_lab import PortalSite, moat_argv

from portal.db import Database
from portal.session import Origin, register
from portal.settings import load_settings

pytestmark = pytest.mark.netns

PORTAL = "198.51.100.2"
CORP = "10.10.0.5"
CLIENT = "10.200.0.2"
ENV = {**os.environ, "MOAT_LOG_LEVEL": "INFO"}

UDHCPC_SCRIPT = """\
#!/bin/sh
# busybox udhcpc hook: configure the wild side, tell `moat register`
case "$1" in
deconfig) ip -4 addr flush dev "$interface" ;;
bound|renew)
    if ! ip -4 -o addr show dev "$interface" | grep -q " $ip/"; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        ip route replace default via "${{router%% *}}" dev "$interface"
        echo "$ip" >> {log}
        {register} --now >/dev/null 2>&1 &
    fi ;;
esac
exit 0
"""

STREAM_SERVER = """\
import socket, sys, time
srv = socket.create_server(("0.0.0.0", 9000))
conn, _ = srv.accept()
chunk = b"x" * 16384
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    conn.sendall(chunk)
    time.sleep(0.01)
conn.close()
"""

STREAM_CLIENT = """\
import json, socket, time
s = socket.create_connection(("10.10.0.5", 9000), timeout=30)
total, last, gap = 0, time.monotonic(), 0.0
while True:
    data = s.recv(65536)
    now = time.monotonic()
    if not data:
        break
    gap, last = max(gap, now - last), now
    total += len(data)
print(json.dumps({"bytes": total, "max_gap": gap}))
"""


def ping(host: Host, address: str) -> bool:
    return (
        host.run("ping", "-c1", "-W1", address, check=False, timeout=10).returncode == 0
    )


def timed_recovery(client: Host, what: str, timeout: float = 90) -> float:
    t0 = time.monotonic()
    wait_for(lambda: ping(client, CORP), timeout=timeout, interval=0.1)
    took = time.monotonic() - t0
    print(f"{what}: traffic back after {took:.2f}s")
    return took


class World:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.client = lab.host("client")
        self.moat = lab.host("moat", forwarding=True)
        self.isp = lab.host("isp", forwarding=True)
        self.portal = lab.host("portal", forwarding=True)
        self.corp = lab.host("corp")
        lab.link(self.client, "eth0", f"{CLIENT}/28", self.moat, "lan", "10.200.0.1/28")
        lab.link(self.moat, "wild", None, self.isp, "cust", "100.64.0.1/24")
        lab.link(
            self.isp, "uplink", "198.51.100.1/24", self.portal, "wild", f"{PORTAL}/24"
        )
        lab.link(self.portal, "corp", "10.10.0.1/24", self.corp, "eth0", f"{CORP}/24")
        self.client.ip("route", "add", "default", "via", "10.200.0.1")
        self.portal.ip("route", "add", "default", "via", "198.51.100.1")
        self.corp.ip("route", "add", "default", "via", "10.10.0.1")
        self.dnsmasq: subprocess.Popen[bytes] | None = None
        self.udhcpc: subprocess.Popen[bytes] | None = None

    def start_dnsmasq(self, tmp: Path, first: int) -> None:
        if self.dnsmasq is not None:
            os.killpg(self.dnsmasq.pid, signal.SIGTERM)
            self.dnsmasq.wait(10)
        leases = tmp / f"leases-{first}"
        self.dnsmasq = self.isp.popen(
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--interface=cust", "--bind-interfaces", f"--dhcp-leasefile={leases}",
            f"--dhcp-range=100.64.0.{first},100.64.0.{first + 9},255.255.255.0,2m",
            "--dhcp-option=3,100.64.0.1", f"--pid-file={tmp}/dnsmasq.pid",
        )  # fmt: skip

    def start_udhcpc(self, script: Path) -> None:
        self.udhcpc = self.moat.popen(
            "busybox", "udhcpc", "-f", "-i", "wild", "-s", str(script), "-t", "20",
            "-T", "1", "-A", "1",
        )  # fmt: skip

    def stop_udhcpc(self) -> None:
        if self.udhcpc is not None:
            os.killpg(self.udhcpc.pid, signal.SIGKILL)
            self.udhcpc.wait(10)
            self.udhcpc = None


def wild_address(moat: Host) -> str | None:
    out = moat.run("ip", "-4", "-o", "addr", "show", "dev", "wild", check=False).stdout
    parts = out.split()
    return parts[3].split("/")[0] if len(parts) > 3 else None


@pytest.fixture
def world(lab: Lab, tmp_path: Path) -> Iterator[tuple[World, PortalSite]]:
    w = World(lab)
    site = PortalSite(w.portal, PORTAL, networks=("10.10.0.0/16",))
    try:
        yield w, site
    finally:
        site.close()


def start_portal(w: World, site: PortalSite, log: Path) -> subprocess.Popen[bytes]:
    proc = w.portal.popen(
        *moat_argv("portal", "--db", str(site.db), "run"),
        stdout=log.open("a"), stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    wait_for(lambda: site.control.exists() or proc.poll() is not None, timeout=60)
    assert proc.poll() is None, log.read_text()
    return proc


def portal_status(site: PortalSite) -> dict[str, object]:
    out = site.moat("status", "--verbose")
    return dict(json.loads(out))


def test_end_to_end(world: tuple[World, PortalSite], tmp_path: Path) -> None:
    w, site = world
    bundle = site.add("m1")
    db = Database(site.db)
    assert str(db.get("m1").subnet) == "10.200.0.0/28"

    # two more moats: one registered from an address nobody can reach (its
    # tunnel cannot come up), one with a corrupt record; neither may delay m1
    site.add("m2")
    settings = load_settings(site.db)
    register(db, settings, "m2", Origin(ipaddress.IPv4Address("203.0.113.77"), 999),
             dt.datetime.now(dt.UTC))  # fmt: skip
    site.add("m3")
    (site.db / "moats" / "m3.toml").write_text("version = 'not a number'\n")

    portal_log = tmp_path / "portal.log"
    portal = start_portal(w, site, portal_log)

    # the moat: DHCP from the ISP, then the register daemon (which runs the tunnel)
    register_cmd = " ".join(
        moat_argv("register", "--config", str(bundle / "moat.toml"))
    )
    hook_log = tmp_path / "dhcp-addresses"
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(log=hook_log, register=register_cmd))
    script.chmod(0o755)
    w.start_dnsmasq(tmp_path, 10)
    t0 = time.monotonic()
    w.start_udhcpc(script)
    wait_for(lambda: wild_address(w.moat), timeout=60)
    first_address = wild_address(w.moat)
    moat_log = tmp_path / "moat.log"
    w.moat.popen(
        *moat_argv("register", "--daemon", "--config", str(bundle / "moat.toml")),
        stdout=moat_log.open("w"), stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    took = timed_recovery(w.client, "first boot (DHCP, registration, tunnel)")
    print(f"first boot from DHCP start: {time.monotonic() - t0:.2f}s")
    assert took < 60
    rec = db.get("m1")
    assert str(rec.learned.address) == first_address  # from the connection

    # a download from the corporate host
    (tmp_path / "www").mkdir()
    blob = os.urandom(4 * 1024 * 1024)
    (tmp_path / "www" / "blob").write_bytes(blob)
    w.corp.popen(sys.executable, "-m", "http.server", "--bind", CORP, "8080",
                 "--directory", str(tmp_path / "www"))  # fmt: skip
    wait_for(lambda: "8080" in w.corp.run("ss", "-ltn").stdout, timeout=20)
    got = tmp_path / "got"
    fetch = (
        f"import urllib.request as u; u.urlretrieve('http://{CORP}:8080/blob', '{got}')"
    )
    w.client.run(sys.executable, "-c", fetch, timeout=120)
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(blob).digest()

    status = portal_status(site)
    assert status["ready"] == 2  # m1 and the unreachable m2; m3 skipped
    assert status["up"] == 1  # m2 never sent anything: no peer built
    assert "m3.toml" in status["problems"]  # type: ignore[operator]

    # the ISP changes the moat's address: traffic resumes
    generation = db.get("m1").sa.generation  # type: ignore[union-attr]
    w.stop_udhcpc()
    w.moat.ip("addr", "flush", "dev", "wild")
    w.start_dnsmasq(tmp_path, 100)
    t0 = time.monotonic()
    w.start_udhcpc(script)
    wait_for(lambda: wild_address(w.moat) not in (None, first_address), timeout=60)
    second_address = wild_address(w.moat)
    timed_recovery(w.client, f"address change {first_address} -> {second_address}")
    print(f"address change, from the DHCP client's start: {time.monotonic() - t0:.2f}s")
    # roaming moved the endpoint already; the DHCP hook's registration follows
    wait_for(lambda: db.get("m1").sa.generation > generation, timeout=60)  # type: ignore[union-attr]
    assert str(db.get("m1").learned.address) == second_address

    # rekey under a running TCP transfer: no reset, no stall over a second
    w.corp.popen(sys.executable, "-c", STREAM_SERVER, "8")
    wait_for(lambda: "9000" in w.corp.run("ss", "-ltn").stdout, timeout=20)
    client = w.client.popen(sys.executable, "-c", STREAM_CLIENT, stdout=subprocess.PIPE)
    time.sleep(2)
    before = db.get("m1").sa
    assert before is not None
    pid = int((bundle / "register.pid").read_text())
    os.kill(pid, signal.SIGUSR1)
    out, _ = client.communicate(timeout=60)
    result = json.loads(out)
    after = db.get("m1").sa
    assert after is not None and after.generation > before.generation
    print(f"rekey under TCP: {result['bytes']} bytes, gap {result['max_gap']:.3f}s max")
    assert result["bytes"] > 1_000_000
    assert result["max_gap"] < 1.0
    peer = portal_status(site)["peers"]["m1"]  # type: ignore[index]
    wait_for(lambda: portal_status(site)["peers"]["m1"]["out_sa"]["spi"]  # type: ignore[index]
             == after.spi_to_moat, timeout=30)  # fmt: skip
    assert peer["rx_packets"] > 0

    # portal restart: every tunnel back
    portal.terminate()
    assert portal.wait(20) == 0
    t0 = time.monotonic()
    portal = start_portal(w, site, portal_log)
    took = timed_recovery(w.client, "portal restart (from process start)")
    print(f"portal restart: {time.monotonic() - t0:.2f}s from the new process")
    assert portal_status(site)["up"] == 1
    portal.terminate()
    portal.wait(20)
