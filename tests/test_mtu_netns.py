"""The virtually-large MTU against real TCP stacks (network namespaces).

Figure 5 of the black-hole problem: a 10 MB download from a well-behaved and
from a "naughty" server through the tunnel, across an interior MTU of 1280
(and 576) with all ICMP dropped, for each MTU policy. virtual-large must
always complete; classic must hang against the naughty server (which proves
the black hole is real). UDP packets of 1500, 9000 and 65535 bytes with DF
cross a 576-byte path whole. Loss: nftables drops outer packets at random on
the router, and reordering by an HTB class that holds back 5 % of them (this
kernel has no sch_netem).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from figure5 import UDP_SEND, UDP_SINK, Figure5, expected_sha256, table
from netns import Lab

pytestmark = pytest.mark.netns

SIZE = 10_000_000
HANG_TIMEOUT = 12.0  # a download that has not finished by then is stuck
OK_TIMEOUT = 90.0
NFT_REORDER = """
table inet reorder {
  chain postrouting_prio {
    type filter hook postrouting priority 0;
    oifname "eth0" meta l4proto udp numgen random mod 100 < 5 meta priority set 1:20
  }
}
"""


def run_policy(
    fig: Figure5, policy: str, mtu: int, servers: tuple[str, ...], tag: str
) -> list[dict[str, Any]]:
    fig.start_tunnels(policy, tag)
    try:
        fig.wait_converged(mtu)
        rows = []
        for server in servers:
            timeout = HANG_TIMEOUT if policy == "classic" else OK_TIMEOUT
            result = fig.download(server, timeout)
            if result["done"]:
                assert result["bytes"] == SIZE
                assert result["sha256"] == expected_sha256(SIZE)
            rows.append({"mtu": mtu, "policy": policy, "server": server, **result})
        return rows
    finally:
        fig.stop_tunnels()


def test_figure5_policies_at_1280(lab: Lab, tmp_path: Path) -> None:
    fig = Figure5(lab, tmp_path, interior_mtu=1280)
    fig.serve(SIZE)
    rows: list[dict[str, Any]] = []
    for policy in ("virtual-large", "clamp-mss", "classic"):
        rows += run_policy(fig, policy, 1280, ("good", "naughty"), policy)
    print("\n" + table(rows))
    (tmp_path / "table.md").write_text(table(rows) + "\n")
    done = {(r["policy"], r["server"]): r["done"] for r in rows}
    assert done[("virtual-large", "good")] and done[("virtual-large", "naughty")]
    assert done[("clamp-mss", "good")] and done[("clamp-mss", "naughty")]
    assert done[("classic", "good")]  # it learns from our ICMP
    assert not done[("classic", "naughty")]  # the black hole
    naughty = next(
        r for r in rows if r["policy"] == "classic" and r["server"] == "naughty"
    )
    assert naughty["retransmits"] > 0


def test_figure5_virtual_large_at_576(lab: Lab, tmp_path: Path) -> None:
    fig = Figure5(lab, tmp_path, interior_mtu=576)
    fig.serve(SIZE)
    rows = run_policy(fig, "virtual-large", 576, ("good", "naughty"), "vl576")
    print("\n" + table(rows))
    assert all(r["done"] for r in rows)


def test_udp_df_any_size_crosses_576(lab: Lab, tmp_path: Path) -> None:
    fig = Figure5(lab, tmp_path, interior_mtu=576)
    fig.start_tunnels("virtual-large", "udp")
    try:
        fig.wait_converged(576)
        sink = fig.hosts["good"].popen(
            "python3", "-c", UDP_SINK, "6000", "10", stdout=subprocess.PIPE, text=True
        )
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "ready"
        sent = fig.hosts["client"].run(
            "python3", "-c", UDP_SEND, "10.2.2.10", "6000", "1500", "9000", "65535"
        )
        want = sent.stdout.splitlines()
        got = [sink.stdout.readline().strip() for _ in want]
        assert got == want  # whole, byte-identical, in order
        assert [int(line.split()[0]) + 28 for line in got] == [1500, 9000, 65535]
    finally:
        fig.stop_tunnels()


def test_reassembly_under_loss_and_reordering(lab: Lab, tmp_path: Path) -> None:
    fig = Figure5(lab, tmp_path, interior_mtu=1280)
    fig.serve(SIZE)
    fig.start_tunnels("virtual-large", "loss")
    try:
        fig.wait_converged(1280)
        r1 = fig.hosts["r1"]
        # 2 % of the outer packets in each direction vanish on r1
        r1.run(
            "nft", "add", "rule", "inet", "noicmp", "forward_filter", "meta",
            "l4proto", "udp", "numgen", "random", "mod", "100", "<", "2", "drop",
        )  # fmt: skip
        # and 5 % of those toward the moat wait in a slow HTB class while the
        # others pass them (no sch_netem here: HTB + nft "meta priority")
        r1.run("tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
               "default", "10")  # fmt: skip
        for classid, rate in (("1:10", "10gbit"), ("1:20", "20mbit")):
            r1.run("tc", "class", "add", "dev", "eth0", "parent", "1:", "classid",
                   classid, "htb", "rate", rate)  # fmt: skip
        r1.run("nft", "-f", "-", input=NFT_REORDER)
        result = fig.download("good", OK_TIMEOUT)
        assert result["done"] and result["sha256"] == expected_sha256(SIZE)
        (reasm,) = fig.status("moat")["policy"]["reassembly"].values()
        counters = reasm["counters"]
        assert counters.get("reordered", 0) > 0
        dropped = ("partial_window", "partial_timeout", "too_old")
        assert sum(counters.get(k, 0) for k in dropped) > 0
        assert reasm["held_bytes"] <= 1 << 20
        print(f"\nloss and reordering: {result}\nmoat reassembly {reasm}")
    finally:
        fig.stop_tunnels()
