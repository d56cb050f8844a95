"""NTP codec, server and client cores: vectors, properties, fuzzing."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ntp import packet
from services.ntp.client import ClockState, NtpClient, Sample
from services.ntp.packet import Leap, Mode, NtpError, NtpPacket
from services.ntp.server import NtpServer

UPSTREAM = ("10.98.0.1", 123)
SYNCED = ClockState(True, 4, bytes([10, 98, 0, 1]), 1_796_300_000.0, 0.002, 0.001)
UNSYNCED = ClockState(False, 16, bytes(4), 0.0, 0.0, 0.0)


def client_request(transmit: int = 0x1122334455667788, version: int = 4) -> bytes:
    first = (0 << 6) | (version << 3) | Mode.CLIENT
    return bytes([first, 0, 6, 0]) + bytes(36) + struct.pack("!Q", transmit)


# -- codec --------------------------------------------------------------------


def test_decode_known_request() -> None:
    p = packet.decode(client_request())
    assert (p.leap, p.version, p.mode, p.poll) == (0, 4, Mode.CLIENT, 6)
    assert p.transmit_ts == 0x1122334455667788 and p.origin_ts == 0


def test_decode_rejects_short() -> None:
    for n in (0, 1, 47):
        try:
            packet.decode(bytes(n))
        except NtpError:
            continue
        raise AssertionError(f"{n} bytes accepted")


@settings(deadline=None)
@given(st.binary(min_size=48, max_size=120))
def test_decode_encode_is_identity(data: bytes) -> None:
    assert packet.decode(data).encode() == data


@settings(deadline=None)
@given(st.binary(max_size=120))
def test_decode_raises_only_ntp_error(data: bytes) -> None:
    try:
        packet.decode(data)
    except NtpError:
        pass


def test_timestamps_cross_the_2036_era_boundary() -> None:
    era_end = 2**32 - packet.NTP_UNIX_OFFSET  # 2036-02-07 06:28:16 UTC
    before, after = packet.from_unix(era_end - 1.5), packet.from_unix(era_end + 2.25)
    assert after < before  # wrapped
    assert packet.timestamp_diff(after, before) == 3.75
    assert packet.to_unix(after, era_end) == era_end + 2.25
    assert packet.to_unix(before, era_end + 100) == era_end - 1.5


@settings(deadline=None)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_unix_roundtrip(t: float) -> None:
    assert abs(packet.to_unix(packet.from_unix(t), t + 1000) - t) < 1e-6


# -- server -------------------------------------------------------------------


def test_server_unsynchronised_says_so() -> None:
    server = NtpServer()
    reply = server.respond(client_request(), 111, 222, UNSYNCED)
    assert reply is not None
    p = packet.decode(reply)
    assert p.leap == Leap.ALARM and p.stratum == 16 and p.mode == Mode.SERVER


def test_server_synchronised_reply_fields() -> None:
    reply = NtpServer().respond(client_request(version=3), 111, 222, SYNCED)
    assert reply is not None and len(reply) == packet.HEADER_SIZE
    p = packet.decode(reply)
    assert (p.leap, p.version, p.mode, p.stratum, p.poll) == (0, 3, 4, 4, 6)
    assert p.origin_ts == 0x1122334455667788  # the client's transmit, verbatim
    assert (p.receive_ts, p.transmit_ts) == (111, 222)
    assert p.reference_id == bytes([10, 98, 0, 1])
    assert abs(packet.from_short(p.root_delay) - 0.002) < 1e-4


def test_server_ignores_other_modes_and_counts_them() -> None:
    server = NtpServer()
    base = bytearray(client_request())
    for mode in range(8):
        base[0] = (4 << 3) | mode
        reply = server.respond(bytes(base), 1, 2, SYNCED)
        assert (reply is not None) == (mode == Mode.CLIENT)
    assert server.counters["drop_mode_6"] == 1
    assert server.counters["drop_mode_7"] == 1
    assert server.counters["drop_mode_other"] == 5  # modes 0, 1, 2, 4, 5


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_server_fuzz_only_drops_or_one_header(data: bytes) -> None:
    server = NtpServer()
    reply = server.respond(data, 1, 2, SYNCED)
    # never more bytes out than in: no amplification
    assert reply is None or len(reply) == packet.HEADER_SIZE <= len(data)
    assert server.respond(client_request(), 1, 2, SYNCED) is not None


# -- client -------------------------------------------------------------------


def serve(request: bytes, t2: float, t3: float, **over: int) -> bytes:
    """A reply from an upstream whose clock reads t2 at receive, t3 at send."""
    req = packet.decode(request)
    fields = dict(
        leap=0,
        version=4,
        mode=Mode.SERVER,
        stratum=2,
        poll=0,
        precision=-20,
        root_delay=packet.to_short(0.01),
        root_dispersion=packet.to_short(0.01),
        reference_id=b"GPS\0",
        reference_ts=packet.from_unix(t2 - 10),
        origin_ts=req.transmit_ts,
        receive_ts=packet.from_unix(t2),
        transmit_ts=packet.from_unix(t3),
    )
    fields.update(over)
    return NtpPacket(**fields).encode()  # type: ignore[arg-type]


def test_client_computes_offset_and_delay() -> None:
    client = NtpClient(UPSTREAM)
    t1 = 1_796_300_000.0
    # upstream is 2.5 s ahead; 40 ms each way; 1 ms in the server
    reply = serve(client.request(t1), t1 + 0.040 + 2.5, t1 + 0.041 + 2.5)
    sample = client.response(reply, UPSTREAM, t1 + 0.081)
    assert isinstance(sample, Sample)
    assert abs(sample.offset - 2.5) < 1e-6 and abs(sample.delay - 0.080) < 1e-6
    state = client.clock_state(t1 + 1)
    assert state.synchronised and state.stratum == 3
    assert state.reference_id == bytes([10, 98, 0, 1])


def test_client_rejects_bad_replies() -> None:
    client = NtpClient(UPSTREAM)
    t = 1_796_300_000.0
    request = client.request(t)
    good = serve(request, t, t)
    assert client.response(good, ("10.98.0.9", 123), t) == "wrong_source"
    assert client.response(good[:47], UPSTREAM, t) == "short"
    assert client.response(serve(request, t, t, mode=5), UPSTREAM, t) == "wrong_mode"
    assert client.response(serve(request, t, t, origin_ts=7), UPSTREAM, t) == (
        "bogus_origin"
    )
    assert client.response(serve(request, t, t, leap=3), UPSTREAM, t) == (
        "unsynchronised"
    )
    # the outstanding request was used up: a replay of a good reply is bogus
    assert client.response(good, UPSTREAM, t) == "bogus_origin"
    request = client.request(t)
    assert client.response(serve(request, t, t, stratum=16), UPSTREAM, t) == (
        "unsynchronised"
    )
    request = client.request(t)
    assert client.response(serve(request, t, t, transmit_ts=0), UPSTREAM, t) == (
        "zero_transmit"
    )
    assert not client.clock_state(t).synchronised


def test_client_kiss_of_death_backs_off() -> None:
    client = NtpClient(UPSTREAM)
    request = client.request(1e9)
    kod = serve(request, 1e9, 1e9, stratum=0, reference_id=b"RATE")
    assert client.response(kod, UPSTREAM, 1e9) == "kiss_rate"
    assert client.backoff == 1


def test_client_filter_uses_smallest_delay() -> None:
    client = NtpClient(UPSTREAM)
    t = 1_796_300_000.0
    for delay, offset in ((0.2, 0.09), (0.01, 0.001), (0.3, -0.1)):
        reply = serve(client.request(t), t + delay / 2 + offset, t + delay / 2 + offset)
        client.response(reply, UPSTREAM, t + delay)
        t += 1
    assert client.selected is not None
    assert abs(client.selected.offset - 0.001) < 1e-6


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.booleans())
def test_client_fuzz_only_drop_reasons(data: bytes, keep_origin: bool) -> None:
    client = NtpClient(UPSTREAM)
    request = client.request(1_796_300_000.0)
    if keep_origin and len(data) >= 48:
        data = data[:24] + request[40:48] + data[32:]
    result = client.response(data, UPSTREAM, 1_796_300_000.1)
    assert isinstance(result, Sample | str)
