"""DHCPv4 wire codec: RFC 2131 messages, RFC 2132 options.

A message is a fixed 236-byte BOOTP header, the magic cookie and a list of
type-length-value options. Two complications are handled here so that the
cores only ever see a clean `dict[code, value]`:

- option overload (option 52, RFC 2132 §9.3): options continue in the `file`
  and then the `sname` field. The reader takes options, then file, then sname
  (RFC 2131 §4.1); the writer spills into them when the options field is full.
- long options (RFC 3396): an option may appear several times; the values are
  concatenated in order. The writer splits values longer than 255 octets.

Every read is bounds-checked by `Reader`; anything wrong raises a subclass of
`DhcpError` and nothing else (the server turns it into a counted drop).
Option values are kept as bytes; the typed getters on `DhcpMessage` and the
`encode_*`/`decode_*` helpers convert them, raising `BadOptionValue`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address

# fixed header (RFC 2131 §2, figure 1)
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
ETHERNET_HLEN = 6
CHADDR_SIZE = 16
SNAME_SIZE = 64
FILE_SIZE = 128
FIXED_HEADER_SIZE = 236
MAGIC_COOKIE = b"\x63\x82\x53\x63"
OPTIONS_OFFSET = FIXED_HEADER_SIZE + len(MAGIC_COOKIE)
SNAME_OFFSET = 44
FILE_OFFSET = SNAME_OFFSET + SNAME_SIZE
BROADCAST_FLAG = 0x8000
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")

# sizes
MAX_OPTION_LENGTH = 255
IP_UDP_HEADERS = 28
# RFC 2131 §2: every client must accept 576-octet IP datagrams
DEFAULT_MAX_MESSAGE_SIZE = 576 - IP_UDP_HEADERS
# RFC 1542 §3.3: some BOOTP relays and clients drop messages under 300 octets
BOOTP_MIN_SIZE = 300
MAX_DOMAIN_NAME = 255
MAX_LABEL = 63
_POINTER = 0xC0


class DhcpMessageType(IntEnum):
    """Option 53 values (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class DhcpOption(IntEnum):
    """The option codes the moat reads or writes (RFC 2132 unless noted)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DOMAIN_NAME_SERVER = 6
    HOST_NAME = 12
    DOMAIN_NAME = 15
    INTERFACE_MTU = 26
    BROADCAST_ADDRESS = 28
    NTP_SERVERS = 42
    REQUESTED_IP_ADDRESS = 50
    IP_ADDRESS_LEASE_TIME = 51
    OPTION_OVERLOAD = 52
    DHCP_MESSAGE_TYPE = 53
    SERVER_IDENTIFIER = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAXIMUM_DHCP_MESSAGE_SIZE = 57
    RENEWAL_TIME_VALUE = 58
    REBINDING_TIME_VALUE = 59
    CLIENT_IDENTIFIER = 61
    DOMAIN_SEARCH = 119  # RFC 3397
    END = 255


class Overload(IntEnum):
    """Option 52 values: which header fields hold more options."""

    FILE = 1
    SNAME = 2
    BOTH = 3


class DhcpError(Exception):
    """A DHCP message or option value that cannot be read or written."""


class ShortMessage(DhcpError):
    """Fewer octets than a length or the fixed header says."""


class BadHeader(DhcpError):
    """A fixed-header field out of range (hlen, op)."""


class BadMagicCookie(DhcpError):
    """The four octets after the header are not 99.130.83.99."""


class BadOption(DhcpError):
    """Option area malformed: length past the end, overload in the wrong place."""


class BadOptionValue(DhcpError):
    """An option's value has the wrong length or content for its code."""


class MessageTooLarge(DhcpError):
    """The options do not fit the size the peer can receive, even overloaded."""


class Reader:
    """Bounded reader: every take checks the length first."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ShortMessage(
                f"need {n} octets at {self.pos}, have {self.remaining()}"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]


@dataclass
class DhcpMessage:
    op: int
    xid: int
    chaddr: bytes  # hardware address, hlen octets
    htype: int = HTYPE_ETHERNET
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = IPv4Address(0)
    yiaddr: IPv4Address = IPv4Address(0)
    siaddr: IPv4Address = IPv4Address(0)
    giaddr: IPv4Address = IPv4Address(0)
    sname: bytes = b""  # trailing NULs stripped; empty when overloaded
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    # typed option getters; absent -> None, malformed -> BadOptionValue

    @property
    def message_type(self) -> DhcpMessageType | None:
        value = self.options.get(DhcpOption.DHCP_MESSAGE_TYPE)
        if value is None:
            return None
        if len(value) != 1 or value[0] not in DhcpMessageType._value2member_map_:
            raise BadOptionValue(f"option 53: bad message type {value.hex()}")
        return DhcpMessageType(value[0])

    def ip(self, code: int) -> IPv4Address | None:
        value = self.options.get(code)
        if value is None:
            return None
        if len(value) != 4:
            raise BadOptionValue(f"option {code}: {len(value)} octets, want 4")
        return IPv4Address(value)

    def ip_list(self, code: int) -> list[IPv4Address]:
        value = self.options.get(code)
        return [] if value is None else decode_ip_list(value, code)

    def u32(self, code: int) -> int | None:
        value = self.options.get(code)
        return None if value is None else decode_uint(value, 4, code)

    def u16(self, code: int) -> int | None:
        value = self.options.get(code)
        return None if value is None else decode_uint(value, 2, code)

    def text(self, code: int) -> str | None:
        value = self.options.get(code)
        return None if value is None else decode_text(value, code)

    @property
    def parameter_request_list(self) -> list[int]:
        return list(self.options.get(DhcpOption.PARAMETER_REQUEST_LIST, b""))

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    @property
    def client_key(self) -> str:
        """Client identity: option 61 when sent, else the hardware address."""
        client_id = self.options.get(DhcpOption.CLIENT_IDENTIFIER)
        if client_id:
            return "id:" + client_id.hex()
        return "hw:" + self.chaddr.hex()


# message


def decode(data: bytes) -> DhcpMessage:
    """Parse one DHCP message (UDP payload)."""
    reader = Reader(data)
    fields = _HEADER.unpack(reader.take(FIXED_HEADER_SIZE))
    op, htype, hlen, hops, xid, secs, flags = fields[:7]
    ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file_ = fields[7:]
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise BadHeader(f"op {op}")
    if hlen > CHADDR_SIZE:
        raise BadHeader(f"hlen {hlen} > {CHADDR_SIZE}")
    if reader.take(len(MAGIC_COOKIE)) != MAGIC_COOKIE:
        raise BadMagicCookie("no DHCP magic cookie")

    # options, then file, then sname (RFC 2131 §4.1)
    chunks: dict[int, list[bytes]] = {}
    overload = _read_options(Reader(data, OPTIONS_OFFSET), chunks, main=True)
    if overload in (Overload.FILE, Overload.BOTH):
        _read_options(Reader(file_), chunks, main=False)
        file_ = b""
    if overload in (Overload.SNAME, Overload.BOTH):
        _read_options(Reader(sname), chunks, main=False)
        sname = b""
    options = {code: b"".join(parts) for code, parts in chunks.items()}
    options.pop(DhcpOption.OPTION_OVERLOAD, None)

    return DhcpMessage(
        op=op,
        htype=htype,
        hops=hops,
        xid=xid,
        secs=secs,
        flags=flags,
        ciaddr=IPv4Address(ciaddr),
        yiaddr=IPv4Address(yiaddr),
        siaddr=IPv4Address(siaddr),
        giaddr=IPv4Address(giaddr),
        chaddr=chaddr[:hlen],
        sname=sname.rstrip(b"\0"),
        file=file_.rstrip(b"\0"),
        options=options,
    )


def _read_options(reader: Reader, chunks: dict[int, list[bytes]], main: bool) -> int:
    """Collect TLVs up to END or the end of the area; return the overload value."""
    overload = 0
    while reader.remaining() > 0:
        code = reader.u8()
        if code == DhcpOption.PAD:
            continue
        if code == DhcpOption.END:
            break
        value = reader.take(reader.u8())
        if code == DhcpOption.OPTION_OVERLOAD:
            # RFC 2132 §9.3: only in the options field, one octet 1..3
            if not main or len(value) != 1 or value[0] not in (1, 2, 3) or overload:
                raise BadOption("misplaced or malformed option overload")
            overload = value[0]
        chunks.setdefault(code, []).append(value)
    return overload


def encode(
    msg: DhcpMessage,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    pad_to: int = BOOTP_MIN_SIZE,
) -> bytes:
    """Serialise `msg`; options that do not fit spill into file and sname."""
    if len(msg.chaddr) > CHADDR_SIZE:
        raise BadHeader(f"chaddr of {len(msg.chaddr)} octets")
    if len(msg.sname) > SNAME_SIZE or len(msg.file) > FILE_SIZE:
        raise BadHeader("sname or file too long")
    items = _option_items(msg.options)

    # fill the options field; overload only when it is too small
    main_room = max(0, max_size - OPTIONS_OFFSET) - 1
    sname, file_ = msg.sname, msg.file
    try:
        (main,) = _fill(items, [main_room])
    except MessageTooLarge:
        main, file_area, sname_area = _fill(
            items, [main_room - 3, FILE_SIZE - 1, SNAME_SIZE - 1]
        )
        overload = Overload.BOTH if sname_area else Overload.FILE
        main += bytes([DhcpOption.OPTION_OVERLOAD, 1, overload])
        file_ = file_area + bytes([DhcpOption.END])
        if sname_area:
            sname = sname_area + bytes([DhcpOption.END])
    options = main + bytes([DhcpOption.END])

    header = _HEADER.pack(
        msg.op,
        msg.htype,
        len(msg.chaddr),
        msg.hops,
        msg.xid,
        msg.secs,
        msg.flags,
        msg.ciaddr.packed,
        msg.yiaddr.packed,
        msg.siaddr.packed,
        msg.giaddr.packed,
        msg.chaddr,
        sname,
        file_,
    )
    out = header + MAGIC_COOKIE + options
    if len(out) < pad_to:
        out += bytes(pad_to - len(out))
    return out


def _option_items(options: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """Options in writing order, message type first."""
    codes = sorted(options, key=lambda c: c != DhcpOption.DHCP_MESSAGE_TYPE)
    for code in codes:
        if not 0 < code < DhcpOption.END or code == DhcpOption.OPTION_OVERLOAD:
            raise BadOption(f"option code {code} cannot be written")
    return [(code, options[code]) for code in codes]


def _fill(items: Sequence[tuple[int, bytes]], rooms: Sequence[int]) -> list[bytes]:
    """Write TLVs into areas of the given sizes, in order, splitting values
    where an area runs out or past 255 octets (RFC 3396)."""
    areas = [bytearray() for _ in rooms]
    area = 0
    for code, value in items:
        pos = 0
        while True:
            room = rooms[area] - len(areas[area]) - 2
            want = min(len(value) - pos, MAX_OPTION_LENGTH)
            if room < min(want, 1):
                area += 1
                if area == len(rooms):
                    raise MessageTooLarge("options do not fit")
                continue
            chunk = value[pos : pos + min(want, room)]
            areas[area] += bytes([code, len(chunk)]) + chunk
            pos += len(chunk)
            if pos >= len(value):
                break
    return [bytes(a) for a in areas]


# option values


def encode_ip_list(addresses: Iterable[IPv4Address]) -> bytes:
    return b"".join(a.packed for a in addresses)


def decode_ip_list(value: bytes, code: int = 0) -> list[IPv4Address]:
    if not value or len(value) % 4:
        raise BadOptionValue(f"option {code}: {len(value)} octets, want 4*n")
    return [IPv4Address(value[i : i + 4]) for i in range(0, len(value), 4)]


def encode_uint(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def decode_uint(value: bytes, size: int, code: int = 0) -> int:
    if len(value) != size:
        raise BadOptionValue(f"option {code}: {len(value)} octets, want {size}")
    return int.from_bytes(value, "big")


def decode_text(value: bytes, code: int = 0) -> str:
    """NVT ASCII text; a trailing NUL is tolerated (RFC 2132 §2)."""
    value = value.rstrip(b"\0")
    if not value or any(b < 0x20 or b > 0x7E for b in value):
        raise BadOptionValue(f"option {code}: not printable ASCII")
    return value.decode("ascii")


def encode_domain_search(names: Sequence[str]) -> bytes:
    """Domain search list in DNS wire format with compression (RFC 3397 §2)."""
    out = bytearray()
    seen: dict[tuple[str, ...], int] = {}
    for name in names:
        labels = tuple(label for label in name.rstrip(".").lower().split("."))
        if not name.strip(".") or any(not 0 < len(lb) <= MAX_LABEL for lb in labels):
            raise BadOptionValue(f"domain search: bad name {name!r}")
        if sum(len(lb) + 1 for lb in labels) + 1 > MAX_DOMAIN_NAME:
            raise BadOptionValue(f"domain search: name too long {name!r}")
        for i in range(len(labels)):
            suffix = labels[i:]
            if suffix in seen:
                out += struct.pack("!H", 0xC000 | seen[suffix])
                break
            if len(out) < 0x3FFF:
                seen[suffix] = len(out)
            encoded = labels[i].encode("ascii")
            out += bytes([len(encoded)]) + encoded
        else:
            out += b"\0"
    return bytes(out)


def decode_domain_search(value: bytes) -> list[str]:
    """Inverse of encode_domain_search; pointers may only point backwards."""
    names: list[str] = []
    pos = 0
    while pos < len(value):
        labels, pos = _read_name(value, pos)
        names.append(".".join(labels))
    return names


def _read_name(data: bytes, pos: int) -> tuple[list[str], int]:
    labels: list[str] = []
    wire_length = 1
    resume: int | None = None
    ceiling = pos  # each pointer must land before the last one: no loops
    while True:
        if pos >= len(data):
            raise BadOptionValue("domain search: name runs past the end")
        length = data[pos]
        if length & _POINTER == _POINTER:
            if pos + 1 >= len(data):
                raise BadOptionValue("domain search: truncated pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= ceiling:
                raise BadOptionValue("domain search: pointer not backwards")
            if resume is None:
                resume = pos + 2
            pos = ceiling = target
            continue
        if length & _POINTER:
            raise BadOptionValue("domain search: reserved label type")
        if length == 0:
            break
        label = data[pos + 1 : pos + 1 + length]
        if len(label) != length:
            raise BadOptionValue("domain search: label runs past the end")
        if any(b <= 0x20 or b >= 0x7F or b == 0x2E for b in label):
            raise BadOptionValue("domain search: label not printable")
        wire_length += length + 1
        if wire_length > MAX_DOMAIN_NAME:
            raise BadOptionValue("domain search: name too long")
        labels.append(label.decode("ascii"))
        pos += length + 1
    if not labels:
        raise BadOptionValue("domain search: empty name")
    return labels, (pos + 1 if resume is None else resume)
