"""The forwarder against small resolvers on loopback: truncated answers are
fetched over TCP, identical questions in flight share one upstream query, a
silent resolver gives way to the next one."""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.flags
import dns.message
import dns.rrset

from services.dns.forwarder import Forwarder

ADDRESS = "10.0.0.1"


def answer(wire: bytes, truncate: bool) -> bytes:
    query = dns.message.from_wire(wire)
    reply = dns.message.make_response(query)
    if truncate:
        reply.flags |= dns.flags.TC
    else:
        name = query.question[0].name
        reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", ADDRESS))
    return reply.to_wire()


class Resolver(asyncio.DatagramProtocol):
    """UDP answers TC=1 (or nothing when mute); TCP answers in full."""

    def __init__(self, mute: bool = False) -> None:
        self.mute = mute
        self.udp_queries = 0
        self.tcp_queries = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.udp_queries += 1
        if not self.mute and self.transport is not None:
            asyncio.get_running_loop().call_later(
                0.05, self.transport.sendto, answer(data, truncate=True), addr
            )

    async def tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        self.tcp_queries += 1
        reply = answer(await reader.readexactly(length), truncate=False)
        writer.write(struct.pack("!H", len(reply)) + reply)
        await writer.drain()
        writer.close()


async def start(resolver: Resolver) -> tuple[int, asyncio.Server]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await loop.create_datagram_endpoint(lambda: resolver, sock=sock)
    server = await asyncio.start_server(resolver.tcp, "127.0.0.1", port)
    return port, server


def test_truncated_answer_retried_over_tcp_and_duplicates_shared() -> None:
    async def scenario() -> None:
        resolver = Resolver()
        port, server = await start(resolver)
        fwd = Forwarder([("127.0.0.1", port)], timeout=2.0)
        query = dns.message.make_query("big.example.", "A")
        replies = await asyncio.gather(*(fwd.resolve(query) for _ in range(3)))
        for reply in replies:
            assert reply is not None and reply.answer[0][0].to_text() == ADDRESS
        assert resolver.udp_queries == 1 and resolver.tcp_queries == 1
        assert fwd.counters["upstream_shared"] == 2
        server.close()

    asyncio.run(scenario())


def test_silent_resolver_gives_way_to_the_next() -> None:
    async def scenario() -> None:
        mute, good = Resolver(mute=True), Resolver()
        mute_port, s1 = await start(mute)
        good_port, s2 = await start(good)
        fwd = Forwarder([("127.0.0.1", mute_port), ("127.0.0.1", good_port)], 0.3)
        reply = await fwd.resolve(dns.message.make_query("x.example.", "A"))
        assert reply is not None and reply.answer
        assert mute.udp_queries == 1 and fwd.counters["upstream_timeouts"] == 1
        s1.close()
        s2.close()

    asyncio.run(scenario())


def test_no_resolver_answering_fails_fast_for_a_while() -> None:
    async def scenario() -> None:
        mute = Resolver(mute=True)
        port, server = await start(mute)
        fwd = Forwarder([("127.0.0.1", port)], 0.2)
        assert await fwd.resolve(dns.message.make_query("a.example.", "A")) is None
        assert await fwd.resolve(dns.message.make_query("b.example.", "A")) is None
        assert mute.udp_queries == 1  # the second never left
        assert fwd.counters["upstream_down_fast_fail"] == 1
        server.close()

    asyncio.run(scenario())
