#!/usr/bin/env python3
"""`make bench`: iperf3 single TCP stream through `moat tunnel`, beside a plain
veth and OpenVPN measured in the same run, printed as ratios.

Two namespaces joined by one veth pair carry all traffic; every tunnel and
iperf3 runs inside them. Rounds are interleaved (veth, OpenVPN, moat, veth,
...) so the ratios compare tunnels under the same machine load. State
(certificates, configs, logs) goes to a temporary directory.

    tools/bench_tunnel.py [--rounds 2] [--reps 2] [--time 10]
        [--transform aes-gcm-128] [--encapsulation udp] [--only veth,openvpn,moat]
        [--mtu-policy plain,virtual-large,clamp-mss]

With both virtual-large (AGGFRAG) and clamp-mss measured, their ratio is
printed: the cost of the virtually large MTU on a normal 1500-byte path.

OpenVPN runs as in the reference anchors: 2.6, peer-to-peer over UDP, TLS
with EC P-256 certificates, AES-256-GCM, DCO disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))

from netns import Host, Lab, wait_for  # noqa: E402
from tunnel_pair import TunnelPair  # noqa: E402

IPERF_PORT = 5299


def iperf(client: Host, server: Host, server_ip: str, seconds: int) -> float | None:
    """One iperf3 run; received Mbit/s or None."""
    srv = server.popen("iperf3", "-s", "-1", "-p", str(IPERF_PORT))
    time.sleep(0.5)
    try:
        res = client.run(
            "iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
            check=False, timeout=seconds + 30,
        )  # fmt: skip
        result = json.loads(res.stdout)
        return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6
    except (ValueError, KeyError, subprocess.TimeoutExpired):
        return None
    finally:
        if srv.poll() is None:
            os.killpg(srv.pid, signal.SIGTERM)
        srv.wait(timeout=5)


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total


def child_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The PID of the process `ip netns exec` ran (it execs, so the same)."""
    return [proc.pid]


# tunnels ---------------------------------------------------------------------


class Veth:
    name = "veth"
    server_ip = "192.168.77.2"

    def __init__(self, pair: TunnelPair, tmp: Path) -> None:
        del pair, tmp
        self.pids: list[int] = []

    def up(self) -> None:
        pass

    def down(self) -> None:
        pass


class OpenVpn:
    name = "openvpn"
    server_ip = "10.8.0.2"

    def __init__(
        self, pair: TunnelPair, tmp: Path, cipher: str = "AES-256-GCM"
    ) -> None:
        self.pair = pair
        self.dir = tmp / "openvpn"
        self.cipher = cipher
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def _pki(self) -> Path:
        pki = self.dir / "pki"
        if (pki / "cli.crt").exists():
            return pki
        pki.mkdir(parents=True, exist_ok=True)

        def ssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        ssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=moat-bench-ca")  # fmt: skip
        for name in ("srv", "cli"):
            ssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")  # fmt: skip
            ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt",
                "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.crt",
                "-days", "2")  # fmt: skip
        return pki

    def up(self) -> None:
        pki = self._pki()
        common = [
            "openvpn", "--dev", "tun", "--proto", "udp", "--data-ciphers", self.cipher,
            "--disable-dco", "--dh", "none", "--verb", "3", "--ca", str(pki / "ca.crt"),
            "--ping", "10", "--lport", "1194",
        ]  # fmt: skip
        sides = (
            (self.pair.b, "srv", "--tls-server", "192.168.77.2", "192.168.77.1",
             "10.8.0.2", "10.8.0.1"),
            (self.pair.a, "cli", "--tls-client", "192.168.77.1", "192.168.77.2",
             "10.8.0.1", "10.8.0.2"),
        )  # fmt: skip
        for host, cert, role, local, remote, mine, theirs in sides:
            log = open(self.dir / f"{cert}.log", "wb")  # noqa: SIM115
            self.procs.append(
                host.popen(
                    *common,
                    role,
                    "--cert",
                    str(pki / f"{cert}.crt"),
                    "--key",
                    str(pki / f"{cert}.key"),
                    "--local",
                    local,
                    "--remote",
                    remote,
                    "1194",
                    "--ifconfig",
                    mine,
                    theirs,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
        self.pids = [p.pid for p in self.procs]
        wait_for(
            lambda: (
                "Initialization Sequence Completed"
                in (self.dir / "cli.log").read_text(errors="replace")
            ),
            timeout=60,
            interval=0.3,
        )

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        self.procs.clear()


class Moat:
    server_ip = "10.99.0.2"

    def __init__(self, pair: TunnelPair, tmp: Path, mtu_policy: str = "") -> None:
        del tmp
        self.pair = pair
        side = pair.sides["a"]
        self.mtu_policy = mtu_policy
        self.name = f"moat-{side.encapsulation}-{side.sa_out.transform}"
        if mtu_policy:
            self.name += f"-{mtu_policy}"
        self.pids: list[int] = []

    def up(self) -> None:
        for side in self.pair.sides.values():
            side.extra.pop("mtu_policy", None)
            if self.mtu_policy:
                side.extra["mtu_policy"] = self.mtu_policy
        self.pair.start_both(log_level="WARNING")
        self.pids = [p.pid for p in self.pair.procs.values()]
        wait_for(
            lambda: (
                self.pair.a.run(
                    "ping", "-c1", "-W1", self.server_ip, check=False
                ).returncode
                == 0
            ),
            timeout=20,
        )

    def down(self) -> None:
        for proc in self.pair.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        self.pair.procs.clear()


# the run ---------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="iperf3 runs per round")
    ap.add_argument("--time", type=int, default=10, help="seconds per iperf3 run")
    ap.add_argument("--transform", default="aes-gcm-128")
    ap.add_argument("--encapsulation", default="udp", choices=("udp", "esp"))
    ap.add_argument("--only", default="veth,openvpn,moat")
    ap.add_argument(
        "--mtu-policy",
        default="plain,virtual-large,clamp-mss",
        help="comma-separated moat mtu_policy values, each measured as its own "
        "tunnel (default: plain,virtual-large,clamp-mss)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the runs as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    wanted = args.only.split(",")

    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="moat-bench-") as tmpdir, Lab("mb") as lab:
        tmp = Path(tmpdir)
        pair = TunnelPair(
            lab, tmp, transform=args.transform, encapsulation=args.encapsulation
        )
        makers: dict[str, Callable[[], Veth | OpenVpn]] = {
            "veth": lambda: Veth(pair, tmp),
            "openvpn": lambda: OpenVpn(pair, tmp),
        }
        tunnels: list[Veth | OpenVpn | Moat] = []
        for name in wanted:
            if name == "moat":
                tunnels += [Moat(pair, tmp, p) for p in args.mtu_policy.split(",")]
            else:
                tunnels.append(makers[name]())
        hz = os.sysconf("SC_CLK_TCK")
        for rnd in range(1, args.rounds + 1):
            for tunnel in tunnels:
                tunnel.up()
                try:
                    for rep in range(args.reps):
                        t0, w0 = cpu_ticks(tunnel.pids), time.monotonic()
                        mbps = iperf(pair.a, pair.b, tunnel.server_ip, args.time)
                        ticks = cpu_ticks(tunnel.pids) - t0
                        pct = 100.0 * ticks / hz / (time.monotonic() - w0)
                        print(
                            f"round {rnd} rep {rep + 1} {tunnel.name:24s} "
                            f"{mbps or 0:8.0f} Mbit/s  daemons {pct:4.0f}% of a core",
                            flush=True,
                        )
                        if mbps:
                            results.setdefault(tunnel.name, []).append(mbps)
                            cpu.setdefault(tunnel.name, []).append(pct)
                finally:
                    tunnel.down()

    load = os.getloadavg()[0]
    print(f"\nsummary ({args.rounds} rounds x {args.reps} runs x {args.time} s, "
          f"{os.cpu_count()} CPUs, load {load:.1f})")  # fmt: skip
    medians = {name: statistics.median(v) for name, v in results.items()}
    for name, values in results.items():
        print(
            f"  {name:24s} median {medians[name]:8.0f} Mbit/s  "
            f"min {min(values):6.0f}  max {max(values):6.0f}  n={len(values)}  "
            f"daemons {statistics.median(cpu[name]):4.0f}% of a core"
        )
    for moat in (n for n in medians if n.startswith("moat")):
        for base in ("veth", "openvpn"):
            if base in medians:
                print(f"  ratio {moat}/{base}: {medians[moat] / medians[base]:.3f}")
    large = next((n for n in medians if n.endswith("-virtual-large")), None)
    clamp = next((n for n in medians if n.endswith("-clamp-mss")), None)
    if large and clamp:
        print(
            "  ratio virtual-large/clamp-mss (cost of the virtually large MTU): "
            f"{medians[large] / medians[clamp]:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
