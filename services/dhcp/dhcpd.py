"""`moat dhcpd`: the DHCP server on the private interface.

A UDP socket on port 67, tied to the private interface with SO_BINDTODEVICE
so requests from any other interface never reach it. Replies go where the
core says (RFC 2131 §4.1); a unicast to a client that has no address yet
needs an ARP entry, which is added with the SIOCSARP ioctl (as dnsmasq does);
if that fails the reply is broadcast, which RFC 2131 allows.

Runs in the foreground until SIGTERM/SIGINT; SIGUSR1 logs the counters.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import struct
import time
from collections.abc import Callable
from fcntl import ioctl
from ipaddress import IPv4Address
from types import FrameType

from moat.errors import MoatError
from services.dhcp import config as dhcp_config
from services.dhcp.server import (
    LIMITED_BROADCAST,
    SERVER_PORT,
    DhcpServer,
    Reply,
    build,
)
from services.runtime import print_status, publish_status

log = logging.getLogger(__name__)

RECEIVE_SIZE = 4096
POLL_INTERVAL = 0.5
STATUS_INTERVAL = 5.0
SIOCSARP = 0x8955
ATF_COM = 0x02
ARPHRD_ETHER = 1
IFNAMSIZ = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="TOML file with [dhcpd]"
    )
    parser.add_argument(
        "--status", action="store_true", help="print the running server's status"
    )


def run(args: argparse.Namespace) -> int:
    config = dhcp_config.load(args.config)
    if args.status:
        return print_status(config.status_file)
    server = build(config)
    try:
        config.lease_file.parent.mkdir(parents=True, exist_ok=True)
        sock = open_socket(config.interface)
    except OSError as exc:
        raise MoatError(f"cannot serve on {config.interface}: {exc}") from exc
    server.leases.load(time.time())
    log.info(
        "dhcpd serving %s-%s on %s as %s",
        config.pool_start,
        config.pool_end,
        config.interface,
        config.address,
    )
    stop = _stop_flag()
    signal.signal(signal.SIGUSR1, lambda *_: log_counters(server))
    try:
        serve(sock, server, config, stop)
    finally:
        sock.close()
        publish_status(config.status_file, status(server))
        log_counters(server)
        log.info("dhcpd stopped")
    return 0


def open_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
    sock.bind(("0.0.0.0", SERVER_PORT))
    sock.settimeout(POLL_INTERVAL)
    return sock


def _stop_flag() -> Callable[[], bool]:
    stopping: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("dhcpd: signal %d, stopping", signum)
        stopping.append(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return lambda: bool(stopping)


def serve(
    sock: socket.socket,
    server: DhcpServer,
    config: dhcp_config.ServerConfig,
    stop: Callable[[], bool],
) -> None:
    next_status = 0.0
    while not stop():
        if time.monotonic() >= next_status:
            publish_status(config.status_file, status(server))
            next_status = time.monotonic() + STATUS_INTERVAL
        try:
            datagram, peer = sock.recvfrom(RECEIVE_SIZE)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        reply = server.handle(datagram, time.time())
        if reply is not None:
            send(sock, reply, config.interface)


def send(sock: socket.socket, reply: Reply, interface: str) -> None:
    address = reply.address
    if reply.needs_neighbour and not add_neighbour(
        sock, reply.address, reply.message.chaddr, interface
    ):
        address = LIMITED_BROADCAST
    try:
        sock.sendto(reply.data, (str(address), reply.port))
    except OSError as exc:
        log.warning("send to %s:%d failed: %s", address, reply.port, exc)


def add_neighbour(
    sock: socket.socket, address: IPv4Address, chaddr: bytes, interface: str
) -> bool:
    """Tell the kernel `address` is at `chaddr` (struct arpreq, SIOCSARP)."""
    if len(chaddr) != 6:
        return False
    protocol_address = struct.pack("=HH4s8x", socket.AF_INET, 0, address.packed)
    hardware_address = struct.pack("=H6s8x", ARPHRD_ETHER, chaddr)
    request = (
        protocol_address
        + hardware_address
        + struct.pack("=i", ATF_COM)
        + bytes(16)
        + interface.encode()[: IFNAMSIZ - 1].ljust(IFNAMSIZ, b"\0")
    )
    try:
        ioctl(sock.fileno(), SIOCSARP, request)
    except OSError as exc:
        log.debug("SIOCSARP %s failed (%s), broadcasting", address, exc)
        return False
    return True


def status(server: DhcpServer) -> dict[str, object]:
    return {
        "service": "dhcpd",
        "interface": server.config.interface,
        "leases": server.leases.status(time.time()),
        "counters": dict(sorted(server.counters.items())),
    }


def log_counters(server: DhcpServer) -> None:
    merged = server.counters + server.leases.counters
    log.info(
        "dhcpd counters: %s", " ".join(f"{k}={v}" for k, v in sorted(merged.items()))
    )
