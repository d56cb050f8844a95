"""Sans-IO DHCP client core (RFC 2131 §4.4, figure 5).

    INIT -> SELECTING -(OFFER)-> REQUESTING -(ACK)-> BOUND
    BOUND -(T1)-> RENEWING -(T2)-> REBINDING -(lease expiry)-> INIT
    REQUESTING/RENEWING/REBINDING -(NAK)-> INIT

The core is driven by the adapter with three calls, each taking `now`
(monotonic seconds) and returning a list of actions:

    start(now)            begin in INIT
    receive(payload, now) a DHCP message that arrived on port 68
    on_timer(now)         the time in `timer` has come

Actions: `Transmit` (bytes, to the broadcast address or unicast to the
server), `Configure` (a new or renewed lease, with the one it replaces) and
`Deconfigure` (the lease is gone: NAK or expiry). Anything a server sends
that does not fit the current state is dropped and counted.

Retransmission (RFC 2131 §4.1, §4.4.5): DISCOVER and REQUEST back off 4, 8,
16, 32, 64 s with +-1 s of jitter; a REQUEST in REQUESTING is given up after
MAX_REQUEST_ATTEMPTS and the client starts over. In RENEWING/REBINDING the
client waits half the time left until T2 / expiry, at least
`min_rebind_wait` seconds but never past T2 / expiry.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv4Network

from services.dhcp.message import (
    BOOTREPLY,
    BOOTREQUEST,
    DhcpError,
    DhcpMessage,
    DhcpMessageType,
    DhcpOption,
    decode,
    decode_domain_search,
    encode,
    encode_uint,
)

log = logging.getLogger(__name__)

FIRST_BACKOFF = 4.0
MAX_BACKOFF = 64.0
JITTER = 1.0
MAX_REQUEST_ATTEMPTS = 4
NAK_RESTART_DELAY = 1.0  # do not storm a server that NAKs us
MIN_REBIND_WAIT = 60.0  # RFC 2131 §4.4.5
INFINITE_LEASE = 0xFFFFFFFF
FOREVER = 10.0**9
MAX_MESSAGE_SIZE = 1500
REQUESTED_PARAMETERS = bytes(
    [
        DhcpOption.SUBNET_MASK,
        DhcpOption.ROUTER,
        DhcpOption.DOMAIN_NAME_SERVER,
        DhcpOption.HOST_NAME,
        DhcpOption.DOMAIN_NAME,
        DhcpOption.INTERFACE_MTU,
        DhcpOption.BROADCAST_ADDRESS,
        DhcpOption.NTP_SERVERS,
        DhcpOption.IP_ADDRESS_LEASE_TIME,
        DhcpOption.SERVER_IDENTIFIER,
        DhcpOption.RENEWAL_TIME_VALUE,
        DhcpOption.REBINDING_TIME_VALUE,
        DhcpOption.DOMAIN_SEARCH,
    ]
)


class ClientState(Enum):
    INIT = "init"
    SELECTING = "selecting"
    REQUESTING = "requesting"
    BOUND = "bound"
    RENEWING = "renewing"
    REBINDING = "rebinding"


@dataclass
class ClientLease:
    address: IPv4Address
    prefixlen: int
    server: IPv4Address
    lease_time: float
    renewal_time: float  # T1, seconds after `acquired`
    rebinding_time: float  # T2
    acquired: float  # monotonic time the REQUEST that got the ACK was sent
    routers: list[IPv4Address] = field(default_factory=list)
    dns_servers: list[IPv4Address] = field(default_factory=list)
    ntp_servers: list[IPv4Address] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    mtu: int | None = None

    @property
    def t1(self) -> float:
        return self.acquired + self.renewal_time

    @property
    def t2(self) -> float:
        return self.acquired + self.rebinding_time

    @property
    def expiry(self) -> float:
        return self.acquired + self.lease_time


@dataclass
class Transmit:
    data: bytes
    destination: IPv4Address | None  # None: broadcast on the link
    source: IPv4Address = IPv4Address(0)


@dataclass
class Configure:
    lease: ClientLease
    old: ClientLease | None


@dataclass
class Deconfigure:
    lease: ClientLease
    reason: str  # "nak" or "expired"


Action = Transmit | Configure | Deconfigure


class DhcpClient:
    def __init__(
        self,
        chaddr: bytes,
        rng: random.Random | None = None,
        hostname: str | None = None,
        client_id: bytes | None = None,
        min_rebind_wait: float = MIN_REBIND_WAIT,
        previous_address: IPv4Address | None = None,
    ) -> None:
        self.chaddr = chaddr
        self.previous_address = previous_address  # asked for again (option 50)
        self.rng = rng or random.Random()
        self.hostname = hostname
        self.client_id = client_id
        self.min_rebind_wait = min_rebind_wait
        self.state = ClientState.INIT
        self.lease: ClientLease | None = None
        self.timer: float | None = None
        self.counters: Counter[str] = Counter()
        self.xid = 0
        self.attempts = 0
        self.started = 0.0  # when this exchange began (secs field)
        self.offer: tuple[IPv4Address, IPv4Address] | None = None  # (yiaddr, server)
        self.sent_at = 0.0

    # entry points

    def start(self, now: float) -> list[Action]:
        return self._discover(now)

    def receive(self, payload: bytes, now: float) -> list[Action]:
        try:
            msg = decode(payload)
            kind = msg.message_type
        except DhcpError as exc:
            return self._drop("malformed", "%s", exc)
        if msg.op != BOOTREPLY or msg.xid != self.xid or msg.chaddr != self.chaddr:
            return self._drop("not_ours", "xid %08x", msg.xid)
        handler = RECEIVE_TABLE.get(self.state, {}).get(kind)  # type: ignore[arg-type]
        if handler is None:
            return self._drop("unexpected", "%s in %s", kind, self.state.value)
        try:
            return handler(self, msg, now)
        except DhcpError as exc:
            return self._drop("malformed_option", "%s", exc)

    def on_timer(self, now: float) -> list[Action]:
        if self.timer is None or now < self.timer:
            return []
        return TIMER_TABLE[self.state](self, now)

    def renew(self, now: float) -> list[Action]:
        """Renew at once (operator request), as if T1 had come."""
        if self.state == ClientState.BOUND:
            return self._renew(now)
        return []

    def release(self) -> list[Action]:
        """A DHCPRELEASE for the current lease (RFC 2131 §4.4.6), if any."""
        if self.lease is None or self.state == ClientState.INIT:
            return []
        lease = self.lease
        msg = self._message(DhcpMessageType.RELEASE, self.rng.getrandbits(32), 0.0)
        msg.ciaddr = lease.address
        msg.options[DhcpOption.SERVER_IDENTIFIER] = lease.server.packed
        msg.options.pop(DhcpOption.PARAMETER_REQUEST_LIST, None)
        self.state, self.lease, self.timer = ClientState.INIT, None, None
        return [Transmit(encode(msg), lease.server, lease.address)]

    def _drop(self, reason: str, fmt: str, *args: object) -> list[Action]:
        self.counters[f"drop_{reason}"] += 1
        log.debug("drop (%s): " + fmt, reason, *args)
        return []

    # outgoing messages

    def _message(self, kind: DhcpMessageType, xid: int, now: float) -> DhcpMessage:
        options: dict[int, bytes] = {
            DhcpOption.DHCP_MESSAGE_TYPE: bytes([kind]),
            DhcpOption.PARAMETER_REQUEST_LIST: REQUESTED_PARAMETERS,
            DhcpOption.MAXIMUM_DHCP_MESSAGE_SIZE: encode_uint(MAX_MESSAGE_SIZE, 2),
        }
        if self.client_id:
            options[DhcpOption.CLIENT_IDENTIFIER] = self.client_id
        if self.hostname:
            options[DhcpOption.HOST_NAME] = self.hostname.encode("ascii")
        secs = min(0xFFFF, int(max(0.0, now - self.started)))
        return DhcpMessage(
            op=BOOTREQUEST, xid=xid, chaddr=self.chaddr, secs=secs, options=options
        )

    def _backoff(self) -> float:
        base = min(MAX_BACKOFF, FIRST_BACKOFF * 2**self.attempts)
        return max(1.0, base + self.rng.uniform(-JITTER, JITTER))

    def _discover(self, now: float) -> list[Action]:
        if self.state not in (ClientState.SELECTING,):
            self.xid = self.rng.getrandbits(32)
            self.started, self.attempts = now, 0
        self.state = ClientState.SELECTING
        msg = self._message(DhcpMessageType.DISCOVER, self.xid, now)
        wanted = self.lease.address if self.lease else self.previous_address
        if wanted is not None:  # ask for the old address back (RFC 2131 §4.4.1)
            msg.options[DhcpOption.REQUESTED_IP_ADDRESS] = wanted.packed
        self.timer = now + self._backoff()
        self.attempts += 1
        self.counters["tx_discover"] += 1
        return [Transmit(encode(msg), None)]

    def _request_selected(self, now: float) -> list[Action]:
        assert self.offer is not None
        address, server = self.offer
        msg = self._message(DhcpMessageType.REQUEST, self.xid, now)
        msg.options[DhcpOption.REQUESTED_IP_ADDRESS] = address.packed
        msg.options[DhcpOption.SERVER_IDENTIFIER] = server.packed
        self.sent_at = now if self.attempts == 0 else self.sent_at
        self.timer = now + self._backoff()
        self.attempts += 1
        self.counters["tx_request"] += 1
        return [Transmit(encode(msg), None)]

    def _request_extend(self, now: float, broadcast: bool) -> list[Action]:
        """REQUEST with ciaddr: unicast to the server (RENEWING) or broadcast."""
        assert self.lease is not None
        msg = self._message(DhcpMessageType.REQUEST, self.xid, now)
        msg.ciaddr = self.lease.address
        if self.attempts == 0:
            self.sent_at = now
        self.attempts += 1
        self.counters["tx_request"] += 1
        destination = None if broadcast else self.lease.server
        return [Transmit(encode(msg), destination, self.lease.address)]

    # timers

    def _selecting_timer(self, now: float) -> list[Action]:
        return self._discover(now)

    def _requesting_timer(self, now: float) -> list[Action]:
        if self.attempts >= MAX_REQUEST_ATTEMPTS:
            log.info("no answer to REQUEST, starting over")
            self.state = ClientState.INIT
            return self._discover(now)
        return self._request_selected(now)

    def _bound_timer(self, now: float) -> list[Action]:
        return self._renew(now)

    def _renew(self, now: float) -> list[Action]:
        self.state = ClientState.RENEWING
        self.xid, self.started, self.attempts = self.rng.getrandbits(32), now, 0
        log.info("renewing %s", self.lease.address if self.lease else None)
        return self._renewing_timer(now)

    def _renewing_timer(self, now: float) -> list[Action]:
        assert self.lease is not None
        if now >= self.lease.t2:
            self.state = ClientState.REBINDING
            self.attempts = 0
            log.info("no answer from %s, rebinding", self.lease.server)
            return self._rebinding_timer(now)
        self.timer = self._retransmit_at(now, self.lease.t2)
        return self._request_extend(now, broadcast=False)

    def _rebinding_timer(self, now: float) -> list[Action]:
        assert self.lease is not None
        if now >= self.lease.expiry:
            return self._lose_lease(now, "expired")
        self.timer = self._retransmit_at(now, self.lease.expiry)
        return self._request_extend(now, broadcast=True)

    def _retransmit_at(self, now: float, deadline: float) -> float:
        wait = max((deadline - now) / 2, self.min_rebind_wait)
        return min(now + wait, deadline)

    def _init_timer(self, now: float) -> list[Action]:
        return self._discover(now)

    # received messages

    def _on_offer(self, msg: DhcpMessage, now: float) -> list[Action]:
        server = msg.ip(DhcpOption.SERVER_IDENTIFIER)
        if server is None or not int(msg.yiaddr):
            return self._drop("bad_offer", "OFFER without server id or yiaddr")
        log.info("offer of %s from %s", msg.yiaddr, server)
        self.offer = (msg.yiaddr, server)
        self.state, self.attempts = ClientState.REQUESTING, 0
        return self._request_selected(now)

    # TODO: the offered address is not ARP-probed before use (RFC 2131 §4.4.1
    # SHOULD, DECLINE on conflict); a restarted client asks for its last
    # address in a DISCOVER rather than going through INIT-REBOOT
    def _on_ack(self, msg: DhcpMessage, now: float) -> list[Action]:
        if self.state == ClientState.REQUESTING:
            assert self.offer is not None
            if msg.ip(DhcpOption.SERVER_IDENTIFIER) not in (None, self.offer[1]):
                return self._drop("other_server", "ACK from an unchosen server")
        lease = self._lease_from(msg)
        if lease is None:
            return []
        old, self.lease = self.lease, lease
        self.previous_address = lease.address
        self.state, self.attempts, self.offer = ClientState.BOUND, 0, None
        self.timer = lease.t1
        self.counters["rx_ack"] += 1
        if old is None or old.address != lease.address:
            log.info(
                "bound to %s/%d from %s", lease.address, lease.prefixlen, lease.server
            )
        return [Configure(lease, old)]

    def _on_nak(self, msg: DhcpMessage, now: float) -> list[Action]:
        self.counters["rx_nak"] += 1
        why = msg.options.get(DhcpOption.MESSAGE, b"").decode("ascii", "replace")
        log.warning("NAK in %s: %s", self.state.value, why[:80])
        return self._lose_lease(now, "nak", delay=NAK_RESTART_DELAY)

    def _lose_lease(self, now: float, reason: str, delay: float = 0.0) -> list[Action]:
        actions: list[Action] = []
        if self.lease is not None:
            actions.append(Deconfigure(self.lease, reason))
            log.warning("lost lease of %s (%s)", self.lease.address, reason)
        self.lease, self.offer = None, None
        if reason == "nak":
            self.previous_address = None  # the server said it is not ours
        self.state = ClientState.INIT
        if delay:
            self.timer = now + delay
            return actions
        return actions + self._discover(now)

    def _lease_from(self, msg: DhcpMessage) -> ClientLease | None:
        """Lease parameters of an ACK; None (counted) if unusable."""
        lease_time = msg.u32(DhcpOption.IP_ADDRESS_LEASE_TIME)
        server = msg.ip(DhcpOption.SERVER_IDENTIFIER)
        if server is None and self.lease is not None:
            server = self.lease.server
        if lease_time is None or server is None or not int(msg.yiaddr):
            self._drop("bad_ack", "ACK without lease time, server id or yiaddr")
            return None
        length = FOREVER if lease_time == INFINITE_LEASE else float(lease_time)

        # T1 < T2 < lease, else the RFC 2131 §4.4.5 defaults
        t1 = msg.u32(DhcpOption.RENEWAL_TIME_VALUE)
        t2 = msg.u32(DhcpOption.REBINDING_TIME_VALUE)
        renewal = float(t1) if t1 is not None else length * 0.5
        rebinding = float(t2) if t2 is not None else length * 0.875
        if not 0 < renewal < rebinding <= length:
            renewal, rebinding = length * 0.5, length * 0.875

        lease = ClientLease(
            address=msg.yiaddr,
            prefixlen=_prefixlen(msg),
            server=server,
            lease_time=length,
            renewal_time=renewal,
            rebinding_time=rebinding,
            acquired=self.sent_at,
        )
        _optional(self, lambda: setattr(lease, "routers", msg.ip_list(3)))
        _optional(self, lambda: setattr(lease, "dns_servers", msg.ip_list(6)))
        _optional(self, lambda: setattr(lease, "ntp_servers", msg.ip_list(42)))
        _optional(self, lambda: setattr(lease, "domain", msg.text(15) or ""))
        _optional(self, lambda: setattr(lease, "mtu", msg.u16(26)))
        search = msg.options.get(DhcpOption.DOMAIN_SEARCH)
        if search:
            _optional(
                self, lambda: setattr(lease, "search", decode_domain_search(search))
            )
        return lease


def _optional(client: DhcpClient, assign: Callable[[], None]) -> None:
    """Apply one optional parameter; a malformed one is ignored and counted."""
    try:
        assign()
    except DhcpError:
        client.counters["bad_option_ignored"] += 1


def _prefixlen(msg: DhcpMessage) -> int:
    try:
        mask = msg.ip(DhcpOption.SUBNET_MASK)
        if mask is not None:
            return IPv4Network(f"0.0.0.0/{mask}").prefixlen
    except (DhcpError, ValueError):
        pass
    return 32


Handler = Callable[[DhcpClient, DhcpMessage, float], list[Action]]
_ACK_OR_NAK: dict[DhcpMessageType, Handler] = {
    DhcpMessageType.ACK: DhcpClient._on_ack,
    DhcpMessageType.NAK: DhcpClient._on_nak,
}
RECEIVE_TABLE: dict[ClientState, dict[DhcpMessageType, Handler]] = {
    ClientState.SELECTING: {DhcpMessageType.OFFER: DhcpClient._on_offer},
    ClientState.REQUESTING: _ACK_OR_NAK,
    ClientState.RENEWING: _ACK_OR_NAK,
    ClientState.REBINDING: _ACK_OR_NAK,
}
TIMER_TABLE: dict[ClientState, Callable[[DhcpClient, float], list[Action]]] = {
    ClientState.INIT: DhcpClient._init_timer,
    ClientState.SELECTING: DhcpClient._selecting_timer,
    ClientState.REQUESTING: DhcpClient._requesting_timer,
    ClientState.BOUND: DhcpClient._bound_timer,
    ClientState.RENEWING: DhcpClient._renewing_timer,
    ClientState.REBINDING: DhcpClient._rebinding_timer,
}
