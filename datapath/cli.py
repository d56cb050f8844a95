"""`moat tunnel`: a manually keyed ESP tunnel to one peer.

    moat tunnel --config FILE            bring the tunnel up (until SIGTERM)
    moat tunnel --config FILE --check    only validate the file
    moat tunnel --status [--config FILE | --control PATH] [--json]

SIGHUP re-reads the file and applies new SAs make-before-break (the TUN
device, routes and sockets stay); a file that no longer parses is reported
and ignored.

With `tunnel.state_dir` set, a restart with the same keys neither reuses an
outbound sequence number (datapath/seqstore.py) nor accepts again a packet
received before it (inbound replay marks, datapath/replaymarks.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from datapath import config as tunnel_config
from datapath.config import SASpec, TunnelConfig
from datapath.esp import EspError, InboundSA, OutboundSA, SAConfig
from datapath.loop import ControlServer, EventLoop, query
from datapath.outer import OuterSocket, RawEspSocket, UdpSocket
from datapath.replaymarks import ReplayMarks
from datapath.selector import Selectors
from datapath.seqstore import SequenceStore
from datapath.tun import MAX_PACKET, Tun
from datapath.tunnel import Datapath, Peer, mtu_policy_factory
from moat.errors import ConfigError, MoatError

log = logging.getLogger(__name__)

REPLAY_FILE = "replay.json"  # in tunnel.state_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Bring up a manually keyed IPsec ESP tunnel (TUN device <-> ESP in "
        "UDP/4500 or raw IP protocol 50) from a TOML file. SIGHUP reloads the "
        "SAs without dropping the tunnel."
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="tunnel TOML file")
    parser.add_argument(
        "--check", action="store_true", help="validate the file and exit"
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="print the SAs and counters of the running tunnel",
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="control socket (default: from --config, else "
        f"{tunnel_config.DEFAULT_CONTROL_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="--status as JSON")


def run(args: argparse.Namespace) -> int:
    if args.status:
        return _status(args)
    if not args.config:
        raise ConfigError("", "--config", "missing (the tunnel TOML file)")
    cfg = tunnel_config.load(args.config)
    peer = build_peer(cfg)
    if args.check:
        print(
            f"{args.config}: ok ({cfg.encapsulation}, {cfg.sa_out.transform}, "
            f"inner MTU {peer.inner_mtu})"
        )
        return 0
    return Tunnel(args.config, cfg, peer).run()


# building SAs and peers from the file


def sa_config(spec: SASpec, field: str, source: str) -> SAConfig:
    try:
        return SAConfig(
            spi=spec.spi,
            transform=spec.transform,
            key=spec.key,
            auth_key=spec.auth_key,
            replay_window=spec.replay_window,
            esn=spec.esn,
        )
    except (EspError, ValueError) as exc:
        raise ConfigError(source, field, str(exc)) from None


def build_sas(cfg: TunnelConfig) -> tuple[OutboundSA, InboundSA]:
    selectors = Selectors(cfg.local_subnets, cfg.remote_subnets)
    out_cfg = sa_config(cfg.sa_out, "sa.out", cfg.source)
    in_cfg = sa_config(cfg.sa_in, "sa.in", cfg.source)
    soft_limit = cfg.rekey_packets or None
    try:
        return OutboundSA(out_cfg, soft_limit), InboundSA(in_cfg, selectors)
    except (EspError, ValueError) as exc:
        raise ConfigError(cfg.source, "sa", str(exc)) from None


def build_peer(cfg: TunnelConfig) -> Peer:
    out_sa, in_sa = build_sas(cfg)
    try:
        mtu_policy_factory(cfg.mtu_policy)
    except KeyError:
        raise ConfigError(
            cfg.source,
            "tunnel.mtu_policy",
            f"{cfg.mtu_policy!r} is not available in this build",
        ) from None
    port = cfg.outer.remote_port if cfg.encapsulation == "udp" else 0
    return Peer(
        name=cfg.name,
        out_sa=out_sa,
        in_sa=in_sa,
        endpoint=(str(cfg.outer.remote), port),
        encapsulation=cfg.encapsulation,
        local_subnets=cfg.local_subnets,
        remote_subnets=cfg.remote_subnets,
        keepalive=cfg.keepalive,
        mtu_policy=cfg.mtu_policy,
        outer_mtu=cfg.outer.mtu,
    )


def default_tun_mtu(peer: Peer) -> int:
    """TUN MTU when the config gives none: what the MTU policy can take."""
    if peer.mtu_policy_name in ("virtual-large", "aggfrag"):
        return MAX_PACKET  # any packet crosses: a virtually large MTU
    if peer.mtu_policy_name in ("classic", "clamp-mss"):
        return peer.outer_mtu  # larger packets reach the policy's ICMP
    return peer.inner_mtu


class Tunnel:
    """The running `moat tunnel`: TUN device, one socket, one peer."""

    def __init__(self, path: str, cfg: TunnelConfig, peer: Peer) -> None:
        self.path = path
        self.cfg = cfg
        self.peer = peer
        self.dp = Datapath(rekey_grace=cfg.rekey_grace)
        self.sock: OuterSocket | None = None
        self.seqs = SequenceStore(cfg.state_dir) if cfg.state_dir else None
        self.marks = (
            ReplayMarks(Path(cfg.state_dir) / REPLAY_FILE) if cfg.state_dir else None
        )

    def run(self) -> int:
        cfg = self.cfg
        tun = Tun(cfg.tun.name, vnet_hdr=cfg.tun.coalesce)
        sock: OuterSocket | None = None
        control: ControlServer | None = None
        try:
            sock = self._open_socket()
            mtu = cfg.tun.mtu or default_tun_mtu(self.peer)
            tun.set_mtu(mtu)
            tun.set_txqueuelen(cfg.tun.txqueuelen)
            for address in cfg.tun.addresses:
                tun.add_address(address)
            tun.set_up()
            for prefix in cfg.tun.routes:
                tun.add_route(prefix)
            if self.seqs is not None:
                self.seqs.attach(self.peer.out_sa)
            else:
                log.warning(
                    "no tunnel.state_dir: after a restart, use new keys "
                    "(the same key would repeat sequence numbers and nonces, "
                    "and packets received before it could be replayed)"
                )
            if self.marks is not None:
                self.marks.restore(self.peer.in_sa)
                self.marks.begin(time.monotonic())
            self.dp.add_peer(self.peer, time.monotonic())
            control = ControlServer(cfg.control_socket, self.status)
            loop = EventLoop(
                self.dp,
                tun,
                {cfg.encapsulation: sock},
                control,
                on_reload=self.reload,
                on_tick=self.tick,
            )
            self.sock = sock
            log.info(
                "tunnel up: %s, %s %s -> %s, TUN MTU %d",
                tun.name,
                cfg.encapsulation,
                cfg.outer.local,
                cfg.outer.remote,
                mtu,
            )
            loop.run()
            if self.marks is not None:
                self.marks.save(self._receiving(), time.monotonic(), clean=True)
            log.info("tunnel down")
            return 0
        finally:
            if control is not None:
                control.close()
            if sock is not None:
                sock.close()
            tun.close()

    def _open_socket(self) -> OuterSocket:
        cfg = self.cfg
        try:
            if cfg.encapsulation == "udp":
                return UdpSocket(cfg.outer.local, cfg.outer.port)
            return RawEspSocket(cfg.outer.local)
        except OSError as exc:
            raise MoatError(
                f"cannot open the {cfg.encapsulation} socket on {cfg.outer.local}: "
                f"{exc.strerror}"
            ) from None

    def status(self) -> dict[str, Any]:
        status = self.dp.status()
        status["config"] = self.path
        status["tun"] = self.cfg.tun.name
        status["socket"] = dict(self.sock.counters) if self.sock else {}
        return status

    def tick(self, now: float) -> None:
        """About once a second: sequence reservations ahead, replay marks saved."""
        if self.seqs is not None:
            for sa in (self.peer.out_sa, self.peer.pending_out):
                if sa is not None:
                    self.seqs.poll(sa)
        if self.marks is not None and self.marks.due(self._receiving(), now):
            self.marks.save(self._receiving(), now)

    def _receiving(self) -> list[InboundSA]:
        return [entry.sa for entry in self.dp.spis.values()]

    def reload(self) -> None:
        """SIGHUP: apply a changed file without dropping the tunnel."""
        try:
            new = tunnel_config.load(self.path)
            if new.sa_out != self.cfg.sa_out:
                _check_new_out_key(self.cfg.sa_out, new.sa_out, new.source)
            out_sa, in_sa = build_sas(new)
            if self.seqs is not None and new.sa_out != self.cfg.sa_out:
                self.seqs.attach(out_sa)
            if self.marks is not None:
                self.marks.restore(in_sa, inherited=False)
        except MoatError as exc:
            log.error("reload failed, keeping the running SAs: %s", exc)
            return
        now = time.monotonic()
        changed_out = new.sa_out != self.cfg.sa_out
        changed_in = new.sa_in != self.cfg.sa_in or (
            (new.local_subnets, new.remote_subnets)
            != (self.cfg.local_subnets, self.cfg.remote_subnets)
        )
        if changed_in or changed_out:
            try:
                self.dp.rekey(
                    self.peer.name,
                    out_sa if changed_out else None,
                    in_sa if changed_in else None,
                    now,
                )
            except ValueError as exc:
                log.error("reload failed: %s", exc)
                return
        peer = self.peer
        port = new.outer.remote_port if new.encapsulation == "udp" else 0
        endpoint = (str(new.outer.remote), port)
        if endpoint != (str(self.cfg.outer.remote), port):
            peer.endpoint = endpoint
        peer.keepalive = new.keepalive
        self.dp.rekey_grace = new.rekey_grace
        for what in ("tun", "encapsulation", "mtu_policy", "control_socket"):
            if getattr(new, what) != getattr(self.cfg, what):
                log.warning("reload: %s changed; takes effect after a restart", what)
        self.cfg = new
        log.info("reloaded %s", self.path)


def _check_new_out_key(old: SASpec, new: SASpec, source: str) -> None:
    # a new outbound SA restarts at sequence 1: with the same AEAD key that
    # repeats nonces (RFC 4106 §8.1), so a changed SA needs a changed key
    if new.key == old.key:
        raise ConfigError(
            source, "sa.out.key", "unchanged although sa.out changed; use a new key"
        )


# --status


def _status(args: argparse.Namespace) -> int:
    path = args.control
    if not path and args.config:
        path = tunnel_config.load(args.config).control_socket
    path = path or tunnel_config.DEFAULT_CONTROL_SOCKET
    try:
        status = query(path)
    except (OSError, ValueError) as exc:
        raise MoatError(f"no running tunnel at {path}: {exc}") from None
    if args.json:
        json.dump(status, sys.stdout, indent=1, sort_keys=True)
        print()
    else:
        sys.stdout.write(format_status(status))
    return 0


def _format_policy(name: str, policy: dict[str, Any]) -> list[str]:
    def flat(d: dict[str, Any]) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(d.items()))

    if "envelope" not in policy:
        return [f"  {name}: {flat(policy)}"]
    search = policy.get("path_mtu", {})
    lines = [
        f"  {name}: envelope {policy['envelope']} bytes (path MTU "
        f"{search.get('state', '?')}), inner MTU {policy.get('inner_mtu', '?')}"
    ]
    if search.get("counters"):
        lines.append(f"    probes: {flat(search['counters'])}")
    for spi, r in policy.get("reassembly", {}).items():
        lines.append(
            f"    reassembly {spi}: held {r['held_bytes']} bytes  {flat(r['counters'])}"
        )
    for key in ("counters", "packer", "icmp"):
        if policy.get(key):
            lines.append(f"    {key}: {flat(policy[key])}")
    return lines


def format_status(status: dict[str, Any]) -> str:
    lines = [f"tunnel {status.get('tun', '?')}  up {status['uptime']} s"]
    for name, p in status["peers"].items():
        lines.append(
            f"peer {name}  {p['encapsulation']} {p['endpoint']}  "
            f"inner MTU {p['inner_mtu']}  mtu policy {p['mtu_policy']}"
        )
        out = p["out_sa"]
        lines.append(
            f"  out SA  spi {out['spi']:#010x}  {out['transform']}  "
            f"esn {'on' if out['esn'] else 'off'}  seq {out['seq']}"
            + ("  NEEDS REKEY" if out["needs_rekey"] else "")
        )
        if p.get("pending_out_spi"):
            lines.append(f"  out SA  spi {p['pending_out_spi']:#010x}  (pending)")
        for sa in p["in_sas"]:
            state = "current" if sa["current"] else "old"
            state += ", retiring" if sa["retiring"] else ""
            counters = " ".join(f"{k}={v}" for k, v in sorted(sa["counters"].items()))
            lines.append(
                f"  in SA   spi {sa['spi']:#010x}  {sa['transform']}  "
                f"window {sa['replay_window']}  highest seq {sa['highest_seq']}  "
                f"({state})  {counters}"
            )
        lines.append(
            f"  tx {p['tx_packets']} packets {p['tx_bytes']} bytes   "
            f"rx {p['rx_packets']} packets {p['rx_bytes']} bytes"
        )
        if p["counters"]:
            counters = " ".join(f"{k}={v}" for k, v in sorted(p["counters"].items()))
            lines.append(f"  {counters}")
        if p.get("policy"):
            lines += _format_policy(p["mtu_policy"], p["policy"])
    for title in ("counters", "socket"):
        if status.get(title):
            counters = " ".join(f"{k}={v}" for k, v in sorted(status[title].items()))
            lines.append(f"{title}: {counters}")
    return "\n".join(lines) + "\n"
