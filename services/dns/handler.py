"""What the DNS server does with one datagram or TCP message from a client.

Sans-IO: `handle(wire, source, now)` returns a Decision: a reply to send, a
query to forward upstream, a NOTIFY to act on, or a counted drop. `forwarded`
turns the upstream's answer (or its absence) into the client's reply.

Order of business for a query:

1. shorter than a header, or a response (QR=1): silent drop;
2. unparsable: FORMERR if the header and question parse, else silent drop;
3. NOTIFY: accepted only from the zone's primaries (RFC 1996 §3.10);
4. a query from outside `allow_query`: REFUSED;
5. a secondary zone: authoritative answer while the copy may be served
   (see services.dns.secondary), else SERVFAIL;
6. the local domain and the LAN's reverse names: the DHCP clients' names;
7. anything else: the cache, then the upstream resolvers.

A bug while handling a parsed query answers SERVFAIL; nothing escapes.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.versioned

from services.dns import zone as zonedata
from services.dns.cache import Cache, question_of
from services.dns.localnames import LocalNames
from services.dns.secondary import Secondary, Serving

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TSIG_FAILURES = (
    dns.tsig.BadSignature,
    dns.tsig.BadTime,
    dns.tsig.BadKey,
    dns.tsig.BadAlgorithm,
    dns.tsig.PeerError,
    dns.message.UnknownTSIGKey,
)

DNS_HEADER_SIZE = 12
FLAGS_OFFSET = 2
QR_BIT = 0x80  # in the first flags byte
UDP_DEFAULT_SIZE = 512  # RFC 1035 §4.2.1
UDP_MAX_SIZE = 1232  # our EDNS limit (DNS flag day 2020)
TCP_MAX_SIZE = 65535
NEGATIVE_LOCAL_TTL = 60


class Verdict(enum.Enum):
    REPLY = "reply"
    FORWARD = "forward"
    DROP = "drop"


@dataclass
class Decision:
    verdict: Verdict
    reply: bytes | None = None
    query: dns.message.Message | None = None  # for FORWARD and NOTIFY
    notify_zone: str | None = None
    notify_serial: int | None = None
    drop_reason: str | None = None


@dataclass
class ZoneSlot:
    """A secondary zone: its state machine and its data (None until loaded)."""

    secondary: Secondary
    primaries: set[str]
    tsig: dns.tsig.Key | None = None  # required on NOTIFY when set
    data: dns.versioned.Zone | None = None
    origin: dns.name.Name = field(init=False)

    def __post_init__(self) -> None:
        self.origin = dns.name.from_text(self.secondary.name)


class QueryHandler:
    def __init__(
        self,
        zones: list[ZoneSlot],
        local: LocalNames | None,
        cache: Cache,
        forwarding: bool = True,
        allow_query: list[IPNetwork] | None = None,
    ) -> None:
        self.zones = zones
        self.local = local
        self.cache = cache
        self.forwarding = forwarding
        self.allow_query = allow_query
        self.counters: Counter[str] = Counter()
        # TSIG keys of the zones: signed messages are verified while parsing
        self.keyring = {s.tsig.name: s.tsig for s in zones if s.tsig is not None}

    def handle(
        self, wire: bytes, source: tuple[str, int], now: float, tcp: bool = False
    ) -> Decision:
        # garbage and responses: silent drop
        if len(wire) < DNS_HEADER_SIZE:
            return self._drop("short")
        if wire[FLAGS_OFFSET] & QR_BIT:
            return self._drop("response-to-server")
        try:
            query = dns.message.from_wire(wire, keyring=self.keyring or None)
        except TSIG_FAILURES as exc:
            return self._notauth(wire, type(exc).__name__, tcp)
        except dns.exception.DNSException as exc:
            return self._formerr(wire, str(exc) or type(exc).__name__, tcp)

        self.counters["queries"] += 1
        try:
            return self._dispatch(query, source, now, tcp)
        except Exception:
            log.exception("internal error answering %s", query.question)
            self.counters["servfail_internal"] += 1
            return self._reply(query, dns.rcode.SERVFAIL, tcp)

    def forwarded(
        self,
        query: dns.message.Message,
        upstream: dns.message.Message | None,
        now: float,
        tcp: bool = False,
    ) -> bytes:
        """The client's reply to a forwarded query, from the upstream's answer."""
        if upstream is None:
            self.counters["servfail_upstream"] += 1
            return self._reply(query, dns.rcode.SERVFAIL, tcp).reply or b""
        response = self._response(query)
        response.set_rcode(upstream.rcode())
        # clients may keep an answer no longer than we would
        response.answer = [self._capped(r) for r in _chain(query, upstream.answer)]
        response.authority = [self._capped(r) for r in upstream.authority]
        self.cache.put(response, now)
        return self._finish(response, tcp)

    def _capped(self, rrset: dns.rrset.RRset) -> dns.rrset.RRset:
        out = rrset.copy()
        out.ttl = min(rrset.ttl, int(self.cache.policy.max_ttl))
        return out

    # -- steps ----------------------------------------------------------------

    def _dispatch(
        self,
        query: dns.message.Message,
        source: tuple[str, int],
        now: float,
        tcp: bool,
    ) -> Decision:
        opcode = query.opcode()
        if opcode == dns.opcode.NOTIFY:
            return self._notify(query, source, tcp)
        if not self._allowed(source[0]):
            # not a LAN client: no open resolver on other sides
            self.counters["refused_client"] += 1
            return self._reply(query, dns.rcode.REFUSED, tcp)
        if opcode != dns.opcode.QUERY:
            self.counters["notimp"] += 1
            return self._reply(query, dns.rcode.NOTIMP, tcp)
        if len(query.question) != 1:
            self.counters["formerr"] += 1
            return self._reply(query, dns.rcode.FORMERR, tcp)
        q = query.question[0]
        if q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            self.counters["refused_xfr"] += 1
            return self._reply(query, dns.rcode.REFUSED, tcp)

        # our secondary zones
        slot = self._zone_for(q.name)
        if slot is not None:
            return self._authoritative(query, slot, now, tcp)

        # the LAN's own names
        if self.local is not None:
            self.local.refresh()
            if self.local.covers(q.name):
                return self._local(query, self.local, tcp)

        # the cache, then upstream
        question = question_of(query)
        assert question is not None
        entry = self.cache.get(question, now)
        if entry is not None:
            response = self._response(query)
            response.set_rcode(dns.rcode.Rcode.make(entry.rcode))
            response.answer = entry.answer
            response.authority = entry.authority
            self.counters["cache_answers"] += 1
            return Decision(Verdict.REPLY, reply=self._finish(response, tcp))
        if not self.forwarding or not query.flags & dns.flags.RD:
            self.counters["refused"] += 1
            return self._reply(query, dns.rcode.REFUSED, tcp)
        self.counters["forwarded"] += 1
        return Decision(Verdict.FORWARD, query=query)

    def _allowed(self, address: str) -> bool:
        if self.allow_query is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.allow_query)

    def _zone_for(self, qname: dns.name.Name) -> ZoneSlot | None:
        best: ZoneSlot | None = None
        for slot in self.zones:
            if qname.is_subdomain(slot.origin) and (
                best is None or len(slot.origin) > len(best.origin)
            ):
                best = slot
        return best

    def _authoritative(
        self, query: dns.message.Message, slot: ZoneSlot, now: float, tcp: bool
    ) -> Decision:
        serving = slot.secondary.serving(now)
        if slot.data is None or serving in (Serving.EMPTY, Serving.TOO_OLD):
            self.counters["servfail_zone"] += 1
            return self._reply(query, dns.rcode.SERVFAIL, tcp)
        q = query.question[0]
        found = zonedata.lookup(slot.data, q.name, q.rdtype)
        response = self._response(query)
        response.flags |= dns.flags.AA
        response.set_rcode(dns.rcode.Rcode.make(found.rcode))
        response.answer = found.answer
        response.authority = found.authority
        self.counters["authoritative"] += 1
        if serving is Serving.PAST_EXPIRE:
            self.counters["answers_past_expire"] += 1
        return Decision(Verdict.REPLY, reply=self._finish(response, tcp))

    def _local(
        self, query: dns.message.Message, local: LocalNames, tcp: bool
    ) -> Decision:
        q = query.question[0]
        records = local.answer(q.name, q.rdtype)
        response = self._response(query)
        response.flags |= dns.flags.AA
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.answer = records
        self.counters["local"] += 1
        return Decision(Verdict.REPLY, reply=self._finish(response, tcp))

    def _notify(
        self, query: dns.message.Message, source: tuple[str, int], tcp: bool
    ) -> Decision:
        if len(query.question) != 1:
            self.counters["formerr"] += 1
            return self._reply(query, dns.rcode.FORMERR, tcp)
        q = query.question[0]
        slot = next((s for s in self.zones if s.origin == q.name), None)
        if slot is None:
            self.counters["notify_unknown_zone"] += 1
            return self._reply(query, dns.rcode.NOTAUTH, tcp)
        if source[0] not in slot.primaries:
            # RFC 1996 §3.10: only from a known primary
            log.warning("NOTIFY for %s from %s refused", q.name, source[0])
            self.counters["notify_refused"] += 1
            return self._reply(query, dns.rcode.REFUSED, tcp)
        if slot.tsig is not None and (
            not query.had_tsig or query.keyname != slot.tsig.name
        ):
            # RFC 8945: the zone's key is required; a bad signature never gets here
            log.warning(
                "NOTIFY for %s from %s without the zone's TSIG", q.name, source[0]
            )
            self.counters["notify_unsigned"] += 1
            return self._reply(query, dns.rcode.REFUSED, tcp)
        serial = None
        for rrset in query.answer:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                serial = rrset[0].serial
        response = self._response(query)
        response.flags |= dns.flags.AA
        log.info("NOTIFY for %s from %s, serial %s", q.name, source[0], serial)
        return Decision(
            Verdict.REPLY,
            reply=self._finish(response, tcp),
            query=query,
            notify_zone=slot.secondary.name,
            notify_serial=serial,
        )

    # -- replies --------------------------------------------------------------

    def _drop(self, reason: str) -> Decision:
        self.counters[f"drop_{reason}"] += 1
        log.debug("drop: %s", reason)
        return Decision(Verdict.DROP, drop_reason=reason)

    def _formerr(self, wire: bytes, why: str, tcp: bool) -> Decision:
        return self._question_only_reply(wire, dns.rcode.FORMERR, why, tcp)

    def _notauth(self, wire: bytes, why: str, tcp: bool) -> Decision:
        # RFC 8945 §5.2: a failed TSIG check is answered NOTAUTH, unsigned
        log.warning("TSIG check failed: %s", why)
        return self._question_only_reply(wire, dns.rcode.NOTAUTH, why, tcp)

    def _question_only_reply(
        self, wire: bytes, rcode: dns.rcode.Rcode, why: str, tcp: bool
    ) -> Decision:
        try:
            query = dns.message.from_wire(wire, question_only=True)
        except dns.exception.DNSException:
            return self._drop("garbage")
        if not query.question:
            return self._drop("garbage")
        self.counters[dns.rcode.to_text(rcode).lower()] += 1
        log.debug("%s: %s", dns.rcode.to_text(rcode), why)
        return self._reply(query, rcode, tcp)

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query, our_payload=UDP_MAX_SIZE)
        response.flags |= dns.flags.RA
        return response

    def _reply(self, query: dns.message.Message, rcode: int, tcp: bool) -> Decision:
        try:
            response = self._response(query)
        except dns.exception.DNSException:
            return self._drop("unanswerable")
        response.set_rcode(dns.rcode.Rcode.make(rcode))
        return Decision(Verdict.REPLY, reply=self._finish(response, tcp))

    def _finish(self, response: dns.message.Message, tcp: bool) -> bytes:
        limit = TCP_MAX_SIZE
        if not tcp:
            limit = UDP_DEFAULT_SIZE
            if response.edns >= 0:
                limit = max(
                    UDP_DEFAULT_SIZE, min(response.request_payload, UDP_MAX_SIZE)
                )
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 1035 §4.2.1 / RFC 7766: truncate, the client retries over TCP
            self.counters["truncated"] += 1
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)


def _chain(
    query: dns.message.Message, answer: list[dns.rrset.RRset]
) -> list[dns.rrset.RRset]:
    """The answer's records for the question's name and its CNAME chain only;
    unrelated records an upstream adds are not passed on (nor cached)."""
    names = {query.question[0].name}
    kept = []
    for rrset in answer:
        if rrset.name not in names:
            continue
        kept.append(rrset)
        if rrset.rdtype == dns.rdatatype.CNAME and len(rrset):
            names.add(rrset[0].target)
    return kept
