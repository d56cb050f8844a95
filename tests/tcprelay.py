"""Relay stdin/stdout to a TCP port on 127.0.0.1 (one connection).

QEMU's user network runs it for each guest connection to a `guestfwd=...-cmd:`
address: a guestfwd straight to a host socket is opened once, when QEMU
starts, and carries one connection only.

    python tcprelay.py PORT
"""

from __future__ import annotations

import os
import select
import socket
import sys

CHUNK = 65536


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    inputs = [0, sock.fileno()]
    while sock.fileno() in inputs:
        ready, _, _ = select.select(inputs, [], [])
        if 0 in ready:
            data = os.read(0, CHUNK)
            if data:
                sock.sendall(data)
            else:  # the guest closed its side
                sock.shutdown(socket.SHUT_WR)
                inputs.remove(0)
        if sock.fileno() in ready:
            data = sock.recv(CHUNK)
            if not data:
                break
            write_all(1, data)
    sock.close()


if __name__ == "__main__":
    relay(int(sys.argv[1]))
