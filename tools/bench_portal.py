#!/usr/bin/env python3
"""`make bench-portal`: portal scale figures.

    1. synthetic databases of 10,000 and 100,000 registered moats (records
       with SAs and addresses, written by the record writer): portal start
       time (cold: parse every TOML file; warm: from the index cache) and
       resident memory per moat with every moat's peer in the Datapath;
    2. registrations per second through the control socket of a running
       `moat portal run` with 10,000 moats: `register` requests from
       CONCURRENCY threads (the daemon's own capacity: parse, group commit,
       SAs applied), then the same through the forced command as a process
       per registration (what sshd adds on top is sshd itself);
    3. registrations per second through real OpenSSH sshd: REAL_SSH moats
       register (CONCURRENCY ssh clients at a time, the exact ssh command
       `moat register` runs) from another namespace; extrapolated to a
       10,000-moat storm. CPU seconds are split between sshd (with the key
       lookups and forced commands it runs), the ssh clients (a moat's cost
       on a real portal) and the daemon, beside what the whole box spent.

Every figure is printed with the 1-minute load average beside it (the box is
shared). Run as root (namespaces). BENCH_PORTAL_SIZES=10000,100000,
BENCH_PORTAL_SSH=300, BENCH_PORTAL_CONCURRENCY=32 and BENCH_PORTAL_KEX (the
moats' key exchange order, default the portal's ssh_kex) change the run.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gc
import hashlib
import ipaddress
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))
sys.path.insert(0, str(TOP / "tests"))

from netns import Host, Lab  # noqa: E402
from portal_lab import SSH_USER, PortalSite  # noqa: E402

from portal import control, forced_command  # noqa: E402
from portal.daemon import Portal  # noqa: E402
from portal.db import Database, key_file_name  # noqa: E402
from portal.provision import generate_identity, moat_files, write_file_set  # noqa: E402
from portal.record import (  # noqa: E402
    Learned,
    MoatRecord,
    SaPair,
    normalise_ssh_key,
    record_to_toml,
    spi_for,
)
from portal.register import load_config, ssh_argv  # noqa: E402
from portal.settings import load_settings  # noqa: E402

SIZES = [
    int(n) for n in os.environ.get("BENCH_PORTAL_SIZES", "10000,100000").split(",")
]
REAL_SSH = int(os.environ.get("BENCH_PORTAL_SSH", "300"))
CONCURRENCY = int(os.environ.get("BENCH_PORTAL_CONCURRENCY", "32"))
KEX = os.environ.get("BENCH_PORTAL_KEX", "")
CONTROL_REGISTRATIONS = 2000
PROCESS_REGISTRATIONS = 200
KEY_LOOKUPS = 200
ACTIVATE_SAMPLE = 10_000
STORM = 10_000
PORTAL = "10.99.0.1"
MOAT = "10.99.0.2"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fill(site: PortalSite, n: int, keep_private: int) -> dict[str, bytes]:
    """n registered moats, written straight into moats/ and keys/."""
    db = Database(site.db)
    private: dict[str, bytes] = {}
    now = dt.datetime.now(dt.UTC)
    pool = int(ipaddress.IPv4Network("10.0.0.0/8").network_address)
    t0 = time.monotonic()
    for i in range(1, n + 1):
        moat_id = f"m{i:06d}"
        priv, pub = generate_identity(moat_id)
        if i <= keep_private:
            private[moat_id] = priv
        sa = SaPair(
            1, "aes-gcm-128", spi_for(i, 1, True), os.urandom(20),
            spi_for(i, 1, False), os.urandom(20),
        )  # fmt: skip
        rec = MoatRecord(
            id=moat_id,
            number=i,
            email=f"{moat_id}@example.com",
            ssh_key=normalise_ssh_key(pub),
            wild="dhcp",
            subnet=ipaddress.IPv4Network((pool + 16 * i, 28)),
            version=1,
            learned=Learned(ipaddress.IPv4Address(0x64400000 + i), 4500, now),
            sa=sa,
        )
        # benchmark set-up: plain writes (the tool's own writes use fsync)
        db.path(moat_id).write_text(record_to_toml(rec))
        (db.keys_dir / str(key_file_name(rec.key_blob))).write_text(
            f"{moat_id} {rec.ssh_key}\n"
        )
    print(f"  wrote {n} records in {time.monotonic() - t0:.1f}s")
    return private


def bench_start(site: PortalSite, n: int) -> dict[str, float]:
    """Start (cold: no index; warm: index cache), then every peer built."""
    db = Database(site.db)
    settings = load_settings(site.db)
    db.index_path.unlink(missing_ok=True)
    out: dict[str, float] = {}
    for kind in ("cold", "warm"):
        gc.collect()
        before = rss_kib()
        t0 = time.monotonic()
        portal = Portal(db, settings)
        portal.load(time.monotonic())
        out[f"start_{kind}_s"] = round(time.monotonic() - t0, 2)
        out[f"rss_per_moat_kib_{kind}"] = round((rss_kib() - before) / n, 2)
        assert len(portal.moats) == n, portal.status()
        if kind == "warm":
            # the worst case: every moat sends at once and gets its peer
            sample = min(n, ACTIVATE_SAMPLE)
            before = rss_kib()
            t0 = time.monotonic()
            for moat_id in list(portal.moats)[:sample]:
                assert portal.activate(moat_id, 0.0)
            took = time.monotonic() - t0
            out["peer_build_ms"] = round(took / sample * 1000, 3)
            out["rss_per_peer_kib"] = round((rss_kib() - before) / sample, 2)
        del portal
    return out


def load() -> float:
    return round(os.getloadavg()[0], 1)


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime + stime of a process (+ its waited-for descendants)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def box_busy_seconds() -> float:
    """CPU seconds the whole machine spent (all processes) since boot."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split()[1:8]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _env(n: int) -> dict[bytes, bytes]:
    return {
        b"SSH_ORIGINAL_COMMAND": b"register proto=1",
        b"SSH_CONNECTION": f"{MOAT} {40000 + n % 20000} {PORTAL} 22".encode(),
    }


def bench_control(site: PortalSite, n: int, daemon_pid: int) -> dict[str, object]:
    """`register` over the control socket: threads, then a process each."""
    settings = load_settings(site.db)
    ids = [f"m{i:06d}" for i in range(1, min(n, CONTROL_REGISTRATIONS) + 1)]

    def one(n: int) -> bool:
        argv = ["--socket", settings.control, "--id", ids[n % len(ids)]]
        return forced_command.main(argv, _env(n))[0] == 0

    out: dict[str, object] = {"load_control": load()}
    d0 = cpu_seconds(daemon_pid, children=False)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        ok = sum(pool.map(one, range(len(ids))))
    took = time.monotonic() - t0
    assert ok == len(ids), f"{ok}/{len(ids)}"
    out["control_registrations_per_s"] = round(ok / took, 1)
    out["daemon_cpu_ms_per_registration"] = round(
        (cpu_seconds(daemon_pid, children=False) - d0) / ok * 1000, 2
    )

    # the forced command as sshd runs it: a `python3 -I -S` process each
    command = settings.register_command.split()
    runs = [
        [*command, "--socket", settings.control, "--id", ids[n]]
        for n in range(min(len(ids), PROCESS_REGISTRATIONS))
    ]
    res = site.host.run(sys.executable, "-c", RUNNER, str(CONCURRENCY),
                        input=json.dumps([[a, ENV_REGISTER] for a in runs]),
                        timeout=600)  # fmt: skip
    got = json.loads(res.stdout)
    assert got["ok"] == len(runs), got
    out["forced_command_registrations_per_s"] = round(got["ok"] / got["took"], 1)
    out["forced_command_cpu_ms"] = round(got["cpu"] / got["ok"] * 1000, 1)
    out["load_forced_command"] = load()
    return out


ENV_REGISTER = {
    "SSH_ORIGINAL_COMMAND": "register proto=1",
    "SSH_CONNECTION": f"{MOAT} 40000 {PORTAL} 22",
}

# runs inside a namespace: spawns [argv, env] jobs CONCURRENCY at a time and
# reports the wall time and its children's CPU (no `ip netns exec` per job)
RUNNER = """
import json, resource, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
jobs = json.loads(sys.stdin.read())
def one(job):
    argv, env = job
    t = time.monotonic()
    r = subprocess.run(argv, env=env, capture_output=True, timeout=600)
    ok = r.returncode == 0 and r.stdout.startswith(b'{"ok": true')
    return ok, time.monotonic() - t
t0 = time.monotonic()
with ThreadPoolExecutor(int(sys.argv[1])) as pool:
    results = list(pool.map(one, jobs))
took = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
lat = sorted(r[1] for r in results)
print(json.dumps({"ok": sum(r[0] for r in results), "took": took,
                  "cpu": ru.ru_utime + ru.ru_stime,
                  "p50": lat[len(lat) // 2], "p95": lat[int(len(lat) * 0.95)]}))
"""


def bench_key_lookup(site: PortalSite, private: dict[str, bytes]) -> float:
    """CPU ms of one AuthorizedKeysCommand run (sshd runs it twice a login)."""
    db = Database(site.db)
    jobs = []
    for moat_id in list(private)[:KEY_LOOKUPS]:
        key_type, blob = db.get(moat_id).ssh_key.split()
        digest = hashlib.sha256(base64.b64decode(blob)).digest()
        fingerprint = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
        argv = [str(site.keys_command), SSH_USER, key_type, blob, fingerprint]
        jobs.append([argv, {}])
    res = site.host.run(sys.executable, "-c", RUNNER, "1", input=json.dumps(jobs),
                        timeout=600)  # fmt: skip
    got = json.loads(res.stdout)
    return float(got["cpu"] / len(jobs) * 1000)


def bench_ssh(
    site: PortalSite, moat_host: Host, private: dict[str, bytes], daemon_pid: int
) -> dict[str, object]:
    settings = load_settings(site.db)
    db = Database(site.db)
    bundles = site.dir / "ssh-bundles"
    jobs = []
    for moat_id, priv in private.items():
        write_file_set(bundles / moat_id, moat_files(settings, db.get(moat_id), priv))
        cfg = load_config(bundles / moat_id / "moat.toml")
        if KEX:
            cfg = dataclasses.replace(cfg, kex=KEX)
        # the exact ssh command `moat register` runs (the moat's own Python
        # start is the moat's cost, not the portal's)
        jobs.append([ssh_argv(cfg, None), {"PATH": os.environ["PATH"]}])

    commits0 = control.request(settings.control, {"op": "status"})["counters"]
    sshd0 = cpu_seconds(site.sshd.pid)
    daemon0 = cpu_seconds(daemon_pid, children=False)
    box0 = box_busy_seconds()
    load0 = load()
    res = moat_host.run(sys.executable, "-c", RUNNER, str(CONCURRENCY),
                        input=json.dumps(jobs), timeout=3600)  # fmt: skip
    got = json.loads(res.stdout)
    box = box_busy_seconds() - box0
    sshd = cpu_seconds(site.sshd.pid) - sshd0
    daemon = cpu_seconds(daemon_pid, children=False) - daemon0
    ok = got["ok"]
    rate = ok / got["took"]
    commits = control.request(settings.control, {"op": "status"})["counters"]
    batch = (commits["registered"] - commits0["registered"]) / max(
        1, commits["group_commits"] - commits0["group_commits"]
    )
    print(f"  {ok}/{len(jobs)} registrations through sshd in {got['took']:.1f}s,"
          f" latency p50 {got['p50']:.2f}s p95 {got['p95']:.2f}s")  # fmt: skip

    def per(x: float) -> float:
        return round(x / max(ok, 1) * 1000, 1)

    return {
        "load_before_sshd": load0,
        "load_after_sshd": load(),
        "kex": KEX or settings.ssh_kex,
        "sshd_registrations": f"{ok}/{len(jobs)}",
        "sshd_registrations_per_s": round(rate, 1),
        "sshd_storm_10000_s_extrapolated": round(STORM / rate, 1),
        "cpu_ms_per_registration": {
            "sshd_with_key_lookups_and_forced_command": per(sshd),
            "ssh_clients": per(got["cpu"]),
            "daemon": per(daemon),
            "whole_box": per(box),
            "others_on_the_box": per(box - sshd - got["cpu"] - daemon),
        },
        "registrations_per_group_commit": round(batch, 2),
        "latency_p50_s": round(got["p50"], 2),
        "latency_p95_s": round(got["p95"], 2),
    }


def bench_size(n: int) -> dict[str, object]:
    with Lab("bp") as lab:
        portal_host = lab.host("portal")
        moat_host = lab.host("moat")
        lab.link(portal_host, "eth0", f"{PORTAL}/24", moat_host, "eth0", f"{MOAT}/24")
        site = PortalSite(portal_host, PORTAL)
        try:
            # synthetic subnets come from 10/8: widen the pool to match
            cfg = site.db / "portal.toml"
            cfg.write_text(cfg.read_text().replace("10.200.0.0/16", "10.0.0.0/8"))
            private = fill(site, n, REAL_SSH if n == min(SIZES) else 0)
            figures: dict[str, object] = dict(bench_start(site, n))
            print(f"  start {figures}")
            if n != min(SIZES):
                return figures
            proc = site.start_daemon(site.dir / "portal.log")
            figures.update(bench_control(site, n, proc.pid))
            print(f"  control socket: {figures}")
            if private:
                figures["key_lookup_cpu_ms"] = round(bench_key_lookup(site, private), 1)
                ssh = bench_ssh(site, moat_host, private, proc.pid)
                figures.update(ssh)
                split = ssh["cpu_ms_per_registration"]
                assert isinstance(split, dict)
                split["forced_command"] = figures["forced_command_cpu_ms"]
                split["key_lookups_2x"] = round(2 * figures["key_lookup_cpu_ms"], 1)
                split["sshd_itself"] = round(
                    split["sshd_with_key_lookups_and_forced_command"]
                    - split["forced_command"] - split["key_lookups_2x"], 1
                )  # fmt: skip
                rate = ssh["sshd_registrations_per_s"]
                print(
                    f"  sshd: {rate} registrations/s -> a {STORM}-moat storm"
                    f" takes ~{ssh['sshd_storm_10000_s_extrapolated']}s"
                    f" (extrapolated; load {ssh['load_before_sshd']}"
                    f"..{ssh['load_after_sshd']})"
                )
                print(f"  CPU ms per registration: {split}")
            proc.terminate()
            proc.wait(30)
            return figures
        finally:
            site.close()


def main() -> int:
    results: dict[str, object] = {}
    for n in SIZES:
        print(f"== {n} moats")
        results[str(n)] = bench_size(n)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
