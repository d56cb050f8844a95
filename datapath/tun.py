"""TUN device adapter: a layer-3 interface whose packets we read and write.

The device is created with the TUNSETIFF ioctl on /dev/net/tun (flags IFF_TUN,
IFF_NO_PI: every read returns exactly one IP packet, every write takes one).
It lives as long as the file descriptor is open. Link settings (MTU, queue
length, up) use the classic SIOCSIF* ioctls; addresses and routes use the
`ip` command (iproute2 or busybox), which every target has.

See linux/if_tun.h and netdevice(7).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import subprocess

from datapath.vnet import PLAIN, VNET_HDR_SIZE
from moat.errors import MoatError

log = logging.getLogger(__name__)

TUN_CLONE_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

# linux/sockios.h, linux/if.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCSIFTXQLEN = 0x8943
IFF_UP = 0x1

MAX_PACKET = 65535  # largest IP packet (and TUN MTU)
READ_SIZE = MAX_PACKET + VNET_HDR_SIZE  # largest read


class TunError(MoatError):
    """The TUN device could not be created or configured."""


class Tun:
    """One TUN device, non-blocking, opened for the life of this object."""

    def __init__(self, name: str, vnet_hdr: bool = False) -> None:
        try:
            self.fd = os.open(
                TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError as exc:
            raise TunError(f"cannot open {TUN_CLONE_DEVICE}: {exc.strerror}") from None
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags)
        ifr = ifr.ljust(IFREQ_SIZE, b"\0")
        try:
            res = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(self.fd)
            raise TunError(f"TUNSETIFF {name}: {exc.strerror}") from None
        self.name = res[:IFNAMSIZ].rstrip(b"\0").decode()
        # every read and write starts with a virtio_net_hdr (datapath/vnet.py)
        self.vnet_hdr = vnet_hdr
        self._ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        log.debug("created TUN device %s (fd %d)", self.name, self.fd)

    def fileno(self) -> int:
        return self.fd

    # link settings (netdevice(7))

    def _ifreq(self, fmt: str = "", *values: int) -> bytes:
        head = struct.pack(f"{IFNAMSIZ}s", self.name.encode())
        return (head + struct.pack(fmt, *values)).ljust(IFREQ_SIZE, b"\0")

    def _ioctl(self, request: int, ifr: bytes, what: str) -> bytes:
        try:
            return fcntl.ioctl(self._ctl, request, ifr)
        except OSError as exc:
            raise TunError(f"{self.name}: cannot set {what}: {exc.strerror}") from None

    def set_mtu(self, mtu: int) -> None:
        self._ioctl(SIOCSIFMTU, self._ifreq("i", mtu), f"MTU {mtu}")

    def mtu(self) -> int:
        res = self._ioctl(SIOCGIFMTU, self._ifreq("i", 0), "MTU")
        return int(struct.unpack_from("i", res, IFNAMSIZ)[0])

    def set_txqueuelen(self, qlen: int) -> None:
        self._ioctl(SIOCSIFTXQLEN, self._ifreq("i", qlen), f"txqueuelen {qlen}")

    def set_up(self) -> None:
        res = self._ioctl(SIOCGIFFLAGS, self._ifreq("H", 0), "flags")
        flags = struct.unpack_from("H", res, IFNAMSIZ)[0]
        self._ioctl(SIOCSIFFLAGS, self._ifreq("H", flags | IFF_UP), "up")

    def _ip(self, *args: str) -> None:
        res = subprocess.run(["ip", *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise TunError(f"ip {' '.join(args)}: {res.stderr.strip()}")

    def add_address(
        self, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> None:
        family = "-6" if address.version == 6 else "-4"
        self._ip(family, "addr", "add", str(address), "dev", self.name)

    def add_route(self, prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        family = "-6" if prefix.version == 6 else "-4"
        self._ip(family, "route", "replace", str(prefix), "dev", self.name)

    # packets

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting."""
        try:
            packet = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        return packet[VNET_HDR_SIZE:] if self.vnet_hdr else packet

    def write(self, packet: bytes) -> None:
        os.write(self.fd, PLAIN + packet if self.vnet_hdr else packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._ctl.close()
