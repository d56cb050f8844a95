"""The forwarder's answer cache: TTL-bounded, with negative caching (RFC 2308).

Sans-IO: `put(response, now)` and `get(question, now)` take the time. An entry
lives for the smallest TTL of its records, clamped to [min_ttl, max_ttl].
NXDOMAIN and NODATA answers live for min(SOA TTL, SOA MINIMUM) from the
authority section (RFC 2308 §5), clamped to negative_max_ttl; a negative answer
without a SOA is not cached (RFC 2308 §5). SERVFAIL and other errors are not
cached. Answers handed out carry TTLs reduced by the time spent in the cache.
The cache holds at most `size` entries and evicts the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

Question = tuple[dns.name.Name, int, int]  # qname, qtype, qclass


@dataclass
class Entry:
    stored_at: float
    expires_at: float
    rcode: int
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]


@dataclass(frozen=True)
class CachePolicy:
    min_ttl: float = 0.0
    max_ttl: float = 86400.0
    negative_max_ttl: float = 3600.0
    size: int = 10000


def question_of(msg: dns.message.Message) -> Question | None:
    if len(msg.question) != 1:
        return None
    q = msg.question[0]
    return (q.name.canonicalize(), q.rdtype, q.rdclass)


class Cache:
    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self.entries: OrderedDict[Question, Entry] = OrderedDict()
        self.counters = {"hits": 0, "misses": 0, "insertions": 0, "evictions": 0}

    def put(self, response: dns.message.Message, now: float) -> bool:
        """Store `response` if it is cacheable; returns whether it was."""
        question = question_of(response)
        if question is None or response.flags & dns.flags.TC:
            return False
        ttl = self._lifetime(response)
        if ttl is None or ttl <= 0:
            return False
        self.entries[question] = Entry(
            now,
            now + ttl,
            response.rcode(),
            [r.copy() for r in response.answer],
            [r.copy() for r in response.authority],
        )
        self.entries.move_to_end(question)
        self.counters["insertions"] += 1
        while len(self.entries) > self.policy.size:
            self.entries.popitem(last=False)
            self.counters["evictions"] += 1
        return True

    def get(self, question: Question, now: float) -> Entry | None:
        """A live entry with TTLs aged by the time spent here, or None."""
        entry = self.entries.get(question)
        if entry is None or now >= entry.expires_at:
            if entry is not None:
                del self.entries[question]
            self.counters["misses"] += 1
            return None
        self.entries.move_to_end(question)
        self.counters["hits"] += 1
        elapsed = int(now - entry.stored_at)
        remaining = max(0, int(entry.expires_at - now))
        return Entry(
            entry.stored_at,
            entry.expires_at,
            entry.rcode,
            [_aged(r, elapsed, remaining) for r in entry.answer],
            [_aged(r, elapsed, remaining) for r in entry.authority],
        )

    def _lifetime(self, response: dns.message.Message) -> float | None:
        rcode = response.rcode()
        p = self.policy
        if rcode == dns.rcode.NOERROR and response.answer:
            ttl = min(r.ttl for r in response.answer)
            return min(max(float(ttl), p.min_ttl), p.max_ttl)
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            # negative answer: needs the SOA (RFC 2308 §5)
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                    ttl = min(rrset.ttl, rrset[0].minimum)
                    return min(float(ttl), p.negative_max_ttl)
        return None

    def status(self) -> dict[str, int]:
        return {"entries": len(self.entries), **self.counters}


def _aged(rrset: dns.rrset.RRset, elapsed: int, remaining: int) -> dns.rrset.RRset:
    out = rrset.copy()
    # never hand out more than the entry's remaining life (min_ttl may raise it)
    out.ttl = max(0, min(rrset.ttl - elapsed, remaining))
    return out
