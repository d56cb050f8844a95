"""Interop on the wire with an independent ESP implementation (scapy).

Only side b runs `moat tunnel`. In namespace a a scapy script plays the peer:
it encrypts ICMP echo requests with scapy's SecurityAssociation, sends them
on the wild veth (UDP/4500 or raw protocol 50), receives moat's echo replies
and decrypts them with scapy. So scapy-built packets are accepted by us and
ours decrypt under scapy, for every transform, ESN on and off. (scapy has
no AGGFRAG, so moat runs with mtu_policy "plain" here.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from netns import Lab
from tunnel_pair import TunnelPair

pytestmark = pytest.mark.netns

PEER_SCRIPT = r"""
import json, socket, sys
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation

args = json.loads(sys.argv[1])
ALGOS = {
    "aes-gcm-128": ("AES-GCM", None), "aes-gcm-256": ("AES-GCM", None),
    "chacha20-poly1305": ("CHACHA20-POLY1305", None),
    "aes-cbc-hmac-sha256": ("AES-CBC", "SHA2-256-128"),
    "3des-cbc-hmac-sha1": ("3DES", "HMAC-SHA1-96"),
}
udp = args["encapsulation"] == "udp"
ME, PEER = "192.168.77.1", "192.168.77.2"


def sa(spec, src, dst):
    crypt, auth = ALGOS[spec["transform"]]
    kw = dict(auth_algo=auth, auth_key=bytes.fromhex(spec["auth_key"])) if auth else {}
    return SecurityAssociation(
        ESP, spi=spec["spi"], crypt_algo=crypt, crypt_key=bytes.fromhex(spec["key"]),
        tunnel_header=IP(src=src, dst=dst),
        nat_t_header=UDP(sport=4500, dport=4500) if udp else None,
        esn_en=spec["esn"], esn=0, **kw,
    )


out_sa = sa(args["out"], ME, PEER)
in_sa = sa(args["in"], PEER, ME)
if udp:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ME, 4500))
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
sock.settimeout(10)
replies = 0
for i in range(1, 4):
    marker = b"interop-%d-" % i + b"z" * 40
    inner = IP(src="10.99.0.1", dst="10.99.0.2") / ICMP(id=0x4D, seq=i) / marker
    wire = out_sa.encrypt(inner)
    esp = bytes(wire[UDP].payload) if udp else bytes(wire[IP].payload)
    sock.sendto(esp, (PEER, 4500 if udp else 0))
    while True:
        data, addr = sock.recvfrom(65535)
        if udp:
            if len(data) < 8:
                continue  # NAT keepalive
            pkt = IP(bytes(IP(src=PEER, dst=ME) / UDP(sport=4500, dport=4500) / data))
        else:
            pkt = IP(data)
        break
    plain = in_sa.decrypt(pkt)
    assert plain[ICMP].type == 0 and plain[ICMP].seq == i, plain.show(dump=True)
    assert bytes(plain[ICMP].payload) == marker
    assert plain[IP].src == "10.99.0.2" and plain[IP].dst == "10.99.0.1"
    replies += 1
print("replies", replies)
"""

CASES = [
    ("udp", "aes-gcm-128", True),
    ("udp", "aes-gcm-128", False),
    ("udp", "aes-gcm-256", True),
    ("udp", "chacha20-poly1305", True),
    ("udp", "chacha20-poly1305", False),
    ("udp", "aes-cbc-hmac-sha256", True),
    ("udp", "aes-cbc-hmac-sha256", False),
    ("udp", "3des-cbc-hmac-sha1", True),
    ("esp", "aes-gcm-128", True),
    ("esp", "aes-cbc-hmac-sha256", False),
]


@pytest.mark.parametrize(
    ("encapsulation", "transform", "esn"),
    CASES,
    ids=[f"{e}-{t}-{'esn' if n else 'noesn'}" for e, t, n in CASES],
)
def test_scapy_peer(
    lab: Lab, tmp_path: Path, encapsulation: str, transform: str, esn: bool
) -> None:
    pair = TunnelPair(lab, tmp_path, transform, encapsulation, esn)
    # a classic ESP peer: inner packets as they are, no AGGFRAG (RFC 9347)
    pair.sides["b"].extra["mtu_policy"] = "plain"
    pair.start("b")
    b = pair.sides["b"]
    spec = {
        "encapsulation": encapsulation,
        # scapy plays a: it sends on b's inbound SA, receives on b's outbound
        "out": vars(b.sa_in),
        "in": vars(b.sa_out),
    }
    res = pair.a.run(
        sys.executable, "-c", PEER_SCRIPT, json.dumps(spec), check=False, timeout=90
    )
    assert res.returncode == 0, res.stdout + res.stderr + pair.log("b")
    assert "replies 3" in res.stdout
    status = pair.peer_status("b")
    assert status["in_sas"][0]["counters"].get("ok") == 3
    assert status["out_sa"]["seq"] == 3
