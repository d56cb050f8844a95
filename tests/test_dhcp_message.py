"""DHCP codec: vectors, round trips, overload, RFC 3396/3397, fuzz, scapy oracle."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dhcp.message import (
    BOOTREPLY,
    BOOTREQUEST,
    MAGIC_COOKIE,
    BadMagicCookie,
    BadOption,
    BadOptionValue,
    DhcpError,
    DhcpMessage,
    DhcpMessageType,
    DhcpOption,
    MessageTooLarge,
    ShortMessage,
    decode,
    decode_domain_search,
    encode,
    encode_domain_search,
    encode_ip_list,
)

MAC = bytes.fromhex("020000aa0001")


def discover(**options: bytes) -> DhcpMessage:
    opts: dict[int, bytes] = {DhcpOption.DHCP_MESSAGE_TYPE: b"\x01"}
    opts.update({int(k[1:]): v for k, v in options.items()})
    return DhcpMessage(op=BOOTREQUEST, xid=0x12345678, chaddr=MAC, options=opts)


def test_header_layout() -> None:
    data = encode(discover(o50=IPv4Address("10.0.0.5").packed))
    assert len(data) == 300  # padded to the BOOTP minimum
    assert data[:4] == bytes([1, 1, 6, 0])
    assert data[4:8] == bytes.fromhex("12345678")
    assert data[28:34] == MAC
    assert data[236:240] == MAGIC_COOKIE
    assert data[240:243] == bytes([53, 1, 1])
    assert data[243:249] == bytes([50, 4, 10, 0, 0, 5])
    assert data[249] == 255


def test_round_trip_fields() -> None:
    msg = DhcpMessage(
        op=BOOTREPLY,
        xid=7,
        chaddr=MAC,
        secs=3,
        flags=0x8000,
        ciaddr=IPv4Address("10.0.0.1"),
        yiaddr=IPv4Address("10.0.0.2"),
        siaddr=IPv4Address("10.0.0.3"),
        giaddr=IPv4Address("10.0.0.4"),
        sname=b"server",
        file=b"boot.img",
        options={53: b"\x05", 54: b"\x0a\x00\x00\x01", 51: b"\x00\x00\x0e\x10"},
    )
    back = decode(encode(msg))
    assert back == msg
    assert back.broadcast and back.message_type == DhcpMessageType.ACK
    assert back.u32(DhcpOption.IP_ADDRESS_LEASE_TIME) == 3600


def test_rfc3397_example() -> None:
    # RFC 3397 §2: "eng.apple.com." and "marketing.apple.com."
    wire = b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04"
    assert encode_domain_search(["eng.apple.com", "marketing.apple.com."]) == wire
    assert decode_domain_search(wire) == ["eng.apple.com", "marketing.apple.com"]


def test_domain_search_compression_from_dnsmasq() -> None:
    # dnsmasq sent this for "corp.example"
    assert encode_domain_search(["corp.example"]).hex() == (
        "04636f7270076578616d706c6500"
    )


@pytest.mark.parametrize(
    "wire",
    [
        b"\xc0\x00",  # points at itself
        b"\x03abc\xc0\x00",  # loops back to its own start
        b"\x03abc\x00\x03def\xc0\x05",  # forward pointer
        b"\x05ab",  # label past the end
        b"\x40abc\x00",  # reserved label type
        b"\x00",  # empty name
        b"\x03a.b\x00",  # dot inside a label
        b"\xc0",  # truncated pointer
        (b"\x3f" + b"a" * 63) * 4 + b"\x00",  # name longer than 255
    ],
)
def test_domain_search_rejects(wire: bytes) -> None:
    with pytest.raises(BadOptionValue):
        decode_domain_search(wire)


@settings(deadline=None)
@given(
    st.lists(
        st.lists(
            st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
            min_size=1,
            max_size=5,
        ),
        max_size=12,
    )
)
def test_domain_search_round_trip(names: list[list[str]]) -> None:
    flat = [".".join(labels) for labels in names]
    assert decode_domain_search(encode_domain_search(flat)) == flat


def test_long_option_split_and_concatenated() -> None:
    # RFC 3396: a 600-octet value travels as three options of the same code
    names = [f"host{i}.branch{i}.corp.example" for i in range(40)]
    value = encode_domain_search(names)
    assert len(value) > 2 * 255
    msg = discover(o119=value)
    data = encode(msg, max_size=1472)
    assert data.count(bytes([119, 255])) == 2
    assert decode(data).options[119] == value


def test_overload_written_and_read() -> None:
    big = encode_ip_list(IPv4Address(f"10.0.{i}.1") for i in range(60))  # 240
    msg = discover(o42=big[:200], o6=big[:120])
    data = encode(msg, max_size=400)
    assert len(data) <= 400
    assert bytes([52, 1]) in data[240:]
    back = decode(data)
    assert back.options == msg.options
    with pytest.raises(MessageTooLarge):
        encode(discover(o42=big, o6=big, o119=big), max_size=300)


def test_overload_in_sname_and_file() -> None:
    base = bytearray(encode(discover()))
    # options field: type, overload=3; file: router; sname: dns
    opts = bytes([53, 1, 1, 52, 1, 3, 255])
    base[240 : 240 + len(opts)] = opts
    base[108 : 108 + 7] = bytes([3, 4, 10, 0, 0, 1, 255])
    base[44 : 44 + 7] = bytes([6, 4, 10, 0, 0, 2, 255])
    msg = decode(bytes(base))
    assert msg.ip_list(DhcpOption.ROUTER) == [IPv4Address("10.0.0.1")]
    assert msg.ip_list(DhcpOption.DOMAIN_NAME_SERVER) == [IPv4Address("10.0.0.2")]
    assert msg.sname == b"" and msg.file == b""


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda d: d[:100], ShortMessage),
        (lambda d: d[:236] + b"\x00\x00\x00\x00" + d[240:], BadMagicCookie),
        (lambda d: d[:240] + bytes([53, 1, 1, 12, 200, 65]), ShortMessage),
        (lambda d: d[:240] + bytes([52, 1, 3, 52, 1, 3, 255]), BadOption),
        (lambda d: d[:240] + bytes([52, 1, 7, 255]), BadOption),
        (lambda d: d[:2] + bytes([17]) + d[3:], DhcpError),  # hlen > 16
        (lambda d: bytes([9]) + d[1:], DhcpError),  # op
    ],
)
def test_malformed(mutate: object, error: type[Exception]) -> None:
    data = encode(discover())
    with pytest.raises(error):
        decode(mutate(data))  # type: ignore[operator]


def test_option_value_checks() -> None:
    msg = discover(o50=b"\x01\x02\x03", o51=b"\x00", o53=b"\x09", o12=b"bad\x01")
    with pytest.raises(BadOptionValue):
        msg.ip(DhcpOption.REQUESTED_IP_ADDRESS)
    with pytest.raises(BadOptionValue):
        msg.u32(DhcpOption.IP_ADDRESS_LEASE_TIME)
    with pytest.raises(BadOptionValue):
        _ = msg.message_type
    with pytest.raises(BadOptionValue):
        msg.text(DhcpOption.HOST_NAME)


# properties

option_values = st.dictionaries(
    st.integers(1, 254).filter(lambda c: c != DhcpOption.OPTION_OVERLOAD),
    st.binary(max_size=300),
    max_size=8,
)
messages = st.builds(
    DhcpMessage,
    op=st.sampled_from([BOOTREQUEST, BOOTREPLY]),
    xid=st.integers(0, 2**32 - 1),
    chaddr=st.binary(max_size=16),
    htype=st.integers(0, 255),
    hops=st.integers(0, 255),
    secs=st.integers(0, 65535),
    flags=st.integers(0, 65535),
    ciaddr=st.integers(0, 2**32 - 1).map(IPv4Address),
    yiaddr=st.integers(0, 2**32 - 1).map(IPv4Address),
    sname=st.binary(max_size=64).map(lambda b: b.rstrip(b"\0")),
    file=st.binary(max_size=128).map(lambda b: b.rstrip(b"\0")),
    options=option_values,
)


@settings(deadline=None)
@given(messages)
def test_round_trip(msg: DhcpMessage) -> None:
    try:
        data = encode(msg, max_size=1472)
    except MessageTooLarge:
        return
    back = decode(data)
    if bytes([52, 1]) in data[240:]:  # overloaded: sname/file carry options
        back.sname, back.file = msg.sname, msg.file
    assert back == msg


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=700))
def test_fuzz_only_dhcp_errors(data: bytes) -> None:
    try:
        msg = decode(data)
    except DhcpError:
        return
    for code in list(msg.options):
        for getter in (msg.ip, msg.ip_list, msg.u32, msg.u16, msg.text):
            try:
                getter(code)
            except DhcpError:
                pass
    try:
        decode_domain_search(msg.options.get(119, b"\x00"))
    except DhcpError:
        pass


@settings(deadline=None, max_examples=500)
@given(st.data())
def test_fuzz_mutated_valid_message(data: st.DataObject) -> None:
    wire = bytearray(
        encode(discover(o12=b"host", o55=bytes([1, 3, 6]), o119=b"\x03abc\x00"))
    )
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        decode(bytes(wire[:cut]))
    except DhcpError:
        pass


# differential: scapy as an independent reader/writer (test-only, GPL)


def test_scapy_reads_ours() -> None:
    scapy_dhcp = pytest.importorskip("scapy.layers.dhcp")
    msg = discover(
        o50=IPv4Address("10.1.2.3").packed,
        o12=b"laptop",
        o55=bytes([1, 3, 6, 15, 42, 119]),
    )
    parsed = scapy_dhcp.BOOTP(encode(msg))
    assert parsed.xid == msg.xid
    assert parsed.chaddr[:6] == MAC
    opts = dict(o for o in parsed[scapy_dhcp.DHCP].options if isinstance(o, tuple))
    assert opts["message-type"] == 1
    assert opts["requested_addr"] == "10.1.2.3"
    assert opts["hostname"] == b"laptop"


def test_we_read_scapy() -> None:
    scapy_dhcp = pytest.importorskip("scapy.layers.dhcp")
    pkt = scapy_dhcp.BOOTP(
        op=2, xid=99, chaddr=MAC, yiaddr="10.9.8.7"
    ) / scapy_dhcp.DHCP(
        options=[
            ("message-type", "offer"),
            ("server_id", "10.9.8.1"),
            ("lease_time", 600),
            ("router", "10.9.8.1"),
            ("name_server", "10.9.8.1", "10.9.8.2"),
            ("domain", b"home.example"),
            "end",
        ]
    )
    msg = decode(bytes(pkt))
    assert msg.message_type == DhcpMessageType.OFFER
    assert msg.yiaddr == IPv4Address("10.9.8.7")
    assert msg.u32(DhcpOption.IP_ADDRESS_LEASE_TIME) == 600
    assert msg.ip_list(DhcpOption.DOMAIN_NAME_SERVER) == [
        IPv4Address("10.9.8.1"),
        IPv4Address("10.9.8.2"),
    ]
    assert msg.text(DhcpOption.DOMAIN_NAME) == "home.example"
