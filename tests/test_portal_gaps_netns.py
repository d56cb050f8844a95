"""Replays across a portal restart, and early re-registration, for real.

    moat (lan 10.200.0.1) ==== eth0 10.99.0.2 ---- 10.99.0.1 portal (corp 10.10.0.1)
    moat register --daemon                          sshd :2222, moat portal run
    (runs moat tunnel)                              tcpdump (the eavesdropper)

1. ESP the moat sends is captured on the portal's wire (tcpdump); the
   portal restarts; the captured packets are sent again (scapy, from
   another source port): none reaches the corporate side, each is counted,
   and the moat's fresh packets still flow.
2. With `rekey_packets` set low, a TCP upload through the tunnel drives the
   outbound SA past its soft limit: `moat register` sees `needs_rekey` in the
   tunnel's status, registers early (make-before-break) and the upload goes
   on without a reset or a long gap.
   Then the portal is killed (no clean stop): its windows restart beyond
   the saved marks, so the moat's packets are refused too until the moat,
   hearing nothing back, registers again; the recovery time is printed.
3. The moat side: `moat tunnel` with a state_dir, restarted with the same
   manual keys, refuses the ESP it had received before the restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Host, Lab, wait_for
from portal_lab import PortalSite, moat_argv
from tunnel_pair import TunnelPair

from portal.db import Database

pytestmark = pytest.mark.netns

PORTAL = "10.99.0.1"
MOAT = "10.99.0.2"
CORP = "10.10.0.1"
LAN = "10.200.0.1"
REKEY_PACKETS = 2000
NO_ANSWER = 8  # seconds of silence before the moat registers again
ENV = {**os.environ, "MOAT_LOG_LEVEL": "INFO"}

RECEIVER = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.10.0.1", 9999))
with open(sys.argv[1], "a") as out:
    while True:
        data, _ = s.recvfrom(2048)
        out.write(data.decode() + "\\n")
        out.flush()
"""

SENDER = """\
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.200.0.1", 0))
for i in range(int(sys.argv[2])):
    s.sendto(f"{sys.argv[1]}-{i}".encode(), ("10.10.0.1", 9999))
    time.sleep(0.01)  # one ESP packet each (AGGFRAG would pack a burst)
"""

REPLAY = """\
import sys
from scapy.all import IP, UDP, Raw, rdpcap, send
sent = 0
for pkt in rdpcap(sys.argv[1]):
    esp = bytes(pkt[UDP].payload)
    if len(esp) < 8 or esp[:4] == bytes(4):
        continue  # NAT keepalive or IKE marker: not ESP
    send(IP(src=sys.argv[2], dst=sys.argv[3]) / UDP(sport=4501, dport=4500)
         / Raw(esp), verbose=False)
    sent += 1
print(sent)
"""

UPLOAD_SERVER = """\
import json, socket, time
srv = socket.create_server(("10.10.0.1", 9000))
conn, _ = srv.accept()
total, last, gap = 0, time.monotonic(), 0.0
while True:
    data = conn.recv(65536)
    now = time.monotonic()
    if not data:
        break
    gap, last = max(gap, now - last), now
    total += len(data)
print(json.dumps({"bytes": total, "max_gap": gap}), flush=True)
"""

UPLOAD_CLIENT = """\
import socket, sys, time
s = socket.create_connection(("10.10.0.1", 9000), timeout=30,
                             source_address=("10.200.0.1", 0))
chunk = b"x" * 8192
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    s.sendall(chunk)
    time.sleep(0.005)
s.close()
"""


def stub(host: Host, name: str, address: str) -> None:
    """An interface holding `address` (a veth pair: no dummy module here)."""
    host.ip("link", "add", name, "type", "veth", "peer", "name", f"{name}-end")
    host.ip("addr", "add", address, "dev", name)
    host.ip("link", "set", f"{name}-end", "up")
    host.ip("link", "set", name, "up")


@pytest.fixture
def world(lab: Lab) -> Iterator[tuple[PortalSite, Host, Host]]:
    portal = lab.host("portal")
    moat = lab.host("moat")
    lab.link(portal, "eth0", f"{PORTAL}/24", moat, "eth0", f"{MOAT}/24")
    stub(portal, "corp", f"{CORP}/16")  # the corporate network
    stub(moat, "lan", f"{LAN}/28")  # the moat's LAN side
    site = PortalSite(portal, PORTAL, networks=("10.10.0.0/16",))
    try:
        yield site, portal, moat
    finally:
        site.close()


def start_portal(site: PortalSite, portal: Host, log: Path) -> subprocess.Popen[bytes]:
    site.control.unlink(missing_ok=True)
    proc = portal.popen(
        *moat_argv("portal", "--db", str(site.db), "run"),
        stdout=log.open("a"), stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    wait_for(lambda: site.control.exists() or proc.poll() is not None, timeout=60)
    assert proc.poll() is None, log.read_text()
    return proc


def status(site: PortalSite) -> dict[str, object]:
    return dict(json.loads(site.moat("status", "--verbose")))


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def settled(bundle: Path) -> bool:
    """The moat's tunnel runs on SAs far from needing a rekey."""
    res = subprocess.run(
        moat_argv("tunnel", "--status", "--json", "--control",
                  str(bundle / "tunnel.sock")),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if res.returncode != 0:
        return False
    peer = json.loads(res.stdout)["peers"]["portal"]
    out = peer["out_sa"]
    return not peer["pending_out_spi"] and out["seq"] < REKEY_PACKETS // 2


def ping(moat: Host) -> bool:
    res = moat.run("ping", "-c1", "-W1", "-I", LAN, CORP, check=False, timeout=10)
    return res.returncode == 0


def test_replay_after_restart_and_early_rekey(
    world: tuple[PortalSite, Host, Host], tmp_path: Path
) -> None:
    site, portal, moat = world
    bundle = site.add("m1")
    db = Database(site.db)
    assert str(db.get("m1").subnet) == "10.200.0.0/28"
    config = bundle / "moat.toml"
    config.write_text(
        config.read_text().replace(
            "[register]\n",
            f"[register]\nrekey_packets = {REKEY_PACKETS}\n"
            f"no_answer_after = {NO_ANSWER}\n",
            1,
        )
    )
    portal_log = tmp_path / "portal.log"
    daemon = start_portal(site, portal, portal_log)
    received = tmp_path / "received"
    portal.popen(sys.executable, "-c", RECEIVER, str(received))
    moat_log = tmp_path / "moat.log"
    moat.popen(
        *moat_argv("register", "--daemon", "--config", str(config)),
        stdout=moat_log.open("w"), stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    wait_for(lambda: ping(moat), timeout=90, interval=0.2)
    generation = db.get("m1").sa.generation  # type: ignore[union-attr]

    # 1. the eavesdropper captures the moat's ESP
    pcap = tmp_path / "esp.pcap"
    tcpdump = portal.popen(
        "tcpdump", "-i", "eth0", "-n", "-U", "-w", str(pcap),
        f"udp and src host {MOAT} and dst port 4500",
        stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for(lambda: pcap.exists() and pcap.stat().st_size > 0, timeout=30)
    time.sleep(0.5)  # tcpdump writes the header before it is attached
    moat.run(sys.executable, "-c", SENDER, "before", "100", timeout=60)
    wait_for(lambda: len(lines(received)) >= 95, timeout=30)
    time.sleep(0.5)
    tcpdump.terminate()
    tcpdump.wait(10)
    assert db.get("m1").sa.generation == generation  # type: ignore[union-attr]

    # the portal restarts; the captured packets are sent again
    daemon.terminate()
    assert daemon.wait(30) == 0
    daemon = start_portal(site, portal, portal_log)
    before = len(lines(received))
    res = moat.run(sys.executable, "-c", REPLAY, str(pcap), MOAT, PORTAL, timeout=120)
    replayed = int(res.stdout.strip())
    assert replayed >= 50
    wait_for(
        lambda: status(site)["counters"]["probe_drops"] >= replayed,  # type: ignore[index]
        timeout=30,
    )
    counters = status(site)["counters"]
    print(
        f"replayed {replayed} captured ESP packets after a portal restart: "
        f"{ {k: v for k, v in counters.items() if k.startswith('probe')} }"  # type: ignore[union-attr]
    )
    assert counters["probe_replay"] + counters.get("probe_replay_window", 0) == replayed  # type: ignore[index,union-attr]
    # nothing delivered; each replay failed the probe SA's replay check, so
    # none built a peer (the moat's own packets may have built it since)
    assert len(lines(received)) == before

    # fresh packets flow
    moat.run(sys.executable, "-c", SENDER, "after", "20", timeout=60)
    wait_for(
        lambda: sum(x.startswith("after-") for x in lines(received)) >= 15, timeout=30
    )
    assert sum(x.startswith("before-") for x in lines(received)) == before
    assert len(set(lines(received))) == len(lines(received))  # no duplicates
    st = status(site)
    assert st["up"] == 1
    peer = st["peers"]["m1"]  # type: ignore[index]
    assert peer["endpoint"] == f"{MOAT}:4500"  # the replays moved nothing

    # 2. an upload drives the outbound SA past its soft limit
    generation = db.get("m1").sa.generation  # type: ignore[union-attr]
    server = portal.popen(sys.executable, "-c", UPLOAD_SERVER, stdout=subprocess.PIPE)
    wait_for(lambda: "9000" in portal.run("ss", "-ltn").stdout, timeout=20)
    moat.run(sys.executable, "-c", UPLOAD_CLIENT, "15", timeout=120)
    out, _ = server.communicate(timeout=60)
    result = json.loads(out)
    after = db.get("m1").sa.generation  # type: ignore[union-attr]
    early = moat_log.read_text().count("registering early")
    print(
        f"upload past rekey_packets={REKEY_PACKETS}: {result['bytes']} bytes,"
        f" gap {result['max_gap']:.3f}s max, generations {generation} -> {after},"
        f" {early} early registrations"
    )
    assert after > generation and early >= 1
    assert "needs rekeying" in moat_log.read_text()
    assert result["bytes"] > 1_000_000
    assert result["max_gap"] < 1.0
    wait_for(lambda: ping(moat), timeout=30, interval=0.2)

    # a crash: replays still refused, the moat recovers by registering again
    # (first let the last early registration of the upload settle)
    wait_for(lambda: settled(bundle), timeout=60, interval=0.5)
    generation = db.get("m1").sa.generation  # type: ignore[union-attr]
    daemon.kill()
    daemon.wait(20)
    t0 = time.monotonic()
    daemon = start_portal(site, portal, portal_log)
    wait_for(lambda: ping(moat), timeout=120, interval=0.2)
    took = time.monotonic() - t0
    st = status(site)
    print(
        f"portal crash: traffic back {took:.1f}s after the restart"
        f" (no_answer_after={NO_ANSWER}s), replay marks {st['replay_marks']}"
    )
    assert db.get("m1").sa.generation > generation  # type: ignore[union-attr]
    assert "no packet from the portal" in moat_log.read_text()
    assert st["replay_marks"]["restored_with_margin"] >= 1  # type: ignore[index]
    daemon.terminate()
    daemon.wait(20)


def capture(host: Host, iface: str, src: str, pcap: Path) -> subprocess.Popen[bytes]:
    proc = host.popen(
        "tcpdump", "-i", iface, "-n", "-U", "-w", str(pcap),
        f"udp and src host {src} and dst port 4500", stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for(lambda: pcap.exists() and pcap.stat().st_size > 0, timeout=30)
    time.sleep(0.5)  # tcpdump writes the header before it is attached
    return proc


def test_moat_tunnel_restart_refuses_earlier_packets(lab: Lab, tmp_path: Path) -> None:
    pair = TunnelPair(lab, tmp_path)
    pair.sides["b"].extra["state_dir"] = str(tmp_path / "state-b")
    pair.start_both()
    pcap = tmp_path / "a-to-b.pcap"
    tcpdump = capture(pair.b, "wild0", "192.168.77.1", pcap)
    pair.a.run("ping", "-c", "20", "-i", "0.05", "-W", "5", "10.99.0.2")
    tcpdump.terminate()
    tcpdump.wait(10)

    # b restarts with the same keys (SIGTERM: exact marks in state-b)
    pair.procs["b"].terminate()
    pair.procs["b"].wait(timeout=15)
    Path(pair.sides["b"].control).unlink(missing_ok=True)
    pair.start("b")
    res = pair.a.run(sys.executable, "-c", REPLAY, str(pcap), "192.168.77.1",
                     "192.168.77.2", timeout=120)  # fmt: skip
    replayed = int(res.stdout.strip())
    assert replayed >= 5

    def counters() -> dict[str, int]:
        return dict(pair.peer_status("b")["in_sas"][0]["counters"])

    def dropped() -> int:
        c = counters()
        return sum(c.get(k, 0) for k in ("replay", "replay_window", "icv"))

    wait_for(lambda: dropped() >= replayed, timeout=30)
    print(f"moat tunnel restart: {replayed} replayed packets -> {counters()}")
    assert dropped() == replayed  # every replayed packet dropped
    ok = counters().get("ok", 0)  # a's own packets since (path MTU probes)
    pair.a.run("ping", "-c", "3", "-i", "0.2", "-W", "5", "10.99.0.2")
    assert counters()["ok"] >= ok + 3  # the peer's new packets are accepted
