#!/usr/bin/env python3
"""`make demo`: a home LAN reaches a corporate host through the Moat tunnel.

    lan client      moat            internet        portal           corp host
    192.168.1.10 -- 192.168.1.1                                      10.50.0.10
                    203.0.113.x -- 203.0.113.1
                    (DHCP)         dnsmasq
                                   198.51.100.1 -- 198.51.100.2
                                                   10.50.0.1 ------/
                    [moat tunnel]  (sees only ESP)  [moat portal run]
                    [moat register] -- ssh -------> [sshd]

Every host is a network namespace made here and deleted at the end. The portal
provisions the moat (`moat portal add`: subnet, ssh identity, pinned host key);
the moat gets its wild-side address from the ISP's DHCP server, registers over
ssh (`moat register`), receives fresh SAs and brings its tunnel up. The demo
pings the corporate host from the LAN client, downloads a file from a web
server on it, checks the SHA-256, and prints the counters of both ends.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))

from netns import Host, Lab, wait_for  # noqa: E402
from portal_lab import PortalSite  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(TOP), "MOAT_LOG_LEVEL": "INFO"}
DOWNLOAD_BYTES = 20 * 1024 * 1024
TRANSFORM = "aes-gcm-128"


# run on the LAN client: wait for the server, download, report rate and hash
FETCH = """\
import hashlib, time, urllib.request
URL = "http://10.50.0.10:8080/"
for _ in range(50):
    try:
        urllib.request.urlopen(URL, timeout=2)
        break
    except OSError:
        time.sleep(0.2)
t = time.monotonic()
body = urllib.request.urlopen(URL + "report.bin").read()
dt = time.monotonic() - t
print(f"{len(body)} bytes in {dt:.2f} s = {len(body) * 8 / dt / 1e6:.0f} Mbit/s")
print("sha256", hashlib.sha256(body).hexdigest())
"""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(host: Host, *argv: str) -> str:
    print(f"[{host.name.split('-', 1)[1]}] $ {' '.join(argv)}", flush=True)
    res = host.run(*argv, timeout=120)
    print(res.stdout.rstrip(), flush=True)
    return res.stdout


def build_network(lab: Lab) -> dict[str, Host]:
    hosts = {
        "lan": lab.host("lan"),
        "moat": lab.host("moat", forwarding=True),
        "internet": lab.host("internet", forwarding=True),
        "portal": lab.host("portal", forwarding=True),
        "corp": lab.host("corp"),
    }
    h = hosts
    lab.link(h["lan"], "eth0", "192.168.1.10/24", h["moat"], "lan0", "192.168.1.1/24")
    lab.link(h["moat"], "wan0", None, h["internet"], "isp0", "203.0.113.1/24")
    lab.link(
        h["internet"], "hq0", "198.51.100.1/24", h["portal"], "wan0", "198.51.100.2/24"
    )
    lab.link(h["portal"], "corp0", "10.50.0.1/24", h["corp"], "eth0", "10.50.0.10/24")
    h["lan"].ip("route", "add", "default", "via", "192.168.1.1")
    h["portal"].ip("route", "add", "default", "via", "198.51.100.1")
    h["corp"].ip("route", "add", "default", "via", "10.50.0.1")
    return hosts


UDHCPC_HOOK = """\
#!/bin/sh
# busybox udhcpc hook: configure the wild side, tell `moat register`
case "$1" in
deconfig) ip -4 addr flush dev "$interface" ;;
bound|renew)
    if ! ip -4 -o addr show dev "$interface" | grep -q " $ip/"; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        ip route replace default via "${{router%% *}}" dev "$interface"
        {register} --now >/dev/null 2>&1 &
    fi ;;
esac
exit 0
"""


def start_portal(h: dict[str, Host], tmp: Path) -> tuple[PortalSite, Path]:
    site = PortalSite(
        h["portal"], "198.51.100.2", networks=("10.50.0.0/16",),
        pool="192.168.0.0/16", prefix=24,
    )  # fmt: skip
    bundle = site.add("home", "--subnet", "192.168.1.0/24")
    log = open(tmp / "portal.log", "wb")  # noqa: SIM115
    proc = h["portal"].popen(
        sys.executable, "-m", "moat", "portal", "--db", str(site.db), "run",
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    wait_for(lambda: site.control.exists() or proc.poll() is not None, timeout=60)
    if proc.poll() is not None:
        raise SystemExit(f"moat portal run failed:\n{(tmp / 'portal.log').read_text()}")
    return site, bundle


def start_moat(h: dict[str, Host], tmp: Path, bundle: Path) -> None:
    register = [sys.executable, "-m", "moat", "register", "--config",
                str(bundle / "moat.toml")]  # fmt: skip
    h["internet"].popen(
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        "--interface=isp0", "--bind-interfaces",
        f"--dhcp-leasefile={tmp / 'leases'}", f"--pid-file={tmp / 'dnsmasq.pid'}",
        "--dhcp-range=203.0.113.10,203.0.113.50,255.255.255.0,1h",
        "--dhcp-option=3,203.0.113.1",
    )  # fmt: skip
    hook = tmp / "udhcpc-hook"
    hook.write_text(UDHCPC_HOOK.format(register=" ".join(register)))
    hook.chmod(0o755)
    h["moat"].popen("busybox", "udhcpc", "-f", "-i", "wan0", "-s", str(hook),
                    "-t", "20", "-T", "1", "-A", "1")  # fmt: skip
    wait_for(lambda: " 203.0.113." in show_quiet(h["moat"]), timeout=60)
    log = open(tmp / "moat.log", "wb")  # noqa: SIM115
    h["moat"].popen(*register, "--daemon", stdout=log, stderr=subprocess.STDOUT,
                    env=ENV)  # fmt: skip
    sock = bundle / "tunnel.sock"
    wait_for(lambda: sock.exists(), timeout=120)


def show_quiet(host: Host) -> str:
    return host.run("ip", "-4", "-o", "addr", "show", "dev", "wan0").stdout


def status(host: Host, control: Path) -> None:
    show(host, sys.executable, "-m", "moat", "tunnel", "--status", "--control",
         str(control))  # fmt: skip


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="moat-demo-") as tmpdir, Lab("md") as lab:
        tmp = Path(tmpdir)

        step("building the network: lan -- moat -- internet -- portal -- corp")
        h = build_network(lab)
        print(__doc__.split("\n\n")[1])

        step("the portal: database, sshd (keys from the database), daemon")
        site, bundle = start_portal(h, tmp)
        try:
            print(site.moat("list").rstrip())
            print(f"files for the moat: {sorted(p.name for p in bundle.iterdir())}")

            step("the moat: address from the ISP (DHCP), registration over ssh")
            t0 = time.monotonic()
            start_moat(h, tmp, bundle)
            show(h["moat"], "ip", "-br", "addr", "show", "wan0")
            print(f"registered and tunnel up after {time.monotonic() - t0:.1f}s")
            print(site.moat("show", "home").rstrip())
            return run_traffic(h, tmp, site, bundle)
        finally:
            site.close()


def run_traffic(h: dict[str, Host], tmp: Path, site: PortalSite, bundle: Path) -> int:
    step("the LAN client pings the corporate host through the tunnel")
    show(h["lan"], "ping", "-c", "3", "-i", "0.3", "10.50.0.10")

    step("the LAN client downloads 20 MB from a web server on the corporate host")
    www = tmp / "www"
    www.mkdir()
    data = os.urandom(DOWNLOAD_BYTES)
    (www / "report.bin").write_bytes(data)
    server = h["corp"].popen(
        "python3", "-m", "http.server", "8080", "--bind", "10.50.0.10",
        "--directory", str(www),
    )  # fmt: skip
    fetch = tmp / "fetch.py"
    fetch.write_text(FETCH)
    out = show(h["lan"], "python3", str(fetch))
    want = hashlib.sha256(data).hexdigest()
    ok = f"sha256 {want}" in out
    print(f"checksum matches the file on the corporate host: {'yes' if ok else 'NO'}")
    os.killpg(server.pid, signal.SIGTERM)

    step("what the internet router sees: only ESP in UDP/4500 between the two ends")
    dump = h["internet"].popen(
        "tcpdump", "-i", "isp0", "-n", "-c", "4", "-l", stdout=subprocess.PIPE
    )
    time.sleep(1)
    h["lan"].run("ping", "-c", "2", "-i", "0.2", "10.50.0.10")
    try:
        print(dump.communicate(timeout=10)[0].decode().rstrip())
    except subprocess.TimeoutExpired:
        os.killpg(dump.pid, signal.SIGTERM)

    step("tunnel counters: moat end")
    status(h["moat"], bundle / "tunnel.sock")
    step("the portal's view")
    print(site.moat("status").rstrip())

    step("cleaning up (namespaces deleted)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
