"""Outer-network socket adapters: ESP in UDP (RFC 3948) and raw IP protocol 50.

One socket of each kind serves every peer; the peer is the destination
address of each send and the source address of each receive.

Both sockets set IP_MTU_DISCOVER = IP_PMTUDISC_DO, so outer packets carry DF
and a send larger than the path MTU the kernel knows fails with EMSGSIZE
instead of being fragmented (counted, never raised).

The UDP socket sends batches of equal-size ESP packets with UDP GSO (one
sendmsg with a UDP_SEGMENT control message, udp(7)) and receives with UDP GRO
when the kernel supports them; both are probed and fall back to one datagram
per call.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import socket
import struct

log = logging.getLogger(__name__)

IPPROTO_ESP = 50
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h
UDP_GRO = 104
IP_MTU_DISCOVER = 10  # linux/in.h
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23  # linux/in6.h
IPV6_PMTUDISC_DO = 2
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

SOCKET_BUFFER = 8 << 20
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in older kernels
GSO_MAX_BYTES = 65000  # one GSO send is one IP datagram before segmentation
RECV_SIZE = 65535
CMSG_SPACE = socket.CMSG_SPACE(4)
IPV4_MIN_HEADER = 20
IPV4_PROTOCOL_OFFSET = 9

Address = tuple[str, int]
_pack_u16 = struct.Struct("=H").pack
_unpack_int = struct.Struct("=i").unpack_from


def _family(local: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET6 if local.version == 6 else socket.AF_INET


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    for force, plain in (
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)


class OuterSocket:
    """What the event loop needs from an outer socket."""

    encapsulation = ""
    sock: socket.socket

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, packets: list[bytes], addr: Address) -> None:
        raise NotImplementedError

    def receive(self, out: list[tuple[bytes, Address]], limit: int) -> None:
        """Append up to `limit` received ESP packets (no outer header) to `out`."""
        raise NotImplementedError

    def _send_error(self, exc: OSError, count: int) -> None:
        if exc.errno == errno.EMSGSIZE:
            self.counters["tx_emsgsize"] += count
        elif exc.errno in (errno.EAGAIN, errno.ENOBUFS):
            self.counters["tx_queue_full"] += count
        else:
            self.counters["tx_error"] += count
            self.counters[f"tx_error_{errno.errorcode.get(exc.errno or 0, 'x')}"] += 1

    def close(self) -> None:
        self.sock.close()


class UdpSocket(OuterSocket):
    """ESP in UDP, RFC 3948: the ESP packet is the UDP payload."""

    encapsulation = "udp"

    def __init__(
        self,
        local: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        gso: bool = True,
        gro: bool = True,
    ) -> None:
        super().__init__()
        self.sock = socket.socket(_family(local), socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(self.sock)
        self.sock.bind((str(local), port))
        self.gso = gso
        self.gro = False
        if gro:
            try:
                self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass

    def send(self, packets: list[bytes], addr: Address) -> None:
        sock = self.sock
        n = len(packets)
        self.counters["tx_packets"] += n
        if n == 1 or not self.gso:
            for packet in packets:
                try:
                    sock.sendto(packet, addr)
                except OSError as exc:
                    self._send_error(exc, 1)
            return

        # group runs of equal-size packets; GSO allows a shorter last segment
        i = 0
        while i < n:
            size = len(packets[i])
            limit = min(n, i + GSO_MAX_SEGMENTS, i + max(1, GSO_MAX_BYTES // size))
            j = i + 1
            while j < limit and len(packets[j]) == size:
                j += 1
            if j < limit and len(packets[j]) < size:
                j += 1
            if j - i == 1:
                try:
                    sock.sendto(packets[i], addr)
                except OSError as exc:
                    self._send_error(exc, 1)
            else:
                self._send_gso(packets[i:j], size, addr)
            i = j

    def _send_gso(self, run: list[bytes], size: int, addr: Address) -> None:
        try:
            self.sock.sendmsg(
                [b"".join(run)], [(SOL_UDP, UDP_SEGMENT, _pack_u16(size))], 0, addr
            )
            self.counters["tx_gso_sends"] += 1
        except OSError as exc:
            if exc.errno == errno.EIO:
                # no checksum offload on the egress device: GSO unusable
                log.info("UDP GSO not supported on this path, sending singly")
                self.gso = False
                for packet in run:
                    try:
                        self.sock.sendto(packet, addr)
                    except OSError as exc2:
                        self._send_error(exc2, 1)
            else:
                self._send_error(exc, len(run))

    def receive(self, out: list[tuple[bytes, Address]], limit: int) -> None:
        sock = self.sock
        if not self.gro:
            recvfrom = sock.recvfrom
            for _ in range(limit):
                try:
                    out.append(recvfrom(RECV_SIZE))
                except BlockingIOError:
                    return
                except OSError:
                    self.counters["rx_error"] += 1
                    return
            return

        recvmsg = sock.recvmsg
        for _ in range(limit):
            try:
                data, anc, _flags, addr = recvmsg(RECV_SIZE, CMSG_SPACE)
            except BlockingIOError:
                return
            except OSError:
                self.counters["rx_error"] += 1
                return
            if not anc:
                out.append((data, addr))
                continue
            # a GRO super-datagram: split at the segment size (udp(7))
            seg = 0
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                    seg = _unpack_int(value)[0]
            if seg <= 0 or seg >= len(data):
                out.append((data, addr))
                continue
            self.counters["rx_gro"] += 1
            for off in range(0, len(data), seg):
                out.append((data[off : off + seg], addr))


class RawEspSocket(OuterSocket):
    """Raw IP protocol 50 (RFC 4303 without encapsulation).

    IPv4 raw sockets deliver the IP header with each packet; it is checked
    and stripped here. IPv6 raw sockets deliver the payload only.
    """

    encapsulation = "esp"

    def __init__(self, local: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        super().__init__()
        self.sock = socket.socket(_family(local), socket.SOCK_RAW, IPPROTO_ESP)
        _tune(self.sock)
        self.sock.bind((str(local), 0))
        self.ipv4 = local.version == 4

    def send(self, packets: list[bytes], addr: Address) -> None:
        sendto = self.sock.sendto
        self.counters["tx_packets"] += len(packets)
        for packet in packets:
            try:
                sendto(packet, addr)
            except OSError as exc:
                self._send_error(exc, 1)

    def receive(self, out: list[tuple[bytes, Address]], limit: int) -> None:
        recvfrom = self.sock.recvfrom
        for _ in range(limit):
            try:
                data, addr = recvfrom(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.counters["rx_error"] += 1
                return
            if not self.ipv4:
                out.append((data, (addr[0], 0)))
                continue

            # strip the IPv4 header (RFC 791: IHL in 32-bit words)
            if len(data) < IPV4_MIN_HEADER or data[0] >> 4 != 4:
                self.counters["rx_malformed_ip"] += 1
                continue
            ihl = (data[0] & 0x0F) * 4
            if ihl < IPV4_MIN_HEADER or len(data) < ihl:
                self.counters["rx_malformed_ip"] += 1
                continue
            if data[IPV4_PROTOCOL_OFFSET] != IPPROTO_ESP:
                self.counters["rx_not_esp"] += 1
                continue
            out.append((data[ihl:], (addr[0], 0)))
