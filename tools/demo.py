#!/usr/bin/env python3
"""`make demo`: a home LAN reaches a corporate host through the Moat tunnel.

    lan client      moat            internet        portal           corp host
    192.168.1.10 -- 192.168.1.1                                      10.50.0.10
                    203.0.113.2 -- 203.0.113.1
                                   198.51.100.1 -- 198.51.100.2
                                                   10.50.0.1 ------/
                    [moat tunnel]  (sees only ESP)  [moat tunnel]

Every host is a network namespace made here and deleted at the end. Keys are
generated fresh for this run (one per direction). The demo pings the corporate
host from the LAN client, downloads a file from a web server on it, checks the
SHA-256, and prints the tunnel counters of both ends.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))

from netns import Host, Lab, wait_for  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(TOP), "MOAT_LOG_LEVEL": "INFO"}
DOWNLOAD_BYTES = 20 * 1024 * 1024
TRANSFORM = "aes-gcm-128"

TUNNEL_TOML = """\
[tunnel]
name = "{peer_name}"
encapsulation = "udp"
control_socket = "{control}"

[tun]
name = "moat0"
addresses = ["{tun_address}"]
routes = ["{remote_net}"]

[outer]
local = "{local}"
remote = "{remote}"

[selectors]
local = ["{local_net}"]
remote = ["{remote_net}"]

[sa.in]
spi = {spi_in:#x}
transform = "{transform}"
key = "{key_in}"

[sa.out]
spi = {spi_out:#x}
transform = "{transform}"
key = "{key_out}"
"""

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
    lab.link(
        h["moat"], "wan0", "203.0.113.2/24", h["internet"], "isp0", "203.0.113.1/24"
    )
    lab.link(
        h["internet"], "hq0", "198.51.100.1/24", h["portal"], "wan0", "198.51.100.2/24"
    )
    lab.link(h["portal"], "corp0", "10.50.0.1/24", h["corp"], "eth0", "10.50.0.10/24")
    h["lan"].ip("route", "add", "default", "via", "192.168.1.1")
    h["moat"].ip("route", "add", "default", "via", "203.0.113.1")
    h["portal"].ip("route", "add", "default", "via", "198.51.100.1")
    h["corp"].ip("route", "add", "default", "via", "10.50.0.1")
    return hosts


def write_configs(tmp: Path) -> tuple[Path, Path]:
    # one key per direction (AES-GCM-128: 16-byte key + 4-byte salt)
    up = (0x1000 + secrets.randbelow(0xEFFF), secrets.token_hex(20))
    down = (0x1000 + secrets.randbelow(0xEFFF), secrets.token_hex(20))
    moat = TUNNEL_TOML.format(
        peer_name="portal",
        control=tmp / "moat.sock",
        tun_address="10.255.0.1/32",
        local="203.0.113.2",
        remote="198.51.100.2",
        local_net="192.168.1.0/24",
        remote_net="10.50.0.0/16",
        spi_in=down[0],
        key_in=down[1],
        spi_out=up[0],
        key_out=up[1],
        transform=TRANSFORM,
    )
    portal = TUNNEL_TOML.format(
        peer_name="moat-home",
        control=tmp / "portal.sock",
        tun_address="10.255.0.2/32",
        local="198.51.100.2",
        remote="203.0.113.2",
        local_net="10.50.0.0/16",
        remote_net="192.168.1.0/24",
        spi_in=up[0],
        key_in=up[1],
        spi_out=down[0],
        key_out=down[1],
        transform=TRANSFORM,
    )
    (tmp / "moat.toml").write_text(moat)
    (tmp / "portal.toml").write_text(portal)
    return tmp / "moat.toml", tmp / "portal.toml"


def start_tunnel(host: Host, config: Path, tmp: Path) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{config.stem}.log", "wb")  # noqa: SIM115
    proc = host.popen(
        sys.executable, "-m", "moat", "tunnel", "--config", str(config),
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    sock = tmp / f"{config.stem}.sock"
    wait_for(lambda: sock.exists() or proc.poll() is not None, timeout=30)
    if proc.poll() is not None:
        raise SystemExit(
            f"moat tunnel failed:\n{(tmp / (config.stem + '.log')).read_text()}"
        )
    return proc


def status(host: Host, control: Path) -> None:
    show(
        host,
        sys.executable,
        "-m",
        "moat",
        "tunnel",
        "--status",
        "--control",
        str(control),
    )


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="moat-demo-") as tmpdir, Lab("md") as lab:
        tmp = Path(tmpdir)

        step("building the network: lan -- moat -- internet -- portal -- corp")
        h = build_network(lab)
        print(__doc__.split("\n\n")[1])

        step("generating fresh keys and the two tunnel configurations")
        moat_cfg, portal_cfg = write_configs(tmp)
        print(moat_cfg.read_text().split("[sa.in]")[0].rstrip())
        print("[sa.in] / [sa.out]: SPIs and AES-GCM-128 keys, random for this run")

        step("bringing the tunnel up (moat tunnel on the moat and on the portal)")
        start_tunnel(h["portal"], portal_cfg, tmp)
        start_tunnel(h["moat"], moat_cfg, tmp)
        show(h["moat"], "ip", "-br", "addr", "show", "moat0")

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
        print(
            f"checksum matches the file on the corporate host: {'yes' if ok else 'NO'}"
        )
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
        status(h["moat"], tmp / "moat.sock")
        step("tunnel counters: portal end")
        status(h["portal"], tmp / "portal.sock")

        step("cleaning up (namespaces deleted)")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
