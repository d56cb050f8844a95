"""DHCP client core (sans-IO) against our server core, timers, fuzz; IP framing."""

from __future__ import annotations

import random
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dhcp import config as dhcp_config
from services.dhcp import udpip
from services.dhcp.client import (
    Action,
    ClientState,
    Configure,
    Deconfigure,
    DhcpClient,
    Transmit,
)
from services.dhcp.message import (
    BOOTREPLY,
    DhcpError,
    DhcpMessage,
    DhcpMessageType,
    DhcpOption,
    decode,
    encode,
)
from services.dhcp.server import DhcpServer, build

MAC = bytes.fromhex("02000000c0de")
SERVER = IPv4Address("10.99.0.1")
WALL = 1_800_000_000.0


def server(tmp: Path, **extra: object) -> DhcpServer:
    table: dict[str, object] = {
        "interface": "lan0",
        "address": "10.99.0.1",
        "subnet": "10.99.0.0/24",
        "pool_start": "10.99.0.100",
        "pool_end": "10.99.0.110",
        "lease_time": 100,
        "search": ["corp.example"],
        "mtu": 1400,
        "lease_file": str(tmp / "leases.json"),
    }
    table.update(extra)
    srv = build(dhcp_config.parse({"dhcpd": table}))
    return srv


def client() -> DhcpClient:
    return DhcpClient(MAC, random.Random(7), hostname="moat", client_id=b"\x01" + MAC)


def transmits(actions: list[Action]) -> list[Transmit]:
    return [a for a in actions if isinstance(a, Transmit)]


def exchange(
    cli: DhcpClient, srv: DhcpServer, actions: list[Action], now: float
) -> list[Action]:
    """Deliver the client's transmissions to the server and the replies back."""
    out: list[Action] = []
    for t in transmits(actions):
        reply = srv.handle(t.data, WALL + now)
        if reply is not None:
            out += cli.receive(reply.data, now)
    return out


def bind(cli: DhcpClient, srv: DhcpServer, now: float = 0.0) -> Configure:
    actions = exchange(cli, srv, cli.start(now), now)  # DISCOVER -> OFFER -> REQUEST
    actions = exchange(cli, srv, actions, now)  # REQUEST -> ACK
    configured = [a for a in actions if isinstance(a, Configure)]
    assert len(configured) == 1 and cli.state == ClientState.BOUND
    return configured[0]


def test_dora_with_our_server(tmp_path: Path) -> None:
    cli, srv = client(), server(tmp_path)
    first = cli.start(0.0)
    assert first[0].destination is None  # type: ignore[union-attr]
    discover = decode(first[0].data)  # type: ignore[union-attr]
    assert discover.message_type == DhcpMessageType.DISCOVER
    assert discover.text(DhcpOption.HOST_NAME) == "moat"
    assert DhcpOption.DOMAIN_SEARCH in discover.parameter_request_list
    configure = bind(cli, srv)
    lease = configure.lease
    assert configure.old is None
    assert lease.address == IPv4Address("10.99.0.100") and lease.prefixlen == 24
    assert lease.routers == [SERVER] and lease.server == SERVER
    assert lease.search == ["corp.example"] and lease.mtu == 1400
    assert (lease.t1, lease.t2, lease.expiry) == (50.0, 87.0, 100.0)
    assert cli.timer == 50.0


def test_renew_rebind_expire(tmp_path: Path) -> None:
    cli, srv = client(), server(tmp_path)
    bind(cli, srv)
    assert cli.on_timer(49.0) == []

    # T1: unicast REQUEST with ciaddr, no server id / requested ip
    renew = transmits(cli.on_timer(50.0))
    assert cli.state == ClientState.RENEWING
    assert renew[0].destination == SERVER
    msg = decode(renew[0].data)
    assert msg.ciaddr == IPv4Address("10.99.0.100")
    assert DhcpOption.SERVER_IDENTIFIER not in msg.options
    assert DhcpOption.REQUESTED_IP_ADDRESS not in msg.options
    assert cli.timer == 87.0  # min 60 s wait, but never past T2

    # T2: broadcast; expiry: address gone, back to DISCOVER
    rebind = transmits(cli.on_timer(87.0))
    assert cli.state == ClientState.REBINDING and rebind[0].destination is None
    assert cli.timer == 100.0
    actions = cli.on_timer(100.0)
    assert isinstance(actions[0], Deconfigure) and actions[0].reason == "expired"
    assert cli.state == ClientState.SELECTING and cli.lease is None
    assert decode(actions[1].data).message_type == DhcpMessageType.DISCOVER  # type: ignore[union-attr]


def test_renew_answered_keeps_address(tmp_path: Path) -> None:
    cli, srv = client(), server(tmp_path)
    bind(cli, srv)
    actions = exchange(cli, srv, cli.on_timer(50.0), 50.0)
    assert isinstance(actions[0], Configure)
    assert actions[0].old is not None
    assert actions[0].lease.address == actions[0].old.address
    assert cli.state == ClientState.BOUND and cli.timer == 100.0


def test_rebind_retransmits_at_half_remaining(tmp_path: Path) -> None:
    cli = DhcpClient(MAC, random.Random(1), min_rebind_wait=1.0)
    bind(cli, server(tmp_path, lease_time=1000))
    cli.on_timer(500.0)
    assert cli.timer == pytest.approx(500 + (875 - 500) / 2)


def test_nak_restarts(tmp_path: Path) -> None:
    cli, srv = client(), server(tmp_path)
    bind(cli, srv)
    # the server comes back with another pool and no memory of the client
    srv = server(
        tmp_path,
        pool_start="10.99.0.120",
        pool_end="10.99.0.130",
        lease_file=str(tmp_path / "new.json"),
    )
    actions = exchange(cli, srv, cli.on_timer(50.0), 50.0)
    assert isinstance(actions[0], Deconfigure) and actions[0].reason == "nak"
    assert cli.state == ClientState.INIT and cli.timer == 51.0
    again = transmits(cli.on_timer(51.0))
    assert decode(again[0].data).message_type == DhcpMessageType.DISCOVER


def test_previous_address_requested(tmp_path: Path) -> None:
    cli = DhcpClient(MAC, random.Random(3), previous_address=IPv4Address("10.99.0.105"))
    discover = decode(transmits(cli.start(0.0))[0].data)
    assert discover.ip(DhcpOption.REQUESTED_IP_ADDRESS) == IPv4Address("10.99.0.105")
    srv = server(tmp_path)
    cli = DhcpClient(MAC, random.Random(3), previous_address=IPv4Address("10.99.0.105"))
    assert bind(cli, srv).lease.address == IPv4Address("10.99.0.105")


def test_discover_backoff() -> None:
    cli = client()
    cli.start(0.0)
    now, gaps = 0.0, []
    for _ in range(7):
        assert cli.timer is not None
        gaps.append(cli.timer - now)
        now = cli.timer
        cli.on_timer(now)
    for gap, base in zip(gaps, [4, 8, 16, 32, 64, 64, 64], strict=True):
        assert base - 1 <= gap <= base + 1


def test_request_given_up(tmp_path: Path) -> None:
    cli, srv = client(), server(tmp_path)
    actions = exchange(cli, srv, cli.start(0.0), 0.0)
    assert cli.state == ClientState.REQUESTING and len(actions) == 1
    for _ in range(3):
        assert cli.timer is not None
        cli.on_timer(cli.timer)
        assert cli.state == ClientState.REQUESTING
    assert cli.timer is not None
    actions = cli.on_timer(cli.timer)
    assert cli.state == ClientState.SELECTING
    assert decode(actions[0].data).message_type == DhcpMessageType.DISCOVER  # type: ignore[union-attr]


def test_foreign_and_unexpected_dropped(tmp_path: Path) -> None:
    cli, srv = client(), server(tmp_path)
    bind(cli, srv)
    reply = DhcpMessage(
        op=BOOTREPLY,
        xid=cli.xid,
        chaddr=MAC,
        yiaddr=IPv4Address("10.99.0.9"),
        options={53: bytes([DhcpMessageType.OFFER]), 54: SERVER.packed},
    )
    assert cli.receive(encode(reply), 1.0) == []
    assert cli.counters["drop_unexpected"] == 1
    reply.xid ^= 1
    assert cli.receive(encode(reply), 1.0) == []
    assert cli.counters["drop_not_ours"] == 1
    assert cli.receive(b"\x02junk", 1.0) == []
    assert cli.counters["drop_malformed"] == 1


def test_release(tmp_path: Path) -> None:
    cli, srv = client(), server(tmp_path)
    address = bind(cli, srv).lease.address
    (release,) = transmits(cli.release())
    assert release.destination == SERVER and release.source == address
    assert srv.handle(release.data, WALL + 1) is None
    assert not srv.leases.leases[address].active(WALL + 2)


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_fuzz_client(data: st.DataObject) -> None:
    cli = client()
    cli.start(0.0)
    offer = DhcpMessage(
        op=BOOTREPLY,
        xid=cli.xid,
        chaddr=MAC,
        yiaddr=IPv4Address("10.0.0.5"),
        options={53: b"\x02", 54: b"\x0a\x00\x00\x01", 51: b"\x00\x00\x00\x64"},
    )
    wire = bytearray(encode(offer))
    for step in range(data.draw(st.integers(1, 6))):
        if data.draw(st.booleans()):
            i = data.draw(st.integers(240, len(wire) - 1))
            wire[i] = data.draw(st.integers(0, 255))
            datagram = bytes(wire)
        else:
            datagram = data.draw(st.binary(max_size=400))
        for action in cli.receive(datagram, float(step)):
            assert isinstance(action, Transmit | Configure | Deconfigure)
        cli.on_timer(float(step))


# IPv4/UDP framing of the packet socket


def test_udpip_round_trip_and_scapy() -> None:
    datagram = udpip.UdpDatagram(
        IPv4Address(0), IPv4Address("255.255.255.255"), 68, 67, b"x" * 301
    )
    frame = udpip.build(datagram)
    assert udpip.parse(frame) == datagram
    inet = pytest.importorskip("scapy.layers.inet")
    pkt = inet.IP(frame)
    assert pkt[inet.UDP].dport == 67 and bytes(pkt[inet.UDP].payload) == b"x" * 301
    rebuilt = (
        inet.IP(src="0.0.0.0", dst="255.255.255.255", id=0)
        / inet.UDP(sport=68, dport=67)
        / (b"x" * 301)
    )
    assert udpip.parse(bytes(rebuilt)) == datagram
    bad = bytearray(frame)
    bad[26] ^= 0xFF
    with pytest.raises(udpip.BadFrame):
        udpip.parse(bytes(bad))
    assert udpip.parse(bytes(bad), verify_udp_checksum=False).payload == b"x" * 301


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=120))
def test_fuzz_udpip(data: bytes) -> None:
    try:
        udpip.parse(data)
    except DhcpError:
        pass
