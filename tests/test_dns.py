"""DNS cores: secondary timers, zone copy, cache, local names, query handling
(with hypothesis fuzzing of the handling path)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.versioned
import dns.zone
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.dhcp.lease import LeaseDatabase
from services.dns import config as dnsconfig
from services.dns import zone as zonedata
from services.dns.cache import Cache, CachePolicy
from services.dns.daemon import DnsServer
from services.dns.handler import Decision, QueryHandler, Verdict, ZoneSlot
from services.dns.localnames import LocalNames
from services.dns.secondary import Action, Secondary, Serving, SoaTimers, serial_gt

T0 = 1_796_300_000.0
ZONE_TEXT = """\
$ORIGIN corp.example.
$TTL 300
@   IN SOA ns1 hostmaster 7 600 60 3600 120
    IN NS  ns1
ns1 IN A   10.99.0.1
www IN A   10.20.0.80
alias IN CNAME www
a.b.c IN A 10.20.0.1
"""
PRIMARY = "10.99.0.1"


def corp_zone() -> dns.versioned.Zone:
    z = dns.zone.from_text(ZONE_TEXT, relativize=False, zone_factory=dns.versioned.Zone)
    assert isinstance(z, dns.versioned.Zone)
    return z


# -- secondary state machine --------------------------------------------------


def test_serial_arithmetic_rfc1982() -> None:
    assert serial_gt(2, 1) and not serial_gt(1, 2) and not serial_gt(5, 5)
    assert serial_gt(0, 0xFFFFFFFF)  # wrapped forward
    assert serial_gt(0x7FFFFFFF, 0) and not serial_gt(0x80000001, 1)


def test_secondary_life() -> None:
    sec = Secondary("corp.example.", max_age=7200)
    assert sec.serving(T0) is Serving.EMPTY
    assert sec.due(T0) is Action.AXFR
    assert sec.due(T0) is None  # pending until answered
    sec.transferred(SoaTimers(7, 600, 60, 3600), T0, Action.AXFR)
    assert sec.serving(T0) is Serving.FRESH and sec.next_timer() == T0 + 600

    # refresh: same serial, then a newer one -> IXFR, which fails -> AXFR
    assert sec.due(T0 + 599) is None
    assert sec.due(T0 + 600) is Action.CHECK_SOA
    sec.soa_answer(7, T0 + 600)
    assert sec.next_timer() == T0 + 1200
    assert sec.due(T0 + 1200) is Action.CHECK_SOA
    sec.soa_answer(8, T0 + 1200)
    assert sec.due(T0 + 1200) is Action.IXFR
    sec.failed(T0 + 1201, "refused")
    assert sec.due(T0 + 1201) is Action.AXFR
    sec.transferred(SoaTimers(8, 600, 60, 3600), T0 + 1202, Action.AXFR)
    assert sec.counters["axfr"] == 2 and sec.counters["transfer_failures"] == 1

    # the primary goes away: retry every RETRY; past EXPIRE by policy; too old
    assert sec.due(T0 + 1802) is Action.CHECK_SOA
    sec.failed(T0 + 1802, "timeout")
    assert sec.next_timer() == T0 + 1862
    assert sec.serving(T0 + 1202 + 3600) is Serving.FRESH
    assert sec.serving(T0 + 1202 + 3601) is Serving.PAST_EXPIRE
    assert sec.status(T0 + 1202 + 3601)["serving"] == "past-expire"
    assert sec.serving(T0 + 1202 + 7201) is Serving.TOO_OLD


def test_secondary_notify_checks_now_unless_serial_is_old() -> None:
    sec = Secondary("corp.example.", max_age=7200)
    sec.due(T0)
    sec.transferred(SoaTimers(7, 600, 60, 3600), T0, Action.AXFR)
    sec.notify(7, T0 + 5)
    assert sec.due(T0 + 5) is None
    sec.notify(8, T0 + 6)
    assert sec.due(T0 + 6) is Action.CHECK_SOA


def test_secondary_bounds_silly_timers() -> None:
    sec = Secondary("corp.example.", max_age=0)
    sec.due(T0)
    sec.transferred(SoaTimers(1, 0, 0, 0), T0, Action.AXFR)
    assert sec.next_timer() is not None and sec.next_timer() >= T0 + 5


# -- zone data and the copy on disk -------------------------------------------


def test_zone_lookup() -> None:
    z = corp_zone()
    name = dns.name.from_text
    found = zonedata.lookup(z, name("alias.corp.example."), dns.rdatatype.A)
    assert [r.rdtype for r in found.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    nx = zonedata.lookup(z, name("nope.corp.example."), dns.rdatatype.A)
    assert nx.rcode == dns.rcode.NXDOMAIN and nx.authority[0].ttl == 120
    nodata = zonedata.lookup(z, name("www.corp.example."), dns.rdatatype.AAAA)
    assert nodata.rcode == dns.rcode.NOERROR and not nodata.answer
    ent = zonedata.lookup(z, name("b.c.corp.example."), dns.rdatatype.A)
    assert ent.rcode == dns.rcode.NOERROR  # empty non-terminal (RFC 8020)


def test_zone_copy_roundtrip_and_bad_files(tmp_path: Path) -> None:
    zonedata.save(tmp_path, corp_zone(), T0)
    loaded = zonedata.load(tmp_path, "corp.example.")
    assert loaded is not None
    z, saved_at = loaded
    assert saved_at == T0 and zonedata.soa_timers(z) == SoaTimers(7, 600, 60, 3600)
    path = zonedata.copy_path(tmp_path, "corp.example.")
    path.write_text("; moat-zone-copy saved-at=1\n@ IN SOA garbage\n")
    assert zonedata.load(tmp_path, "corp.example.") is None
    path.write_bytes(b"\xff\xfe no header")
    assert zonedata.load(tmp_path, "corp.example.") is None
    assert zonedata.load(tmp_path / "absent", "corp.example.") is None


# -- cache --------------------------------------------------------------------


def upstream_reply(name: str, rcode: int = 0, ttl: int = 300) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.Rcode.make(rcode))
    if rcode == 0:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "192.0.2.1"))
    return r


def test_cache_ttl_bounds_and_aging() -> None:
    cache = Cache(CachePolicy(min_ttl=10, max_ttl=100))
    assert cache.put(upstream_reply("a.example.", ttl=300), T0)
    key = (dns.name.from_text("a.example."), dns.rdatatype.A, 1)
    entry = cache.get(key, T0 + 30)
    assert entry is not None and entry.answer[0].ttl == 70
    assert cache.get(key, T0 + 100) is None
    assert cache.put(upstream_reply("b.example.", ttl=2), T0)  # raised to 10
    key_b = (dns.name.from_text("b.example."), dns.rdatatype.A, 1)
    assert cache.get(key_b, T0 + 9) is not None and cache.get(key_b, T0 + 10) is None


def test_cache_negative_answers_rfc2308() -> None:
    cache = Cache(CachePolicy(negative_max_ttl=50))
    nx = upstream_reply("gone.example.", rcode=dns.rcode.NXDOMAIN)
    assert not cache.put(nx, T0)  # no SOA: not cached
    nx.authority.append(
        dns.rrset.from_text("example.", 3600, "IN", "SOA", "ns h 1 2 3 4 30")
    )
    assert cache.put(nx, T0)
    key = (dns.name.from_text("gone.example."), dns.rdatatype.A, 1)
    entry = cache.get(key, T0 + 29)
    assert entry is not None and entry.rcode == dns.rcode.NXDOMAIN
    assert cache.get(key, T0 + 30) is None  # min(SOA TTL, MINIMUM) = 30
    assert not cache.put(upstream_reply("x.example.", rcode=dns.rcode.SERVFAIL), T0)


def test_cache_is_bounded() -> None:
    cache = Cache(CachePolicy(size=3))
    for i in range(5):
        cache.put(upstream_reply(f"n{i}.example."), T0)
    assert len(cache.entries) == 3 and cache.counters["evictions"] == 2


# -- local names --------------------------------------------------------------


def test_local_names_from_hosts_and_dhcp_leases(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n192.168.1.5 nas nas2\n192.168.1.6 tv.lan\n1.2.3 x\n")
    leases = tmp_path / "leases.json"
    db = LeaseDatabase(
        leases,
        IPv4Network("192.168.1.0/24"),
        IPv4Address("192.168.1.100"),
        IPv4Address("192.168.1.200"),
    )
    now = time.time()
    db.commit(IPv4Address("192.168.1.100"), "hw:aa", "aa", 3600, "laptop", now)
    db.commit(IPv4Address("192.168.1.101"), "hw:bb", "bb", 3600, "gone", now)
    db.release(IPv4Address("192.168.1.101"), "hw:bb", now)
    local = LocalNames("lan", hosts, leases)
    local.refresh()
    name = dns.name.from_text

    def a(n: str) -> list[str] | None:
        rr = local.answer(name(n), dns.rdatatype.A)
        return None if rr is None else [r.to_text() for rrset in rr for r in rrset]

    assert a("nas.lan.") == ["192.168.1.5"] and a("NAS2.lan.") == ["192.168.1.5"]
    assert a("tv.lan.") == ["192.168.1.6"] and a("laptop.lan.") == ["192.168.1.100"]
    assert a("gone.lan.") is None  # released lease
    ptr = local.answer(name("100.1.168.192.in-addr.arpa."), dns.rdatatype.PTR)
    assert ptr and ptr[0][0].to_text() == "laptop.lan."
    assert local.skipped == 1

    # a changed file is re-read
    leases.write_text(json.dumps({"leases": []}))
    os.utime(leases, (now + 5, now + 5))
    local.refresh()
    assert a("laptop.lan.") is None


# -- query handling -----------------------------------------------------------


def make_handler(serving_copy: bool = True) -> QueryHandler:
    sec = Secondary("corp.example.", max_age=7200)
    slot = ZoneSlot(sec, {PRIMARY})
    if serving_copy:
        sec.loaded(SoaTimers(7, 600, 60, 3600), T0, T0)
        slot.data = corp_zone()
    return QueryHandler([slot], None, Cache(CachePolicy()))


def ask(
    handler: QueryHandler, q: dns.message.Message, now: float = T0
) -> dns.message.Message:
    decision = handler.handle(q.to_wire(), ("192.168.1.9", 5353), now)
    assert decision.verdict is Verdict.REPLY and decision.reply
    return dns.message.from_wire(decision.reply)


def test_handler_answers_zone_and_forwards_rest() -> None:
    h = make_handler()
    r = ask(h, dns.message.make_query("www.corp.example.", "A"))
    assert r.flags & dns.flags.AA and r.answer[0][0].to_text() == "10.20.0.80"
    d = h.handle(dns.message.make_query("example.org.", "A").to_wire(), ("a", 1), T0)
    assert d.verdict is Verdict.FORWARD
    r = ask(h, dns.message.make_query("corp.example.", "AXFR"))
    assert r.rcode() == dns.rcode.REFUSED


def test_handler_servfail_when_copy_too_old_or_missing() -> None:
    h = make_handler()
    q = dns.message.make_query("www.corp.example.", "A")
    assert ask(h, q, T0 + 3601).rcode() == dns.rcode.NOERROR  # policy
    assert ask(h, q, T0 + 7201).rcode() == dns.rcode.SERVFAIL
    assert ask(make_handler(serving_copy=False), q).rcode() == dns.rcode.SERVFAIL


def test_handler_refuses_queries_from_outside_allow_query() -> None:
    h = make_handler()
    h.allow_query = [IPv4Network("192.168.1.0/24")]
    q = dns.message.make_query("www.corp.example.", "A")
    assert ask(h, q).rcode() == dns.rcode.NOERROR  # from 192.168.1.9
    d = h.handle(q.to_wire(), (PRIMARY, 5353), T0)
    assert dns.message.from_wire(d.reply or b"").rcode() == dns.rcode.REFUSED
    assert h.counters["refused_client"] == 1


def test_handler_notify_only_from_primary() -> None:
    h = make_handler()
    q = dns.message.make_query("corp.example.", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    d = h.handle(q.to_wire(), ("192.168.1.9", 53), T0)
    assert d.notify_zone is None
    assert dns.message.from_wire(d.reply or b"").rcode() == dns.rcode.REFUSED
    d = h.handle(q.to_wire(), (PRIMARY, 53), T0)
    assert d.notify_zone == "corp.example."
    assert dns.message.from_wire(d.reply or b"").rcode() == dns.rcode.NOERROR


def test_handler_notify_needs_the_zones_tsig_key() -> None:
    key = dns.tsig.Key("moat-xfr.", "bW9hdC10ZXN0LXRzaWctc2VjcmV0LTMyLWJ5dGVzISE=")
    other = dns.tsig.Key("moat-xfr.", "b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldC0zMmJ5dGU=")
    h = make_handler()
    h.zones[0].tsig = key
    h.keyring = {key.name: key}

    def notify(signing: dns.tsig.Key | None) -> tuple[Decision, bytes]:
        q = dns.message.make_query("corp.example.", "SOA")
        q.set_opcode(dns.opcode.NOTIFY)
        if signing is not None:
            q.use_tsig(signing)
        wire = q.to_wire()
        return h.handle(wire, (PRIMARY, 53), T0), q.mac

    unsigned, _ = notify(None)
    assert unsigned.notify_zone is None and h.counters["notify_unsigned"] == 1
    forged, _ = notify(other)  # right name, wrong secret: NOTAUTH, no action
    assert forged.notify_zone is None
    assert dns.message.from_wire(forged.reply or b"").rcode() == dns.rcode.NOTAUTH
    signed, mac = notify(key)
    assert signed.notify_zone == "corp.example."
    reply = dns.message.from_wire(signed.reply or b"", keyring=key, request_mac=mac)
    assert reply.had_tsig and reply.rcode() == dns.rcode.NOERROR


def test_handler_formerr_and_drops() -> None:
    h = make_handler()
    good = dns.message.make_query("www.corp.example.", "A").to_wire()
    # header + question fine, then an answer count that lies: FORMERR
    bad = good[:6] + b"\x00\x05" + good[8:]
    r = dns.message.from_wire(h.handle(bad, ("a", 1), T0).reply or b"")
    assert r.rcode() == dns.rcode.FORMERR and r.id == int.from_bytes(good[:2])
    assert h.handle(good[:11], ("a", 1), T0).drop_reason == "short"
    response = bytes([good[0], good[1], good[2] | 0x80]) + good[3:]
    assert h.handle(response, ("a", 1), T0).drop_reason == "response-to-server"
    assert h.handle(bytes(12) + b"\xc0\x0c", ("a", 1), T0).verdict is Verdict.DROP


ALLOWED_RCODES = {
    dns.rcode.NOERROR,
    dns.rcode.NXDOMAIN,
    dns.rcode.FORMERR,
    dns.rcode.SERVFAIL,
    dns.rcode.NOTIMP,
    dns.rcode.REFUSED,
    dns.rcode.NOTAUTH,
}


def check_fuzz_outcome(h: QueryHandler, data: bytes) -> None:
    for tcp in (False, True):
        d = h.handle(data, ("192.168.1.9", 5353), T0, tcp=tcp)
        if d.verdict is Verdict.REPLY:
            assert d.reply is not None
            r = dns.message.from_wire(d.reply)
            assert r.rcode() in ALLOWED_RCODES
            assert tcp or len(d.reply) <= 1232
        elif d.verdict is Verdict.DROP:
            assert d.drop_reason
    assert h.counters["servfail_internal"] == 0
    # still answers afterwards
    assert ask(h, dns.message.make_query("www.corp.example.", "A")).answer


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_handler_fuzz_random_bytes(data: bytes) -> None:
    check_fuzz_outcome(make_handler(), data)


QUERIES = [
    dns.message.make_query("www.corp.example.", "A", use_edns=0).to_wire(),
    dns.message.make_query("alias.corp.example.", "TXT").to_wire(),
    dns.message.make_query("host.example.org.", "AAAA", want_dnssec=True).to_wire(),
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(QUERIES),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 60),
)
def test_handler_fuzz_mutated_queries(
    query: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(query)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    check_fuzz_outcome(make_handler(), bytes(data[: len(data) - cut]))


# -- the secondary under arbitrary event sequences ------------------------------


class SecondaryMachine(RuleBasedStateMachine):
    """Random interleavings of time, answers, failures and NOTIFYs keep the
    secondary's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.sec = Secondary("corp.example.", max_age=5000)
        self.now = T0
        self.held: int | None = None
        self.last_ok: float | None = None

    @rule(dt=st.floats(min_value=0, max_value=4000))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule()
    def start_due_action(self) -> None:
        pending_before = self.sec.pending
        action = self.sec.due(self.now)
        if pending_before is not None:
            assert action is None  # one action at a time

    @rule(serial=st.integers(0, 2**32 - 1))
    def primary_answers(self, serial: int) -> None:
        action = self.sec.pending
        if action is Action.CHECK_SOA:
            self.sec.soa_answer(serial, self.now)
            if self.held is not None and not serial_gt(serial, self.held):
                self.last_ok = self.now
        elif action is not None:
            self.sec.transferred(SoaTimers(serial, 600, 60, 3600), self.now, action)
            self.held, self.last_ok = serial, self.now

    @rule()
    def primary_fails(self) -> None:
        if self.sec.pending is not None:
            self.sec.failed(self.now, "test")

    @rule(serial=st.none() | st.integers(0, 2**32 - 1))
    def notify(self, serial: int | None) -> None:
        self.sec.notify(serial, self.now)

    @invariant()
    def serving_follows_age(self) -> None:
        serving = self.sec.serving(self.now)
        if self.held is None or self.last_ok is None:
            assert serving is Serving.EMPTY
            return
        assert self.sec.soa is not None and self.sec.soa.serial == self.held
        age = self.now - self.last_ok
        expected = (
            Serving.FRESH
            if age <= 3600
            else Serving.PAST_EXPIRE
            if age <= 5000
            else Serving.TOO_OLD
        )
        assert serving is expected

    @invariant()
    def always_something_scheduled(self) -> None:
        assert (self.sec.pending is None) != (self.sec.next_timer() is None)


TestSecondaryMachine = SecondaryMachine.TestCase
TestSecondaryMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)


def test_zone_clock_ignores_a_clock_behind_the_stored_copy(tmp_path: Path) -> None:
    # a box booting with its clock far behind the copy it saved before
    future = round(time.time() + 30 * 86400, 1)  # the copy keeps 0.1 s
    zonedata.save(tmp_path / "var", corp_zone(), future)
    cfg = tmp_path / "dns.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1"]\nstate_dir = "{tmp_path}/var"\n'
        '[[zone]]\nname = "corp.example"\nprimaries = ["10.99.0.1"]\n'
    )
    server = DnsServer(dnsconfig.load(cfg))
    server._load_copies()
    slot = server.slots[0]
    assert server.now() >= future and slot.data is not None
    assert slot.secondary.serving(server.now()) is Serving.FRESH


def test_config_errors_are_one_line(tmp_path: Path, moat_cmd: list[str]) -> None:
    cases = {
        "listen = 5\n": "listen: must be list",
        'listen = ["10.0.0.300"]\n': "not an IP address",
        'listen = ["10.0.0.1"]\n[[zone]]\nname = "c"\n': "primaries: missing",
        'listen = ["10.0.0.1"]\n[[zone]]\nname = "c"\nprimaries = ["10.0.0.2"]\n'
        'tsig_name = "k"\ntsig_secret = "!!"\n': "tsig_secret",
    }
    for text, message in cases.items():
        cfg = tmp_path / "dns.toml"
        cfg.write_text(text)
        res = subprocess.run(
            [*moat_cmd, "dns", "--config", str(cfg)], capture_output=True, text=True
        )
        assert res.returncode == 2 and message in res.stderr, (text, res.stderr)
        assert "Traceback" not in res.stderr
