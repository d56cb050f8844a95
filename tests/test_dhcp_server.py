"""DHCP server core and lease database, without sockets."""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moat.errors import ConfigError
from services.dhcp import config as dhcp_config
from services.dhcp.message import (
    BOOTREQUEST,
    BROADCAST_FLAG,
    DhcpMessage,
    DhcpMessageType,
    DhcpOption,
    decode,
    decode_domain_search,
    encode,
)
from services.dhcp.server import LIMITED_BROADCAST, DhcpServer, Reply, build

SERVER = IPv4Address("10.99.0.1")
T0 = 1_800_000_000.0


def make_config(tmp: Path, **extra: object) -> dhcp_config.ServerConfig:
    table: dict[str, object] = {
        "interface": "lan0",
        "address": "10.99.0.1",
        "subnet": "10.99.0.0/24",
        "pool_start": "10.99.0.100",
        "pool_end": "10.99.0.104",
        "domain": "home.example",
        "search": ["corp.example", "home.example"],
        "ntp_servers": ["10.99.0.1"],
        "mtu": 1400,
        "lease_time": 600,
        "lease_file": str(tmp / "leases.json"),
        "reservations": [{"mac": "02:00:00:00:00:99", "address": "10.99.0.50"}],
    }
    table.update(extra)
    return dhcp_config.parse({"dhcpd": table}, "test.toml")


def make_server(tmp: Path, **extra: object) -> DhcpServer:
    server = build(make_config(tmp, **extra))
    server.leases.load(T0)
    return server


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, n])


def request(
    kind: DhcpMessageType,
    n: int,
    xid: int = 1,
    ciaddr: str = "0.0.0.0",
    flags: int = 0,
    **options: bytes,
) -> bytes:
    opts: dict[int, bytes] = {DhcpOption.DHCP_MESSAGE_TYPE: bytes([kind])}
    opts.update({int(k[1:]): v for k, v in options.items()})
    msg = DhcpMessage(
        op=BOOTREQUEST,
        xid=xid,
        chaddr=mac(n),
        ciaddr=IPv4Address(ciaddr),
        flags=flags,
        options=opts,
    )
    return encode(msg)


def ip(text: str) -> bytes:
    return IPv4Address(text).packed


def dora(server: DhcpServer, n: int, now: float = T0) -> IPv4Address:
    offer = server.handle(request(DhcpMessageType.DISCOVER, n), now)
    assert offer is not None and offer.message.message_type == DhcpMessageType.OFFER
    addr = offer.message.yiaddr
    ack = server.handle(
        request(DhcpMessageType.REQUEST, n, o54=SERVER.packed, o50=addr.packed), now
    )
    assert ack is not None and ack.message.message_type == DhcpMessageType.ACK
    assert ack.message.yiaddr == addr
    return addr


def kind(reply: Reply | None) -> DhcpMessageType | None:
    return None if reply is None else reply.message.message_type


def test_dora_options_and_destination(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    offer = server.handle(
        request(DhcpMessageType.DISCOVER, 1, o55=bytes([1, 3, 6, 15, 26, 42, 119])), T0
    )
    assert offer is not None
    msg = offer.message
    assert msg.message_type == DhcpMessageType.OFFER
    assert msg.yiaddr == IPv4Address("10.99.0.100")
    assert msg.ip(DhcpOption.SERVER_IDENTIFIER) == SERVER
    assert msg.u32(DhcpOption.IP_ADDRESS_LEASE_TIME) == 600
    assert msg.u32(DhcpOption.RENEWAL_TIME_VALUE) == 300
    assert msg.u32(DhcpOption.REBINDING_TIME_VALUE) == 525
    assert msg.ip(DhcpOption.SUBNET_MASK) == IPv4Address("255.255.255.0")
    assert msg.ip_list(DhcpOption.ROUTER) == [SERVER]
    assert msg.ip_list(DhcpOption.NTP_SERVERS) == [SERVER]
    assert msg.u16(DhcpOption.INTERFACE_MTU) == 1400
    assert msg.text(DhcpOption.DOMAIN_NAME) == "home.example"
    assert decode_domain_search(msg.options[DhcpOption.DOMAIN_SEARCH]) == [
        "corp.example",
        "home.example",
    ]
    assert DhcpOption.PARAMETER_REQUEST_LIST not in msg.options
    # no broadcast flag, no ciaddr: unicast to yiaddr at chaddr (RFC 2131 §4.1)
    assert offer.address == msg.yiaddr and offer.needs_neighbour and offer.port == 68

    bcast = server.handle(
        request(DhcpMessageType.DISCOVER, 2, flags=BROADCAST_FLAG), T0
    )
    assert bcast is not None and bcast.address == LIMITED_BROADCAST


def test_not_requested_options_left_out(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    offer = server.handle(request(DhcpMessageType.DISCOVER, 1), T0)
    assert offer is not None
    assert DhcpOption.DOMAIN_SEARCH not in offer.message.options
    assert DhcpOption.DOMAIN_NAME in offer.message.options


def test_two_clients_distinct_and_renew(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    a, b = dora(server, 1), dora(server, 2)
    assert a != b
    # renewing: unicast with ciaddr, reply unicast to ciaddr
    renew = server.handle(request(DhcpMessageType.REQUEST, 1, ciaddr=str(a)), T0 + 300)
    assert kind(renew) == DhcpMessageType.ACK and renew is not None
    assert renew.address == a and renew.message.ciaddr == a
    lease = server.leases.leases[a]
    assert lease.expires == T0 + 900
    # client 2 cannot take client 1's address
    steal = server.handle(request(DhcpMessageType.REQUEST, 2, o50=a.packed), T0 + 1)
    assert kind(steal) == DhcpMessageType.NAK
    assert steal is not None and steal.address == LIMITED_BROADCAST


def test_init_reboot(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    addr = dora(server, 1)
    again = server.handle(request(DhcpMessageType.REQUEST, 1, o50=addr.packed), T0)
    assert kind(again) == DhcpMessageType.ACK
    wrong = server.handle(request(DhcpMessageType.REQUEST, 1, o50=ip("192.0.2.9")), T0)
    assert kind(wrong) == DhcpMessageType.NAK
    assert wrong is not None and b"not on this network" in wrong.message.options[56]
    # authoritative: an unknown client asking for a free pool address gets it
    fresh = server.handle(
        request(DhcpMessageType.REQUEST, 7, o50=ip("10.99.0.103")), T0
    )
    assert kind(fresh) == DhcpMessageType.ACK


def test_selecting_other_server_is_silent(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    server.handle(request(DhcpMessageType.DISCOVER, 1), T0)
    other = server.handle(
        request(DhcpMessageType.REQUEST, 1, o54=ip("10.99.0.2"), o50=ip("10.99.0.100")),
        T0,
    )
    assert other is None and server.counters["drop_other_server"] == 1
    assert not server.leases.offers


def test_release_then_same_address_back(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    addr = dora(server, 1)
    out = server.handle(
        request(DhcpMessageType.RELEASE, 1, ciaddr=str(addr), o54=SERVER.packed), T0
    )
    assert out is None and not server.leases.leases[addr].active(T0 + 1)
    dora(server, 2)  # takes a fresh address, not the released one
    assert dora(server, 1, T0 + 5) == addr


def test_decline_parks_address(tmp_path: Path) -> None:
    server = make_server(tmp_path, decline_probation=100)
    addr = dora(server, 1)
    server.handle(
        request(DhcpMessageType.DECLINE, 1, o50=addr.packed, o54=SERVER.packed), T0
    )
    assert addr in server.leases.parked
    assert dora(server, 1, T0 + 1) != addr
    assert dora(server, 2, T0 + 2) != addr
    # a DECLINE without server id or from a non-holder is ignored
    other = dora(server, 3, T0 + 3)
    server.handle(request(DhcpMessageType.DECLINE, 4, o50=other.packed), T0 + 3)
    server.handle(
        request(DhcpMessageType.DECLINE, 4, o50=other.packed, o54=SERVER.packed), T0
    )
    assert other not in server.leases.parked
    assert server.counters["drop_bad_decline"] == 1
    assert server.counters["drop_foreign_decline"] == 1
    # after probation the address comes back
    reloaded = make_server(tmp_path, decline_probation=100)
    assert addr in reloaded.leases.parked
    assert reloaded.leases.available(addr, "hw:020000000009", "020000000009", T0 + 101)


def test_reservation(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    assert dora(server, 0x99) == IPv4Address("10.99.0.50")
    nope = server.handle(request(DhcpMessageType.REQUEST, 1, o50=ip("10.99.0.50")), T0)
    assert kind(nope) == DhcpMessageType.NAK


def test_exhaustion_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = make_server(tmp_path)
    for n in range(1, 6):
        dora(server, n)
    with caplog.at_level(logging.WARNING):
        assert server.handle(request(DhcpMessageType.DISCOVER, 6), T0) is None
        assert server.handle(request(DhcpMessageType.DISCOVER, 7), T0) is None
    assert server.leases.counters["pool_exhausted"] == 2
    assert server.counters["drop_no_address"] == 2
    assert sum("exhausted" in r.message for r in caplog.records) == 1
    # once a lease expires the pool has room again
    assert dora(server, 6, T0 + 601) is not None


def test_restart_keeps_leases(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    addrs = {n: dora(server, n) for n in (1, 2, 3)}
    again = make_server(tmp_path)
    for n, addr in addrs.items():
        offer = again.handle(request(DhcpMessageType.DISCOVER, n), T0 + 10)
        assert offer is not None and offer.message.yiaddr == addr
    assert dora(again, 4, T0 + 10) not in addrs.values()


def test_lease_written_before_ack(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    offer = server.handle(request(DhcpMessageType.DISCOVER, 1), T0)
    assert offer is not None
    addr = offer.message.yiaddr
    server.leases.path = tmp_path / "missing-dir" / "leases.json"
    ack = server.handle(
        request(DhcpMessageType.REQUEST, 1, o54=SERVER.packed, o50=addr.packed), T0
    )
    assert ack is None and server.counters["drop_lease_write_failed"] == 1
    server.leases.path = tmp_path / "leases.json"
    ack = server.handle(
        request(DhcpMessageType.REQUEST, 1, o54=SERVER.packed, o50=addr.packed), T0
    )
    assert kind(ack) == DhcpMessageType.ACK
    stored = json.loads((tmp_path / "leases.json").read_text())
    assert stored["leases"][0]["address"] == str(addr)


def test_bad_lease_file_records(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    good = {
        "address": "10.99.0.101",
        "client_key": "hw:020000000001",
        "chaddr": "020000000001",
        "expires": T0 + 100,
    }
    bad = [
        {"address": "not an ip"},
        {**good, "address": "10.99.0.102", "client_key": "zz"},
        {**good, "address": "10.99.0.103", "chaddr": "xyz"},
        {**good, "address": "192.0.2.1"},
        "junk",
    ]
    path.write_text(json.dumps({"version": 1, "leases": [good, *bad]}))
    server = make_server(tmp_path)
    assert list(server.leases.leases) == [IPv4Address("10.99.0.101")]
    assert server.leases.counters["lease_records_skipped"] == 4

    path.write_text("{not json")
    server = make_server(tmp_path)
    assert not server.leases.leases
    assert any(p.name.startswith("leases.json.bad-") for p in tmp_path.iterdir())
    assert dora(server, 1) is not None


def test_inform(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    ack = server.handle(request(DhcpMessageType.INFORM, 1, ciaddr="10.99.0.7"), T0)
    assert ack is not None and kind(ack) == DhcpMessageType.ACK
    assert ack.message.yiaddr == IPv4Address(0)
    assert DhcpOption.IP_ADDRESS_LEASE_TIME not in ack.message.options
    assert ack.address == IPv4Address("10.99.0.7")


def test_client_id_echoed_and_used(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    cid = b"\x01" + mac(1)
    offer = server.handle(request(DhcpMessageType.DISCOVER, 1, o61=cid), T0)
    assert offer is not None and offer.message.options[61] == cid


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cases = {
        "pool_end": ("dhcpd.pool_end", {"pool_end": "10.98.0.5"}),
        "lease": ("dhcpd.lease_time", {"lease_time": "long"}),
        "t2": ("dhcpd.rebinding_time", {"renewal_time": 500, "rebinding_time": 400}),
        "mac": ("dhcpd.reservations[0].mac", {"reservations": [{"mac": "zz"}]}),
        "search": ("dhcpd.search", {"search": ["a..b"]}),
        "mtu": ("dhcpd.mtu", {"mtu": 20}),
    }
    for field, extra in cases.values():
        with pytest.raises(ConfigError) as info:
            make_config(tmp_path, **extra)
        assert info.value.field == field, info.value
    with pytest.raises(ConfigError, match="dhcpd.interface: missing"):
        dhcp_config.parse({"dhcpd": {}}, "x")


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "moat.toml"
    path.write_text(
        '[dhcpd]\ninterface="lan0"\naddress="10.99.0.1"\nsubnet="10.99.0.0/24"\n'
        'pool_start="10.99.0.10"\npool_end="10.99.0.20"\n'
        f'lease_file="{tmp_path}/l.json"\n'
    )
    cfg = dhcp_config.load(path)
    assert cfg.renewal_time == 1800 and cfg.rebinding_time == 3150
    path.write_text("[dhcpd\n")
    with pytest.raises(ConfigError) as info:
        dhcp_config.load(path)
    assert info.value.field == "syntax"


# fuzz: only counted drops or protocol replies, and the server still answers

valid = [
    request(DhcpMessageType.DISCOVER, 1, o55=bytes(range(1, 80))),
    request(DhcpMessageType.REQUEST, 1, o54=SERVER.packed, o50=ip("10.99.0.100")),
    request(DhcpMessageType.REQUEST, 1, ciaddr="10.99.0.100"),
    request(DhcpMessageType.DECLINE, 1, o50=ip("10.99.0.100"), o54=SERVER.packed),
    request(DhcpMessageType.RELEASE, 1, ciaddr="10.99.0.100", o54=SERVER.packed),
    request(DhcpMessageType.INFORM, 1, ciaddr="10.99.0.9", o57=b"\x02\x40"),
]


@settings(
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_fuzz_server(tmp_path: Path, data: st.DataObject) -> None:
    server = make_server(tmp_path, lease_file=str(tmp_path / "fuzz.json"))
    for _ in range(data.draw(st.integers(1, 6))):
        if data.draw(st.booleans()):
            wire = bytearray(data.draw(st.sampled_from(valid)))
            for _ in range(data.draw(st.integers(1, 6))):
                i = data.draw(st.integers(0, len(wire) - 1))
                wire[i] = data.draw(st.integers(0, 255))
            datagram = bytes(wire[: data.draw(st.integers(0, len(wire)))])
        else:
            datagram = data.draw(st.binary(max_size=600))
        before = sum(server.counters.values())
        reply = server.handle(datagram, T0)
        if reply is None:
            assert sum(server.counters.values()) > before
        else:
            assert reply.message.message_type in (
                DhcpMessageType.OFFER,
                DhcpMessageType.ACK,
                DhcpMessageType.NAK,
            )
            decode(reply.data)
    assert dora(server, 0x42) is not None


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["dora", "release", "decline", "restart", "wait"]),
            st.integers(1, 8),
        ),
        max_size=30,
    )
)
def test_no_address_leased_twice(tmp_path: Path, steps: list[tuple[str, int]]) -> None:
    lease_file = tmp_path / "model.json"
    lease_file.unlink(missing_ok=True)
    server = make_server(tmp_path, lease_file=str(lease_file))
    now = T0
    held: dict[int, IPv4Address] = {}  # client -> address it was ACKed
    for op, n in steps:
        if op == "dora":
            offer = server.handle(request(DhcpMessageType.DISCOVER, n), now)
            if offer is None:
                assert len(held) + len(server.leases.parked) >= 5 or n in held
                continue
            ack = server.handle(
                request(
                    DhcpMessageType.REQUEST,
                    n,
                    o54=SERVER.packed,
                    o50=offer.message.yiaddr.packed,
                ),
                now,
            )
            assert kind(ack) == DhcpMessageType.ACK
            held[n] = offer.message.yiaddr
        elif op == "release" and n in held:
            server.handle(
                request(
                    DhcpMessageType.RELEASE,
                    n,
                    ciaddr=str(held.pop(n)),
                    o54=SERVER.packed,
                ),
                now,
            )
        elif op == "decline" and n in held:
            server.handle(
                request(
                    DhcpMessageType.DECLINE,
                    n,
                    o50=held.pop(n).packed,
                    o54=SERVER.packed,
                ),
                now,
            )
        elif op == "restart":
            server = make_server(tmp_path, lease_file=str(lease_file))
        elif op == "wait":
            now += 700  # every lease expires
            held.clear()
        assert len(set(held.values())) == len(held)
        for client, addr in held.items():
            assert server.leases.leases[addr].client_key == f"hw:{mac(client).hex()}"
