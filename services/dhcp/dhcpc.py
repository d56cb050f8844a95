"""`moat dhcpc`: the DHCP client on the wild (ISP) interface.

Sockets: an AF_PACKET socket carries whole IPv4/UDP datagrams, so the client
can broadcast from 0.0.0.0 and hear replies unicast to an address it does
not have yet; a BPF filter passes only UDP to port 68. A UDP socket on port
68, tied to the interface, sends the unicast REQUESTs of RENEWING.

On a lease the address is configured with `ip addr replace` (lifetimes =
lease), the default route with `ip route replace`, option 26 with `ip link
set mtu`. When the address changes the hook runs (see README, "DHCP"):

    argv: shlex.split(--hook), no shell
    MOAT_DHCP_EVENT       bound (new address) | lost (NAK or expiry)
    MOAT_DHCP_INTERFACE   interface name
    MOAT_DHCP_OLD_ADDRESS previous address, or empty
    MOAT_DHCP_NEW_ADDRESS new address, or empty when lost
    MOAT_DHCP_PREFIXLEN, MOAT_DHCP_ROUTER, MOAT_DHCP_SERVER,
    MOAT_DHCP_LEASE_TIME, MOAT_DHCP_DNS_SERVERS, MOAT_DHCP_NTP_SERVERS,
    MOAT_DHCP_DOMAIN      from the lease (lists space-separated)

Runs in the foreground until SIGTERM/SIGINT (the address stays configured
unless --release-on-exit); SIGUSR1 renews at once.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import time
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType

from moat.durable import atomic_write
from moat.errors import MoatError
from services.dhcp import udpip
from services.dhcp.client import (
    Action,
    ClientLease,
    Configure,
    Deconfigure,
    DhcpClient,
    Transmit,
)
from services.dhcp.message import DhcpError
from services.status import print_status, publish_status

log = logging.getLogger(__name__)

CLIENT_PORT = 68
SERVER_PORT = 67
ETH_P_IP = 0x0800
BROADCAST_MAC = b"\xff" * 6
LIMITED_BROADCAST = IPv4Address("255.255.255.255")
SO_ATTACH_FILTER = 26
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_CSUMNOTREADY = 1 << 3
AUXDATA_SIZE = 20
RECEIVE_SIZE = 4096
MAX_WAIT = 1.0  # seconds between looks at the stop flag
HOOK_TIMEOUT = 120
STATUS_INTERVAL = 5.0
IP_TIMEOUT = 10

# classic BPF over the IP header (SOCK_DGRAM packet socket): accept
# unfragmented UDP with destination port 68, drop everything else
_BPF_UDP_DPORT_68 = [
    (0x30, 0, 0, 9),  # ldb [9]            protocol
    (0x15, 0, 6, 17),  # jeq #17            UDP? else drop
    (0x28, 0, 0, 6),  # ldh [6]            flags + fragment offset
    (0x45, 4, 0, 0x1FFF),  # jset #0x1fff  fragment -> drop
    (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf)   IP header length
    (0x48, 0, 0, 2),  # ldh [x+2]          UDP destination port
    (0x15, 0, 1, CLIENT_PORT),  # jeq #68
    (0x06, 0, 0, 0x40000),  # ret: accept
    (0x06, 0, 0, 0),  # ret: drop
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interface", required=True, help="wild-side interface")
    parser.add_argument(
        "--hook", metavar="CMD", help="command run when the address changes"
    )
    parser.add_argument("--hostname", help="host name to send (option 12)")
    parser.add_argument(
        "--no-configure",
        action="store_true",
        help="do not touch addresses or routes; only run the hook",
    )
    parser.add_argument(
        "--release-on-exit",
        action="store_true",
        help="send DHCPRELEASE and remove the address when stopped",
    )
    parser.add_argument(
        "--status-file",
        type=Path,
        metavar="PATH",
        help="status JSON (default /run/moat/dhcpc-IFACE.status.json)",
    )
    parser.add_argument(
        "--status", action="store_true", help="print the running client's status"
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        metavar="PATH",
        help="remember the last address here (asked for again after a restart)",
    )
    parser.add_argument(
        "--min-rebind-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="shortest retransmit wait in RENEWING/REBINDING (RFC 2131: 60)",
    )


def run(args: argparse.Namespace) -> int:
    status_file = args.status_file or Path(
        f"/run/moat/dhcpc-{args.interface}.status.json"
    )
    if args.status:
        return print_status(status_file)
    mac = interface_mac(args.interface)
    previous = load_state(args.state_file)
    client = DhcpClient(
        mac,
        hostname=args.hostname,
        client_id=b"\x01" + mac,
        min_rebind_wait=args.min_rebind_wait,
        previous_address=previous,
    )
    try:
        adapter = ClientAdapter(
            args.interface,
            shlex.split(args.hook) if args.hook else [],
            configure=not args.no_configure,
            status_file=status_file,
            state_file=args.state_file,
        )
    except OSError as exc:
        raise MoatError(f"cannot open sockets on {args.interface}: {exc}") from exc
    adapter.previous = previous
    flags: dict[str, bool] = {"stop": False, "renew": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            flags["renew"] = True
        else:
            log.info("dhcpc: signal %d, stopping", signum)
            flags["stop"] = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, on_signal)
    log.info("dhcpc starting on %s (%s)", args.interface, mac.hex(":"))
    try:
        adapter.execute(client.start(time.monotonic()))
        adapter.loop(client, flags)
        if args.release_on_exit:
            lease = client.lease
            adapter.execute(client.release())
            if lease is not None:
                adapter.execute([Deconfigure(lease, "released")])
    finally:
        adapter.close()
        publish_status(status_file, adapter.status(client))
        log.info("dhcpc stopped (%s)", dict(client.counters))
    return 0


def load_state(path: Path | None) -> IPv4Address | None:
    """The address stored by a previous run; None if absent or unreadable."""
    if path is None or not path.exists():
        return None
    try:
        return IPv4Address(json.loads(path.read_text())["address"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("state file %s unreadable (%s), ignored", path, exc)
        return None


def interface_mac(interface: str) -> bytes:
    try:
        text = Path(f"/sys/class/net/{interface}/address").read_text().strip()
        return bytes.fromhex(text.replace(":", ""))
    except (OSError, ValueError) as exc:
        raise MoatError(f"interface {interface}: no hardware address ({exc})") from exc


def attach_udp_filter(sock: socket.socket) -> None:
    program = b"".join(struct.pack("HBBI", *insn) for insn in _BPF_UDP_DPORT_68)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(_BPF_UDP_DPORT_68), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class ClientAdapter:
    def __init__(
        self,
        interface: str,
        hook: list[str],
        configure: bool,
        status_file: Path,
        state_file: Path | None = None,
    ) -> None:
        self.interface = interface
        self.status_file = status_file
        self.state_file = state_file
        self.hook = hook
        self.configure = configure
        self.current: IPv4Address | None = None  # address configured now
        self.previous: IPv4Address | None = None  # last address we held

        # packet socket: filter before bind so nothing unfiltered queues up
        self.packet = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        attach_udp_filter(self.packet)
        self.packet.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.packet.bind((interface, ETH_P_IP))

        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.udp.setsockopt(
            socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode()
        )
        self.udp.bind(("0.0.0.0", CLIENT_PORT))
        self.udp.setblocking(False)
        self.packet.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.packet, selectors.EVENT_READ)
        self.selector.register(self.udp, selectors.EVENT_READ)

    def close(self) -> None:
        self.selector.close()
        self.packet.close()
        self.udp.close()

    # event loop

    def status(self, client: DhcpClient) -> dict[str, object]:
        now = time.monotonic()
        lease = client.lease
        out: dict[str, object] = {
            "service": "dhcpc",
            "interface": self.interface,
            "state": client.state.value,
            "address": str(lease.address) if lease else None,
            "counters": dict(sorted(client.counters.items())),
        }
        if lease is not None:
            out.update(
                prefixlen=lease.prefixlen,
                server=str(lease.server),
                router=str(lease.routers[0]) if lease.routers else None,
                renew_in=round(lease.t1 - now, 1),
                rebind_in=round(lease.t2 - now, 1),
                expires_in=round(lease.expiry - now, 1),
            )
        return out

    def loop(self, client: DhcpClient, flags: dict[str, bool]) -> None:
        next_status, published = 0.0, None
        while not flags["stop"]:
            now = time.monotonic()
            state = (client.state, client.lease.address if client.lease else None)
            if now >= next_status or state != published:
                publish_status(self.status_file, self.status(client))
                next_status, published = now + STATUS_INTERVAL, state
            wait = MAX_WAIT if client.timer is None else client.timer - now
            for key, _ in self.selector.select(max(0.0, min(wait, MAX_WAIT))):
                if key.fileobj is self.packet:
                    self._receive_packet(client)
                else:
                    self._drain_udp()
            if flags["renew"]:
                flags["renew"] = False
                self.execute(client.renew(time.monotonic()))
            self.execute(client.on_timer(time.monotonic()))

    def _receive_packet(self, client: DhcpClient) -> None:
        try:
            data, ancillary, _, address = self.packet.recvmsg(
                RECEIVE_SIZE, socket.CMSG_SPACE(AUXDATA_SIZE)
            )
        except BlockingIOError:
            return
        except OSError as exc:  # e.g. ENETDOWN: link went down under us
            client.counters["receive_error"] += 1
            log.warning("receive on %s failed: %s", self.interface, exc)
            time.sleep(MAX_WAIT)
            return
        if address[2] == PACKET_OUTGOING:
            return
        checksum_pending = any(
            level == SOL_PACKET
            and kind == PACKET_AUXDATA
            and len(value) >= 4
            and struct.unpack_from("I", value)[0] & TP_STATUS_CSUMNOTREADY
            for level, kind, value in ancillary
        )
        try:
            datagram = udpip.parse(data, verify_udp_checksum=not checksum_pending)
        except DhcpError as exc:
            client.counters["drop_bad_frame"] += 1
            log.debug("bad frame: %s", exc)
            return
        if datagram.destination_port != CLIENT_PORT:
            return
        self.execute(client.receive(datagram.payload, time.monotonic()))

    def _drain_udp(self) -> None:
        # replies are read from the packet socket; this one only sends
        try:
            self.udp.recv(RECEIVE_SIZE)
        except OSError:
            pass

    # actions

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Transmit):
                self.transmit(action)
            elif isinstance(action, Configure):
                self.apply(action.lease, action.old)
            else:
                self.remove(action.lease, action.reason)

    def transmit(self, t: Transmit) -> None:
        try:
            if t.destination is None:
                frame = udpip.build(
                    udpip.UdpDatagram(
                        t.source, LIMITED_BROADCAST, CLIENT_PORT, SERVER_PORT, t.data
                    )
                )
                self.packet.sendto(
                    frame, (self.interface, ETH_P_IP, 0, 0, BROADCAST_MAC)
                )
            else:
                self.udp.sendto(t.data, (str(t.destination), SERVER_PORT))
        except OSError as exc:
            log.warning("send to %s failed: %s", t.destination or "broadcast", exc)

    def apply(self, lease: ClientLease, old: ClientLease | None) -> None:
        if self.configure:
            if old is not None and old.address != lease.address:
                self._ip("addr", "del", f"{old.address}/{old.prefixlen}")
            lifetime = str(min(int(lease.lease_time), 0xFFFFFFFE))
            self._ip(
                "addr", "replace", f"{lease.address}/{lease.prefixlen}",
                "broadcast", "+", "valid_lft", lifetime, "preferred_lft", lifetime,
            )  # fmt: skip
            if lease.mtu is not None:
                self._ip("link", "set", "mtu", str(lease.mtu))
            if lease.routers:
                self._ip("route", "replace", "default", "via", str(lease.routers[0]))
        if lease.address != self.current:
            self.save_state(lease.address)
            self.run_hook("bound", lease)
            self.current = self.previous = lease.address

    def save_state(self, address: IPv4Address) -> None:
        if self.state_file is None:
            return
        data = json.dumps({"address": str(address)}).encode() + b"\n"
        try:
            atomic_write(self.state_file, data)
        except OSError as exc:
            log.error("cannot write state file %s: %s", self.state_file, exc)

    def remove(self, lease: ClientLease, reason: str) -> None:
        if self.configure:
            self._ip("addr", "del", f"{lease.address}/{lease.prefixlen}")
        log.info("address %s removed (%s)", lease.address, reason)
        if reason != "released":
            self.run_hook("lost", None)
        self.current = None

    def _ip(self, obj: str, verb: str, *rest: str) -> None:
        argv = ["ip", obj, verb, *rest]
        if obj == "link":
            argv = ["ip", "link", "set", "dev", self.interface, *rest[1:]]
        else:
            argv += ["dev", self.interface]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT)
        if res.returncode != 0:
            log.warning("%s: %s", " ".join(argv), res.stderr.strip())

    def run_hook(self, event: str, lease: ClientLease | None) -> None:
        old = self.previous
        log.info(
            "address %s -> %s (%s)", old or "-", lease.address if lease else "-", event
        )
        if not self.hook:
            return
        env = dict(os.environ)
        env.update(
            MOAT_DHCP_EVENT=event,
            MOAT_DHCP_INTERFACE=self.interface,
            MOAT_DHCP_OLD_ADDRESS=str(old or ""),
            MOAT_DHCP_NEW_ADDRESS=str(lease.address) if lease else "",
        )
        if lease is not None:
            env.update(
                MOAT_DHCP_PREFIXLEN=str(lease.prefixlen),
                MOAT_DHCP_ROUTER=str(lease.routers[0]) if lease.routers else "",
                MOAT_DHCP_SERVER=str(lease.server),
                MOAT_DHCP_LEASE_TIME=str(int(min(lease.lease_time, 0xFFFFFFFF))),
                MOAT_DHCP_DNS_SERVERS=" ".join(map(str, lease.dns_servers)),
                MOAT_DHCP_NTP_SERVERS=" ".join(map(str, lease.ntp_servers)),
                MOAT_DHCP_DOMAIN=lease.domain,
            )
        try:
            res = subprocess.run(self.hook, env=env, timeout=HOOK_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("hook %s failed: %s", self.hook[0], exc)
            return
        if res.returncode != 0:
            log.warning("hook %s exited %d", self.hook[0], res.returncode)
