#!/usr/bin/env python3
"""`make bench-portal`: portal scale figures.

    1. synthetic databases of 10,000 and 100,000 registered moats (records
       with SAs and addresses, written by the record writer): portal start
       time (cold: parse every TOML file; warm: from the index cache) and
       resident memory per moat with every moat's peer in the Datapath;
    2. registrations per second through the control socket: the session's
       compare-and-swap write plus `reload` to a running `moat portal run`
       with 10,000 moats, in a namespace;
    3. registrations per second through real OpenSSH sshd: REAL_SSH moats
       register at once (CONCURRENCY ssh clients at a time) from another
       namespace; the figure is extrapolated to a 10,000-moat storm.

Run as root (namespaces). BENCH_PORTAL_SIZES=10000,100000 and
BENCH_PORTAL_SSH=300 change the sizes.
"""

from __future__ import annotations

import datetime as dt
import gc
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

from netns import Lab, wait_for  # noqa: E402
from portal_lab import PortalSite, moat_argv  # noqa: E402

from portal import control  # noqa: E402
from portal.daemon import Portal  # noqa: E402
from portal.db import Database, key_digest  # noqa: E402
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
from portal.session import Origin, register  # noqa: E402
from portal.settings import load_settings  # noqa: E402

SIZES = [
    int(n) for n in os.environ.get("BENCH_PORTAL_SIZES", "10000,100000").split(",")
]
REAL_SSH = int(os.environ.get("BENCH_PORTAL_SSH", "300"))
CONCURRENCY = int(os.environ.get("BENCH_PORTAL_CONCURRENCY", "16"))
CONTROL_REGISTRATIONS = 2000
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
        (db.keys_dir / key_digest(rec.key_blob)).write_text(
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


def bench_control(site: PortalSite) -> float:
    """CAS write + reload through the control socket of a running daemon."""
    db = Database(site.db)
    settings = load_settings(site.db)
    now = dt.datetime.now(dt.UTC)
    count = min(CONTROL_REGISTRATIONS, len(db.load_all().records))
    t0 = time.monotonic()
    for i in range(1, count + 1):
        moat_id = f"m{i:06d}"
        register(db, settings, moat_id, Origin(ipaddress.IPv4Address(MOAT), 40000), now)
        control.request(settings.control, {"op": "reload", "id": moat_id})
    return count / (time.monotonic() - t0)


def bench_ssh(site: PortalSite, moat_host: object, private: dict[str, bytes]) -> float:
    settings = load_settings(site.db)
    db = Database(site.db)
    bundles = site.dir / "ssh-bundles"
    for moat_id, priv in private.items():
        write_file_set(bundles / moat_id, moat_files(settings, db.get(moat_id), priv))

    def one(moat_id: str) -> bool:
        argv = ssh_argv(load_config(bundles / moat_id / "moat.toml"), None)
        res = moat_host.run(*argv, check=False, timeout=300)  # type: ignore[attr-defined]
        return bool(res.returncode == 0 and '"ok": true' in res.stdout)

    # the exact ssh command `moat register` runs (the moat's Python start is
    # the moat's cost, not the portal's; the ssh clients still share the CPU)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        ok = sum(pool.map(one, list(private)))
    took = time.monotonic() - t0
    print(f"  {ok}/{len(private)} registrations through sshd in {took:.1f}s")
    return ok / took


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
            proc = portal_host.popen(*moat_argv("portal", "--db", str(site.db), "run"))
            wait_for(lambda: site.control.exists() or proc.poll() is not None, 300)
            rate = bench_control(site)
            figures["control_registrations_per_s"] = round(rate, 1)
            print(f"  control socket: {rate:.1f} registrations/s")
            if not private:
                proc.terminate()
                proc.wait(30)
                return figures
            rate = bench_ssh(site, moat_host, private)
            figures["sshd_registrations_per_s"] = round(rate, 1)
            figures["sshd_storm_10000_s_extrapolated"] = round(STORM / rate, 1)
            print(
                f"  sshd: {rate:.1f} registrations/s -> a {STORM}-moat storm"
                f" takes ~{STORM / rate:.0f}s (extrapolated)"
            )
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
