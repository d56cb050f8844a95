"""`moat dns` against real peers in namespaces: BIND 9 as the corporate primary
(AXFR, NOTIFY + IXFR), BIND 9 as the corporate resolver, dig as the LAN client.

    client 192.168.50.10 ── 192.168.50.1 moat 10.99.0.2 ── 10.99.0.1 primary
                                             10.99.1.2 ── 10.99.1.1 resolver
                                                          10.99.1.3 (spoofer)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from netns import Host, Lab, wait_for

pytestmark = pytest.mark.netns

ZONE = "corp.example"
PRIMARY, MOAT_WAN, MOAT_LAN = "10.99.0.1", "10.99.0.2", "192.168.50.1"
NET_ZONE = "example.net.zone"
TSIG_NAME = "moat-xfr"
TSIG_SECRET = "bW9hdC10ZXN0LXRzaWctc2VjcmV0LTMyLWJ5dGVzISE="
RESOLVER, SPOOFER, MOAT_UP = "10.99.1.1", "10.99.1.3", "10.99.1.2"


def zone_text(serial: int, extra: str = "") -> str:
    # refresh 5 s, expire 8 s: lets the test watch the copy outlive SOA EXPIRE
    return textwrap.dedent(f"""\
        $TTL 300
        @   IN SOA ns1.{ZONE}. hostmaster.{ZONE}. ({serial} 5 2 8 60)
            IN NS  ns1.{ZONE}.
        ns1 IN A   {PRIMARY}
        www IN A   10.20.0.80
        intranet IN CNAME www
        {extra}
        """)


def named_conf(state: Path, address: str, zones: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        options {{
            directory "{state}";
            pid-file "{state}/named.pid";
            listen-on port 53 {{ {address}; }};
            listen-on-v6 {{ none; }};
            recursion no;
            dnssec-validation no;
            {extra}
        }};
        {zones}
        """)


def spawn_logged(host: Host, log: Path, *argv: str) -> subprocess.Popen:
    with open(log, "a") as out:
        return host.popen(*argv, stdout=out, stderr=subprocess.STDOUT)


def start_named(host: Host, state: Path, conf: str) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "named.conf").write_text(conf)
    conf_path = str(state / "named.conf")
    spawn_logged(
        host, state / "named.log", "named", "-g", "-u", "root", "-c", conf_path
    )


def dig(host: Host, name: str, rdtype: str = "A", server: str = MOAT_LAN) -> str:
    res = host.run(
        "dig",
        f"@{server}",
        name,
        rdtype,
        "+tries=1",
        "+time=3",
        "+noall",
        "+answer",
        "+comments",
        check=False,
    )
    return res.stdout


def answer_line(out: str, name: str) -> list[str] | None:
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == name and not line.startswith(";"):
            return fields
    return None


def status(moat: Host, moat_cmd: list[str], cfg: Path) -> dict:
    res = moat.run(*moat_cmd, "dns", "--config", str(cfg), "--status")
    return json.loads(res.stdout)


def status_until(moat: Host, moat_cmd: list[str], cfg: Path, check) -> dict:
    """The status once `check(status)` holds (the file is rewritten each second)."""
    seen: list[dict] = []

    def probe() -> bool:
        seen.append(status(moat, moat_cmd, cfg))
        try:
            return bool(check(seen[-1]))
        except KeyError:  # that counter not yet counted
            return False

    try:
        wait_for(probe, timeout=10, interval=0.3)
    except AssertionError:
        raise AssertionError(f"status never matched: {seen[-1]}") from None
    return seen[-1]


@pytest.fixture
def net(lab: Lab, tmp_path: Path) -> dict:
    moat, client = lab.host("moat"), lab.host("client")
    primary, resolver = lab.host("prim"), lab.host("resv")
    lab.link(client, "eth0", "192.168.50.10/24", moat, "lan0", f"{MOAT_LAN}/24")
    lab.link(moat, "wan0", f"{MOAT_WAN}/24", primary, "eth0", f"{PRIMARY}/24")
    lab.link(moat, "up0", f"{MOAT_UP}/24", resolver, "eth0", f"{RESOLVER}/24")
    resolver.ip("addr", "add", f"{SPOOFER}/24", "dev", "eth0")

    # the corporate primary
    pstate = tmp_path / "primary"
    pstate.mkdir()
    (pstate / f"{ZONE}.zone").write_text(zone_text(1))
    start_named(
        primary,
        pstate,
        named_conf(
            pstate,
            PRIMARY,
            # transfers and NOTIFY signed with TSIG (RFC 8945)
            f'key "{TSIG_NAME}" {{ algorithm hmac-sha256; secret "{TSIG_SECRET}"; }};\n'
            f'zone "{ZONE}" {{ type primary; file "{pstate}/{ZONE}.zone"; }};',
            f"allow-transfer {{ key {TSIG_NAME}; }}; ixfr-from-differences yes; "
            f"notify explicit; also-notify {{ {MOAT_WAN} key {TSIG_NAME}; }}; "
            f"notify-source {PRIMARY};",
        ),
    )

    # the corporate resolver, authoritative for a test zone
    rstate = tmp_path / "resolver"
    rstate.mkdir()
    (rstate / "example.net.zone").write_text(
        textwrap.dedent("""\
        $TTL 120
        @    IN SOA ns.example.net. h.example.net. (1 3600 600 86400 30)
             IN NS ns.example.net.
        ns   IN A 10.99.1.1
        web  IN A 198.51.100.7
        """)
    )
    start_named(
        resolver,
        rstate,
        named_conf(
            rstate,
            RESOLVER,
            f'zone "example.net" {{ type primary; file "{rstate}/{NET_ZONE}"; }};',
        ),
    )
    for host, addr, name in (
        (primary, PRIMARY, f"ns1.{ZONE}"),
        (resolver, RESOLVER, "web.example.net"),
    ):
        wait_for(lambda h=host, a=addr, n=name: "NOERROR" in dig(h, n, server=a), 30)

    # the moat
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.50.10 laptop\n192.168.50.11 printer.lan\nbad line\n")
    cfg = tmp_path / "dns.toml"
    cfg.write_text(
        textwrap.dedent(f"""\
        listen = ["{MOAT_LAN}", "{MOAT_WAN}"]
        state_dir = "{tmp_path}/var"
        status_file = "{tmp_path}/run/dns.json"
        allow_query = ["192.168.50.0/24"]
        [[zone]]
        name = "{ZONE}"
        primaries = ["{PRIMARY}"]
        tsig_name = "{TSIG_NAME}"
        tsig_secret = "{TSIG_SECRET}"
        max_age = 3600
        transfer_timeout = 2
        [forward]
        resolvers = ["{RESOLVER}"]
        timeout = 1.5
        [cache]
        max_ttl = 100
        [local]
        domain = "lan"
        hosts_file = "{hosts}"
        """)
    )
    return {
        "lab": lab,
        "moat": moat,
        "client": client,
        "primary": primary,
        "resolver": resolver,
        "cfg": cfg,
        "pstate": pstate,
        "tmp": tmp_path,
    }


def start_moat(net: dict, moat_cmd: list[str]) -> subprocess.Popen:
    log = net["tmp"] / "moat-dns.log"
    argv = [*moat_cmd, "dns", "--config", str(net["cfg"]), "-vv"]
    proc = spawn_logged(net["moat"], log, *argv)
    wait_for(lambda: "status:" in dig(net["client"], "laptop.lan"), timeout=20)
    return proc


def test_secondary_forwarder_local_names(net: dict, moat_cmd: list[str]) -> None:
    moat, client, cfg = net["moat"], net["client"], net["cfg"]
    proc = start_moat(net, moat_cmd)

    # AXFR at start; authoritative answers, CNAME inside the zone, NXDOMAIN
    wait_for(lambda: answer_line(dig(client, f"www.{ZONE}"), f"www.{ZONE}."), 20)
    out = dig(client, f"intranet.{ZONE}")
    assert "flags: qr aa" in out and "10.20.0.80" in out
    assert "status: NXDOMAIN" in dig(client, f"nope.{ZONE}")
    status_until(
        moat,
        moat_cmd,
        cfg,
        lambda st: st["zones"][0]["serial"] == 1 and st["zones"][0]["axfr"] == 1,
    )

    # local names: A and PTR
    assert answer_line(dig(client, "laptop.lan"), "laptop.lan.")[-1] == "192.168.50.10"
    ptr = dig(client, "11.50.168.192.in-addr.arpa", "PTR")
    assert answer_line(ptr, "11.50.168.192.in-addr.arpa.")[-1] == "printer.lan."
    assert "status: NXDOMAIN" in dig(client, "ghost.lan")

    # a change on the primary arrives by NOTIFY + IXFR
    (net["pstate"] / f"{ZONE}.zone").write_text(zone_text(2, "mail IN A 10.20.0.25"))
    net["primary"].run("sh", "-c", f"kill -HUP $(cat {net['pstate']}/named.pid)")
    wait_for(lambda: answer_line(dig(client, f"mail.{ZONE}"), f"mail.{ZONE}."), 20)
    status_until(
        moat,
        moat_cmd,
        cfg,
        lambda st: (
            st["zones"][0]["serial"] == 2
            and st["zones"][0]["ixfr"] == 1
            and st["zones"][0]["notify"] >= 1
        ),
    )

    # no resolver for the other side: the primary's side may only NOTIFY
    assert "status: REFUSED" in dig(net["primary"], "www.corp.example", server=MOAT_WAN)

    # NOTIFY from anyone but the primary is refused
    notify = client.run(
        sys.executable,
        "-c",
        textwrap.dedent(f"""\
        import dns.message, dns.opcode, dns.query, dns.rcode
        q = dns.message.make_query("{ZONE}", "SOA")
        q.set_opcode(dns.opcode.NOTIFY)
        r = dns.query.udp(q, "{MOAT_LAN}", timeout=3)
        print(dns.rcode.to_text(r.rcode()))
        """),
    )
    assert notify.stdout.strip() == "REFUSED"

    # forwarding and cache: second answer from the cache with a lower TTL
    first = answer_line(dig(client, "web.example.net"), "web.example.net.")
    assert first and first[-1] == "198.51.100.7" and int(first[1]) == 100
    status_until(
        moat, moat_cmd, cfg, lambda st: st["upstream"]["upstream_queries"] == 1
    )
    time.sleep(1.2)
    neg = dig(client, "nothing.example.net")
    assert "status: NXDOMAIN" in neg

    # cut the primary and the resolver off: corporate answers and cache remain
    moat.ip("link", "set", "wan0", "down")
    moat.ip("link", "set", "up0", "down")
    second = answer_line(dig(client, "web.example.net"), "web.example.net.")
    assert second and second[-1] == "198.51.100.7" and int(second[1]) < 100
    assert "status: NXDOMAIN" in dig(client, "nothing.example.net")
    status_until(
        moat,
        moat_cmd,
        cfg,
        lambda st: (
            st["upstream"]["upstream_queries"] == 2  # the NXDOMAIN one
            and st["cache"]["hits"] == 2
        ),
    )
    out = dig(client, f"www.{ZONE}")
    assert "10.20.0.80" in out
    # past SOA expire (8 s) the copy is served by local policy, and says so
    wait_for(
        lambda: status(moat, moat_cmd, cfg)["zones"][0]["serving"] == "past-expire",
        timeout=25,
        interval=0.5,
    )
    assert "10.20.0.80" in dig(client, f"www.{ZONE}")
    assert "status: SERVFAIL" in dig(client, "other.example.org")  # no upstream
    assert "status: SERVFAIL" in dig(client, "more.example.org")  # without waiting
    status_until(
        moat,
        moat_cmd,
        cfg,
        lambda st: st["upstream"]["upstream_down_fast_fail"] == 1,
    )

    # restart during the outage: the copy on disk is served at once
    proc.terminate()
    assert proc.wait(10) == 0
    start_moat(net, moat_cmd)
    out = dig(client, f"mail.{ZONE}")
    assert "flags: qr aa" in out and "10.20.0.25" in out
    status_until(
        moat,
        moat_cmd,
        cfg,
        lambda st: st["pid"] != proc.pid and st["zones"][0]["serving"] == "past-expire",
    )


SPOOFER_SCRIPT = """\
import socket, sys, dns.message, dns.rcode
real, spoof = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((real, 53))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.bind((real, 5353))
liar = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
liar.bind((spoof, 53))
print("ready", flush=True)
while True:
    wire, peer = sock.recvfrom(4096)
    q = dns.message.from_wire(wire)
    print(peer[1], q.id, flush=True)
    def answer(addr, qid=None, name=None):
        asked = q
        if name is not None:
            asked = dns.message.make_query(name, "A")
            asked.id = q.id
        r = dns.message.make_response(asked)
        r.answer.append(dns.rrset.from_text(
            asked.question[0].name, 60, "IN", "A", addr))
        if qid is not None:
            r.id = qid
        return r.to_wire()
    liar.sendto(answer("6.6.6.1"), peer)              # wrong source address
    other.sendto(answer("6.6.6.2"), peer)             # wrong source port
    sock.sendto(answer("6.6.6.3", qid=(q.id + 1) % 65536), peer)  # wrong id
    sock.sendto(answer("6.6.6.4", name="evil.example.net."), peer)  # wrong question
    sock.sendto(answer("203.0.113.9"), peer)          # the real one
"""


def test_forwarder_ignores_spoofed_replies(
    lab: Lab, tmp_path: Path, moat_cmd: list[str]
) -> None:
    moat, client, resolver = lab.host("moat"), lab.host("client"), lab.host("resv")
    lab.link(client, "eth0", "192.168.50.10/24", moat, "lan0", f"{MOAT_LAN}/24")
    lab.link(moat, "up0", f"{MOAT_UP}/24", resolver, "eth0", f"{RESOLVER}/24")
    resolver.ip("addr", "add", f"{SPOOFER}/24", "dev", "eth0")
    script = tmp_path / "spoofer.py"
    script.write_text(SPOOFER_SCRIPT)
    spoofer = resolver.popen(
        sys.executable,
        str(script),
        RESOLVER,
        SPOOFER,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert spoofer.stdout is not None and spoofer.stdout.readline() == "ready\n"
    cfg = tmp_path / "dns.toml"
    cfg.write_text(
        textwrap.dedent(f"""\
        listen = ["{MOAT_LAN}"]
        state_dir = "{tmp_path}/var"
        status_file = "{tmp_path}/run/dns.json"
        [forward]
        resolvers = ["{RESOLVER}"]
        """)
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("192.168.50.10 laptop\n")
    argv = [*moat_cmd, "dns", "--config", str(cfg), "--hosts", str(hosts), "-vv"]
    spawn_logged(moat, tmp_path / "moat-dns.log", *argv)
    wait_for(lambda: "192.168.50.10" in dig(client, "laptop.lan"), timeout=20)

    out = dig(client, "host.example.net")
    line = answer_line(out, "host.example.net.")
    assert line and line[-1] == "203.0.113.9", out
    assert "6.6.6." not in out
    status_until(
        moat,
        moat_cmd,
        cfg,
        lambda st: (
            st["upstream"].get("upstream_wrong_source") == 2
            and st["upstream"].get("upstream_wrong_id") == 1
            and st["upstream"].get("upstream_wrong_question") == 1
        ),
    )

    # every upstream query has its own random source port and ID
    seen = [spoofer.stdout.readline().split()]
    for i in range(4):
        assert "203.0.113.9" in dig(client, f"h{i}.example.net")
        seen.append(spoofer.stdout.readline().split())
    ports, ids = {p for p, _ in seen}, {q for _, q in seen}
    assert len(ports) >= 4 and len(ids) >= 4, seen  # 16-bit draws may collide

    # garbage on UDP and TCP: counted drops or FORMERR; the server keeps answering
    client.run(sys.executable, "-c", GARBAGE_SCRIPT, MOAT_LAN)
    assert "203.0.113.9" in dig(client, "after.example.net")
    st = status(moat, moat_cmd, cfg)["queries"]
    assert st.get("servfail_internal", 0) == 0, st


GARBAGE_SCRIPT = """\
import random, socket, sys
rng = random.Random(4)
server = sys.argv[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
query = bytes.fromhex("abcd01000001000000000000" "0377777704636f7270000001" "0001")
for i in range(300):
    if i % 2:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    else:
        data = bytearray(query)
        for _ in range(3):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[: rng.randrange(len(data) + 1)])
    udp.sendto(data, (server, 53))
for payload in (b"\\x00\\x05hello", b"\\xff\\xff" + bytes(100), b"\\x00"):
    tcp = socket.create_connection((server, 53), timeout=3)
    tcp.sendall(payload)
    tcp.close()
"""
