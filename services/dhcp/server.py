"""Sans-IO DHCP server core (RFC 2131 §4.3).

`DhcpServer.handle(datagram, now)` returns a `Reply` (bytes and where to send
them) or None. Every datagram that gets no reply is counted under a reason in
`counters` (`drop_malformed`, `drop_not_request`, ...). The adapter owns the
socket and the clock; `now` is wall-clock time because leases outlive the
process.

Message type -> handler is a table (`HANDLERS`). This server is
authoritative for its subnet: a client that asks for an address we have no
record of gets it if it is free (so a lost lease file heals itself) and a
DHCPNAK if it is not ours to give (RFC 2131 §4.3.2, INIT-REBOOT).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from services.dhcp.config import ServerConfig
from services.dhcp.lease import LeaseDatabase
from services.dhcp.message import (
    BOOTREPLY,
    BOOTREQUEST,
    BROADCAST_FLAG,
    DEFAULT_MAX_MESSAGE_SIZE,
    IP_UDP_HEADERS,
    DhcpError,
    DhcpMessage,
    DhcpMessageType,
    DhcpOption,
    decode,
    encode,
    encode_domain_search,
    encode_ip_list,
    encode_uint,
)

log = logging.getLogger(__name__)

SERVER_PORT = 67
CLIENT_PORT = 68
LIMITED_BROADCAST = IPv4Address("255.255.255.255")
MAX_REPLY_SIZE = 1500 - IP_UDP_HEADERS  # one Ethernet frame

# options every reply that carries configuration gets (RFC 2131 §4.3.1)
ALWAYS_SENT = (
    DhcpOption.SUBNET_MASK,
    DhcpOption.ROUTER,
    DhcpOption.DOMAIN_NAME_SERVER,
    DhcpOption.DOMAIN_NAME,
)
LEASE_TIMERS = (
    DhcpOption.IP_ADDRESS_LEASE_TIME,
    DhcpOption.RENEWAL_TIME_VALUE,
    DhcpOption.REBINDING_TIME_VALUE,
)


@dataclass
class Reply:
    """A reply and its destination (RFC 2131 §4.1)."""

    data: bytes
    message: DhcpMessage
    address: IPv4Address
    port: int
    # unicast to a client that has no address yet: the adapter must add a
    # neighbour entry for `message.chaddr` first (or broadcast instead)
    needs_neighbour: bool = False


class DhcpServer:
    def __init__(self, config: ServerConfig, leases: LeaseDatabase) -> None:
        self.config = config
        self.leases = leases
        self.counters: Counter[str] = Counter()
        self.parameters = self._parameters()

    def _parameters(self) -> dict[int, bytes]:
        """Configured option values, encoded once."""
        c = self.config
        values: dict[int, bytes] = {
            DhcpOption.SUBNET_MASK: c.subnet.netmask.packed,
            DhcpOption.BROADCAST_ADDRESS: c.subnet.broadcast_address.packed,
        }
        if c.router is not None:
            values[DhcpOption.ROUTER] = c.router.packed
        if c.dns_servers:
            values[DhcpOption.DOMAIN_NAME_SERVER] = encode_ip_list(c.dns_servers)
        if c.domain:
            values[DhcpOption.DOMAIN_NAME] = c.domain.encode("ascii")
        if c.ntp_servers:
            values[DhcpOption.NTP_SERVERS] = encode_ip_list(c.ntp_servers)
        if c.mtu is not None:
            values[DhcpOption.INTERFACE_MTU] = encode_uint(c.mtu, 2)
        if c.search:
            values[DhcpOption.DOMAIN_SEARCH] = encode_domain_search(c.search)
        return values

    # entry point

    def handle(self, datagram: bytes, now: float) -> Reply | None:
        try:
            msg = decode(datagram)
        except DhcpError as exc:
            return self._drop("malformed", "undecodable message: %s", exc)
        if msg.op != BOOTREQUEST:
            return self._drop("not_request", "op %d from %s", msg.op, msg.chaddr.hex())
        if not msg.chaddr:
            return self._drop("no_chaddr", "empty chaddr")
        try:
            kind = msg.message_type
            if kind is None:
                return self._drop("bootp", "BOOTP request (no option 53)")
            handler = HANDLERS.get(kind)
            if handler is None:
                return self._drop("unexpected_type", "client sent %s", kind.name)
            self.counters[f"rx_{kind.name.lower()}"] += 1
            reply = handler(self, msg, now)
        except DhcpError as exc:
            return self._drop("malformed_option", "bad option: %s", exc)
        except OSError as exc:
            log.error("lease file write failed, not answering: %s", exc)
            return self._drop("lease_write_failed", "%s", exc)
        if reply is not None:
            reply_type = reply.message.message_type
            self.counters[f"tx_{reply_type.name.lower() if reply_type else 'x'}"] += 1
        return reply

    def _drop(self, reason: str, fmt: str, *args: object) -> Reply | None:
        """Count a datagram that gets no reply; always returns None."""
        self.counters[f"drop_{reason}"] += 1
        log.debug("drop (%s): " + fmt, reason, *args)
        return None

    # handlers (RFC 2131 §4.3.1 .. §4.3.5)

    def on_discover(self, msg: DhcpMessage, now: float) -> Reply | None:
        key, mac = msg.client_key, msg.chaddr.hex()
        requested = msg.ip(DhcpOption.REQUESTED_IP_ADDRESS)
        address = self.leases.choose_address(key, mac, requested, now)
        if address is None:
            return self._drop("no_address", "no address for %s", mac)
        # TODO: no ICMP echo probe of the address before offering it (RFC 2131
        # §4.3.1 SHOULD); conflicts are found only by the client's DECLINE
        self.leases.hold_offer(address, key, now)
        log.debug("OFFER %s to %s", address, mac)
        return self._reply(msg, DhcpMessageType.OFFER, address, lease=True)

    def on_request(self, msg: DhcpMessage, now: float) -> Reply | None:
        key, mac = msg.client_key, msg.chaddr.hex()
        server_id = msg.ip(DhcpOption.SERVER_IDENTIFIER)
        requested = msg.ip(DhcpOption.REQUESTED_IP_ADDRESS)

        # which of the four REQUEST flavours (RFC 2131 §4.3.2)
        if server_id is not None:
            state = "selecting"
            if server_id != self.config.address:
                self.leases.forget_offer(key)  # the client chose another server
                return self._drop("other_server", "%s chose %s", mac, server_id)
            if requested is None:
                return self._drop("no_requested_ip", "SELECTING without option 50")
            address = requested
        elif requested is not None:
            state = "init-reboot"
            address = requested
        elif int(msg.ciaddr):
            state = "renewing/rebinding"
            address = msg.ciaddr
        else:
            return self._drop("no_address_in_request", "REQUEST names no address")

        # wrong network or not ours to give -> NAK
        if address not in self.config.subnet:
            return self._nak(msg, f"{address} is not on this network")
        hostname = self._hostname(msg)
        if not self.leases.available(address, key, mac, now):
            return self._nak(msg, f"{address} is not available")
        lease = self.leases.commit(
            address, key, mac, self.config.lease_time, hostname, now
        )
        log.info("ACK %s to %s (%s) %s", address, mac, state, hostname)
        return self._reply(msg, DhcpMessageType.ACK, lease.address, lease=True)

    def on_decline(self, msg: DhcpMessage, now: float) -> Reply | None:
        address = msg.ip(DhcpOption.REQUESTED_IP_ADDRESS)
        server_id = msg.ip(DhcpOption.SERVER_IDENTIFIER)
        if address is None or server_id != self.config.address:
            return self._drop("bad_decline", "DECLINE without our id or address")
        lease = self.leases.leases.get(address)
        if lease is None or lease.client_key != msg.client_key:
            return self._drop("foreign_decline", "DECLINE of %s by non-holder", address)
        if self.leases.decline(address, msg.client_key, now):
            log.warning(
                "%s declined %s: address in use by another host, parked for %ds",
                msg.chaddr.hex(),
                address,
                self.config.decline_probation,
            )
        return None

    def on_release(self, msg: DhcpMessage, now: float) -> Reply | None:
        if msg.ip(DhcpOption.SERVER_IDENTIFIER) not in (None, self.config.address):
            return self._drop("other_server", "RELEASE for another server")
        if not self.leases.release(msg.ciaddr, msg.client_key, now):
            return self._drop("unknown_release", "RELEASE of %s unknown", msg.ciaddr)
        log.info("%s released %s", msg.chaddr.hex(), msg.ciaddr)
        return None

    def on_inform(self, msg: DhcpMessage, now: float) -> Reply | None:
        if not int(msg.ciaddr) or msg.ciaddr not in self.config.subnet:
            return self._drop("bad_inform", "INFORM from %s", msg.ciaddr)
        # RFC 2131 §4.3.5: no yiaddr, no lease time
        return self._reply(msg, DhcpMessageType.ACK, IPv4Address(0), lease=False)

    def _hostname(self, msg: DhcpMessage) -> str:
        try:
            return msg.text(DhcpOption.HOST_NAME) or ""
        except DhcpError:
            self.counters["bad_hostname_ignored"] += 1
            return ""

    # replies

    def _nak(self, msg: DhcpMessage, why: str) -> Reply | None:
        log.info("NAK to %s: %s", msg.chaddr.hex(), why)
        options: dict[int, bytes] = {
            DhcpOption.DHCP_MESSAGE_TYPE: bytes([DhcpMessageType.NAK]),
            DhcpOption.SERVER_IDENTIFIER: self.config.address.packed,
            DhcpOption.MESSAGE: why.encode("ascii", "replace"),
        }
        return self._finish(msg, IPv4Address(0), options, DhcpMessageType.NAK)

    def _reply(
        self,
        msg: DhcpMessage,
        kind: DhcpMessageType,
        yiaddr: IPv4Address,
        lease: bool,
    ) -> Reply | None:
        options: dict[int, bytes] = {
            DhcpOption.DHCP_MESSAGE_TYPE: bytes([kind]),
            DhcpOption.SERVER_IDENTIFIER: self.config.address.packed,
        }
        if lease:
            c = self.config
            options[DhcpOption.IP_ADDRESS_LEASE_TIME] = encode_uint(c.lease_time, 4)
            options[DhcpOption.RENEWAL_TIME_VALUE] = encode_uint(c.renewal_time, 4)
            options[DhcpOption.REBINDING_TIME_VALUE] = encode_uint(c.rebinding_time, 4)

        # always-sent parameters, then what the client asked for, each once
        wanted = [*ALWAYS_SENT, *msg.parameter_request_list]
        for code in wanted:
            if code in self.parameters and code not in options:
                options[code] = self.parameters[code]
        return self._finish(msg, yiaddr, options, kind)

    def _finish(
        self,
        msg: DhcpMessage,
        yiaddr: IPv4Address,
        options: dict[int, bytes],
        kind: DhcpMessageType,
    ) -> Reply | None:
        # RFC 6842: echo the client identifier
        client_id = msg.options.get(DhcpOption.CLIENT_IDENTIFIER)
        if client_id is not None:
            options[DhcpOption.CLIENT_IDENTIFIER] = client_id
        ciaddr = msg.ciaddr if kind == DhcpMessageType.ACK else IPv4Address(0)
        flags = msg.flags & BROADCAST_FLAG
        if kind == DhcpMessageType.NAK and int(msg.giaddr):
            flags |= BROADCAST_FLAG  # RFC 2131 §4.3.2: relay must broadcast a NAK
        reply = DhcpMessage(
            op=BOOTREPLY,
            xid=msg.xid,
            chaddr=msg.chaddr,
            htype=msg.htype,
            flags=flags,
            ciaddr=ciaddr,
            yiaddr=yiaddr,
            giaddr=msg.giaddr,
            options=options,
        )
        try:
            data = encode(reply, max_size=self._max_size(msg))
        except DhcpError as exc:
            return self._drop("reply_too_large", "%s", exc)
        return self._route(msg, reply, data, kind)

    def _max_size(self, msg: DhcpMessage) -> int:
        asked = msg.u16(DhcpOption.MAXIMUM_DHCP_MESSAGE_SIZE)
        if asked is None:
            return DEFAULT_MAX_MESSAGE_SIZE
        return max(
            DEFAULT_MAX_MESSAGE_SIZE, min(asked - IP_UDP_HEADERS, MAX_REPLY_SIZE)
        )

    def _route(
        self,
        msg: DhcpMessage,
        reply: DhcpMessage,
        data: bytes,
        kind: DhcpMessageType,
    ) -> Reply:
        """Destination in the precedence of RFC 2131 §4.1."""
        if int(msg.giaddr):
            return Reply(data, reply, msg.giaddr, SERVER_PORT)
        if kind == DhcpMessageType.NAK:
            return Reply(data, reply, LIMITED_BROADCAST, CLIENT_PORT)
        if int(msg.ciaddr):
            return Reply(data, reply, msg.ciaddr, CLIENT_PORT)
        if msg.broadcast:
            return Reply(data, reply, LIMITED_BROADCAST, CLIENT_PORT)
        return Reply(data, reply, reply.yiaddr, CLIENT_PORT, needs_neighbour=True)


Handler = Callable[[DhcpServer, DhcpMessage, float], Reply | None]

HANDLERS: dict[DhcpMessageType, Handler] = {
    DhcpMessageType.DISCOVER: DhcpServer.on_discover,
    DhcpMessageType.REQUEST: DhcpServer.on_request,
    DhcpMessageType.DECLINE: DhcpServer.on_decline,
    DhcpMessageType.RELEASE: DhcpServer.on_release,
    DhcpMessageType.INFORM: DhcpServer.on_inform,
}


def build(config: ServerConfig) -> DhcpServer:
    """A server with its lease database as configured (not loaded yet)."""
    leases = LeaseDatabase(
        path=config.lease_file,
        subnet=config.subnet,
        pool_start=config.pool_start,
        pool_end=config.pool_end,
        reservations={r.mac: r.address for r in config.reservations},
        excluded={
            config.address,
            config.subnet.network_address,
            config.subnet.broadcast_address,
            *([config.router] if config.router else []),
        },
        decline_probation=config.decline_probation,
    )
    return DhcpServer(config, leases)
