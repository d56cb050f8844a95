"""The event loop: one thread, one epoll, every peer.

    TUN readable   -> read packets until EAGAIN (at most BATCH) -> Datapath.outbound
                   -> send each dirty peer's queue (UDP GSO for equal sizes)
    socket readable-> receive datagrams (UDP GRO when offered) -> Datapath.inbound
                   -> write the queued inner packets to the TUN device
    control socket -> one JSON reply per connection (status)
    signals        -> SIGHUP reload, SIGTERM/SIGINT stop (via a wakeup fd)
    about 1/s      -> Datapath.poll (keepalives, SA retirement, warnings)

The per-packet path does no logging, builds no objects it can avoid and
keeps hot attributes in locals.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datapath.outer import Address, OuterSocket
from datapath.tun import READ_SIZE, Tun
from datapath.tunnel import Datapath, Peer, esp_space
from datapath.udpencap import NAT_KEEPALIVE, NON_ESP_MARKER
from datapath.vnet import VNET_HDR_SIZE, coalesce
from moat.control import QUERY_TIMEOUT, query  # noqa: F401 - the tunnel's client

log = logging.getLogger(__name__)

MIN_POLL_INTERVAL = 0.01
BATCH = 64  # packets per read burst (also the UDP GSO segment cap)
POLL_INTERVAL = 1.0  # seconds between Datapath.poll calls
# the loop answers a status request inline: a client that connects and sends
# nothing stalls packets for at most this long (the socket is root-only)
CONTROL_TIMEOUT = 0.5
ERROR_LOG_INTERVAL = 10.0  # seconds between tracebacks of internal errors
ESP_MIN = 8  # SPI + sequence number


class ControlServer:
    """A unix stream socket answering `status` with one JSON document."""

    def __init__(self, path: str, status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.status = status
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    timeout = CONTROL_TIMEOUT

    def serve_one(self) -> None:
        """Accept one waiting connection and answer it; never raises OSError."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(self.timeout)
            try:
                self.respond(conn)
            except OSError as exc:
                log.debug("control connection failed: %s", exc)

    def respond(self, conn: socket.socket) -> None:
        """Read one request from `conn` and send the answer (subclasses: protocol)."""
        request = conn.recv(256).decode(errors="replace").strip()
        if request in ("", "status"):
            reply = json.dumps(self.status(), indent=1, sort_keys=True)
        else:
            reply = json.dumps({"error": f"unknown request {request!r}"})
        conn.sendall(reply.encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class EventLoop:
    """Moves packets between one TUN device, the outer sockets and a Datapath."""

    def __init__(
        self,
        datapath: Datapath,
        tun: Tun,
        sockets: dict[str, OuterSocket],
        control: ControlServer | None = None,
        on_reload: Callable[[], None] | None = None,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self.dp = datapath
        self.tun = tun
        self.sockets = sockets
        self.control = control
        self.on_reload = on_reload
        self.on_tick = on_tick
        self.running = False
        self.counters = datapath.counters
        self._reload = False
        self._stop = False
        self._handlers: dict[int, Callable[[], None]] = {}
        self._next_error_log = 0.0
        if logging.getLogger("datapath.tunnel").isEnabledFor(logging.DEBUG):
            datapath.trace_packets()

    # signals

    def _on_signal(self, signum: int, frame: object) -> None:
        del frame
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True

    def stop(self) -> None:
        self._stop = True

    # the loop

    def run(self) -> None:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        old_handlers = {
            s: signal.signal(s, self._on_signal)
            for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
        }
        epoll = select.epoll()
        handlers = self._handlers
        handlers[self.tun.fileno()] = self._from_tun
        for sock in self.sockets.values():
            handlers[sock.fileno()] = self._receiver(sock)
        if self.control is not None:
            handlers[self.control.fileno()] = self.control.serve_one
        handlers[wake_r.fileno()] = lambda: _drain(wake_r)
        for fd in handlers:
            epoll.register(fd, select.EPOLLIN)

        self.running = True
        next_poll = 0.0
        monotonic = time.monotonic
        try:
            while not self._stop:
                now = monotonic()
                if now >= next_poll:
                    self.dp.poll(now)
                    if self.on_tick is not None:
                        self.on_tick(now)
                    self._flush(now)
                    # sooner if an MTU policy timer (probe, drop timer) is due
                    next_poll = max(
                        now + MIN_POLL_INTERVAL,
                        min(now + POLL_INTERVAL, self.dp.next_timer()),
                    )
                for fd, _ev in epoll.poll(max(0.0, next_poll - now)):
                    try:
                        handlers[fd]()
                    except Exception:
                        # a bug must cost packets, not the tunnel
                        self._internal_error()
                if self._reload:
                    self._reload = False
                    if self.on_reload is not None:
                        self.on_reload()
                        self._flush(monotonic())
        finally:
            self.running = False
            epoll.close()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            wake_r.close()
            wake_w.close()

    def _internal_error(self) -> None:
        self.counters["internal_error"] += 1
        self.dp.tun_queue.clear()
        for peer in self.dp.dirty:
            peer.tx_queue.clear()
        self.dp.dirty.clear()
        now = time.monotonic()
        if now >= self._next_error_log:
            self._next_error_log = now + ERROR_LOG_INTERVAL
            log.exception(
                "internal error in packet handling (%d so far); packets dropped",
                self.counters["internal_error"],
            )

    # TUN -> peers

    def _from_tun(self) -> None:
        fd = self.tun.fd
        read = os.read
        outbound = self.dp.outbound
        now = time.monotonic()
        # with a vnet header but no offloads enabled, each read is one packet
        skip = VNET_HDR_SIZE if self.tun.vnet_hdr else 0
        for _ in range(BATCH):
            try:
                packet = read(fd, READ_SIZE)
            except BlockingIOError:
                # queue empty: nothing may wait in a half-filled payload
                self.dp.tun_drained(now)
                break
            outbound(packet[skip:] if skip else packet, now)
        self._flush(now)
        if self.dp.tun_queue:
            self._to_tun()

    def _flush(self, now: float) -> None:
        dp = self.dp
        if not dp.dirty:
            return
        sockets = self.sockets
        for peer in dp.dirty:
            sock = sockets.get(peer.encapsulation)
            if sock is None:
                dp.counters["tx_no_socket"] += len(peer.tx_queue)
            else:
                too_big = sock.counters["tx_emsgsize"]
                sock.send(peer.tx_queue, peer.endpoint)
                if sock.counters["tx_emsgsize"] != too_big:
                    dp.emsgsize(peer, _outer_size(peer), now)
            dp.sent(peer, now)
        dp.dirty.clear()

    # peers -> TUN

    def _receiver(self, sock: OuterSocket) -> Callable[[], None]:
        is_udp = sock.encapsulation == "udp"
        dp = self.dp
        inbound = dp.inbound
        received: list[tuple[bytes, Address]] = []

        def receive() -> None:
            sock.receive(received, BATCH)
            now = time.monotonic()
            try:
                for data, addr in received:
                    if is_udp and (
                        len(data) < ESP_MIN or data.startswith(NON_ESP_MARKER)
                    ):
                        self._non_esp(data, addr)
                        continue
                    inbound(data, addr, now)
            finally:
                received.clear()
            self._to_tun()
            if dp.dirty:
                self._flush(now)

        return receive

    def _non_esp(self, data: bytes, addr: Address) -> None:
        # RFC 3948 §2.2, §2.3: keepalive (ignored, not a liveness signal),
        # IKE behind the non-ESP marker (no IKE here), anything else a runt
        if data == NAT_KEEPALIVE:
            self.dp.non_esp("keepalive", addr)
        elif data.startswith(NON_ESP_MARKER):
            self.dp.non_esp("ike", addr)
        else:
            self.dp.non_esp("runt", addr)

    def _to_tun(self) -> None:
        queue = self.dp.tun_queue
        if not queue:
            return
        fd = self.tun.fd
        write = os.write
        self.counters["tun_tx"] += len(queue)
        buffers = coalesce(queue) if self.tun.vnet_hdr else queue
        for packet in buffers:
            try:
                write(fd, packet)
            except OSError as exc:
                key = "tun_tx_full" if exc.errno == errno.EAGAIN else "tun_tx_error"
                self.counters[key] += 1
        self.counters["tun_tx_writes"] += len(buffers)
        queue.clear()


def _outer_size(peer: Peer) -> int:
    """Outer packet size of the largest packet queued for `peer`."""
    largest = max((len(p) for p in peer.tx_queue), default=0)
    return (
        peer.outer_mtu
        - esp_space(peer.outer_mtu, peer.ip_version, peer.encapsulation)
        + largest
    )


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        while sock.recv(4096):
            pass
