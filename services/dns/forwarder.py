"""Asking the upstream resolvers (asyncio adapter).

Each upstream query gets a fresh random ID and its own UDP socket on a random
source port. A reply is accepted only if it comes from the resolver's address
and port, carries our ID, and repeats our question name, type and class
(the checks whose absence made DNSpooq possible); anything else arriving on the
socket is counted and ignored while we keep waiting. Identical questions
asked while one is in flight share that upstream query. A truncated reply is
retried over TCP. Resolvers are tried in order until one answers; when none
does, queries fail fast (SERVFAIL) for HOLD_DOWN seconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import Counter

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from services.dns.cache import Question, question_of

log = logging.getLogger(__name__)

UPSTREAM_PAYLOAD = 1232
MAX_INFLIGHT = 512
# source ports drawn for upstream queries (RFC 5452 §9.2: as many as possible)
SOURCE_PORT_LOW = 1024
SOURCE_PORT_HIGH = 65535
PORT_ATTEMPTS = 16
# after every resolver timed out, answer SERVFAIL at once for this long rather
# than make each LAN client wait out the timeout while the WAN is down
HOLD_DOWN = 5.0


class _ReplyProtocol(asyncio.DatagramProtocol):
    def __init__(
        self,
        forwarder: Forwarder,
        expect: tuple[str, int],
        query_id: int,
        question: Question,
    ) -> None:
        self.forwarder = forwarder
        self.expect = expect
        self.query_id = query_id
        self.question = question
        self.reply: asyncio.Future[dns.message.Message] = (
            asyncio.get_running_loop().create_future()
        )

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        counters = self.forwarder.counters
        if (str(addr[0]), int(addr[1])) != self.expect:
            counters["upstream_wrong_source"] += 1
            log.warning("upstream reply from unexpected %s:%s ignored", *addr[:2])
            return
        try:
            msg = dns.message.from_wire(data)
        except dns.exception.DNSException:
            counters["upstream_unparsable"] += 1
            return
        if msg.id != self.query_id or not msg.flags & dns.flags.QR:
            counters["upstream_wrong_id"] += 1
            log.warning("upstream reply with wrong id %d ignored", msg.id)
            return
        if question_of(msg) != self.question:
            counters["upstream_wrong_question"] += 1
            log.warning("upstream reply with wrong question ignored")
            return
        if not self.reply.done():
            self.reply.set_result(msg)

    def error_received(self, exc: Exception) -> None:
        log.debug("upstream socket error: %s", exc)


class Forwarder:
    def __init__(self, resolvers: list[tuple[str, int]], timeout: float = 2.0) -> None:
        self.resolvers = resolvers
        self.timeout = timeout
        self.inflight: dict[Question, asyncio.Future[dns.message.Message | None]] = {}
        self.counters: Counter[str] = Counter()
        self.down_until = 0.0  # monotonic; see HOLD_DOWN

    async def resolve(self, query: dns.message.Message) -> dns.message.Message | None:
        """The upstream answer to the client's question, or None if none came."""
        question = question_of(query)
        if question is None:
            return None
        shared = self.inflight.get(question)
        if shared is not None:
            self.counters["upstream_shared"] += 1
            return await asyncio.shield(shared)
        if time.monotonic() < self.down_until:
            # no resolver answered a moment ago (tunnel down?): fail fast
            self.counters["upstream_down_fast_fail"] += 1
            return None
        if len(self.inflight) >= MAX_INFLIGHT:
            self.counters["upstream_overload"] += 1
            return None
        future: asyncio.Future[dns.message.Message | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.inflight[question] = future
        try:
            result = await self._ask_all(question)
            future.set_result(result)
            return result
        except BaseException:
            future.set_result(None)
            raise
        finally:
            del self.inflight[question]

    async def _ask_all(self, question: Question) -> dns.message.Message | None:
        answered = False
        for resolver in self.resolvers:
            reply = await self._ask(resolver, question)
            answered = answered or reply is not None
            if reply is not None and reply.rcode() != dns.rcode.SERVFAIL:
                return reply
        if not answered:
            self.down_until = time.monotonic() + HOLD_DOWN
            log.info("no upstream resolver answers; failing fast for %.0fs", HOLD_DOWN)
        return None

    async def _ask(
        self, resolver: tuple[str, int], question: Question
    ) -> dns.message.Message | None:
        qname, qtype, qclass = question
        query = dns.message.make_query(
            qname,
            dns.rdatatype.RdataType.make(qtype),
            dns.rdataclass.RdataClass.make(qclass),
            use_edns=0,
            payload=UPSTREAM_PAYLOAD,
        )
        query.id = secrets.randbelow(1 << 16)
        query.flags |= dns.flags.RD
        self.counters["upstream_queries"] += 1
        loop = asyncio.get_running_loop()
        sock = _random_port_socket(resolver[0])
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _ReplyProtocol(self, resolver, query.id, question), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        try:
            transport.sendto(query.to_wire(), resolver)
            reply = await asyncio.wait_for(protocol.reply, self.timeout)
        except (TimeoutError, OSError) as exc:
            self.counters["upstream_timeouts"] += 1
            log.info(
                "upstream %s: no answer for %s (%s)",
                resolver[0],
                qname,
                type(exc).__name__,
            )
            return None
        finally:
            transport.close()
        if reply.flags & dns.flags.TC:
            return await self._ask_tcp(resolver, query)
        return reply

    async def _ask_tcp(
        self, resolver: tuple[str, int], query: dns.message.Message
    ) -> dns.message.Message | None:
        self.counters["upstream_tcp"] += 1
        try:
            reply = await dns.asyncquery.tcp(
                query, resolver[0], timeout=self.timeout, port=resolver[1]
            )
        except (dns.exception.DNSException, OSError, TimeoutError) as exc:
            self.counters["upstream_timeouts"] += 1
            log.info("upstream %s over TCP failed: %s", resolver[0], exc)
            return None
        return reply


def _random_port_socket(resolver: str) -> socket.socket:
    """A UDP socket on a source port drawn at random (RFC 5452 §9.2)."""
    family = socket.AF_INET6 if ":" in resolver else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    span = SOURCE_PORT_HIGH - SOURCE_PORT_LOW + 1
    for _ in range(PORT_ATTEMPTS):
        port = SOURCE_PORT_LOW + secrets.randbelow(span)
        try:
            sock.bind((wildcard, port))
            return sock
        except OSError:
            continue  # in use: draw again
    sock.bind((wildcard, 0))  # the kernel's own random choice
    return sock
