"""ForwardClient against scripted receivers on real loopback sockets: acks, window, timeouts, resend,
hostile answers (garbage, unknown ack ids, wrong PONG digest), handshake, reconnect with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import select
import socket
import ssl
import struct
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pyforward.certs import TLSFiles, TLSMaterial
from pyforward.client import ClientConfig, ForwardClient, Stream
from pyforward.protocol import (
    Chunk,
    EntryPacker,
    EventTime,
    Ping,
    Pong,
    Request,
    ServerDecoder,
    build_chunk,
    encode_ack,
    encode_helo,
    encode_pong,
    make_helo,
    make_pong,
    verify_ping,
)
from pyforward.transport import Destination, open_stream, socket_transport
from tests.conftest import CertFiles

Handler = Callable[["Conn"], Awaitable[None]]


@dataclass
class Conn:
    """One accepted connection of a scripted receiver."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: ServerDecoder = field(default_factory=ServerDecoder)
    raw: bytearray = field(default_factory=bytearray)

    async def next_events(self) -> list[object]:
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.raw += data
            events: list[object] = list(self.decoder.feed(data))
            if events:
                return events

    async def requests(self) -> AsyncIterator[Request]:
        while True:
            try:
                events = await self.next_events()
            except EOFError:
                return
            for event in events:
                assert isinstance(event, Request)
                yield event

    def ack(self, request: Request) -> None:
        assert request.chunk is not None
        self.writer.write(encode_ack(request.chunk))

    def reset(self) -> None:
        """Close with a RST (SO_LINGER 0), as a receiver killed with unread data does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


@dataclass
class Scripted:
    port: int
    connections: int = 0
    chunk_ids: list[bytes] = field(default_factory=list)
    records: int = 0


@contextlib.asynccontextmanager
async def scripted(handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> AsyncIterator[Scripted]:
    state = Scripted(port=0)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        with contextlib.suppress(ConnectionError, EOFError, asyncio.CancelledError):
            await handler(Conn(reader, writer))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_ctx)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()


def connector(port: int, ssl_ctx: ssl.SSLContext | None = None) -> Callable[[], Awaitable[Stream]]:
    async def connect() -> Stream:
        return await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None
        )

    return connect


def make_chunks(n: int, records: int = 3) -> list[Chunk]:
    packer = EntryPacker()
    chunks = []
    for i in range(n):
        entries = b"".join(packer.pack_entry(EventTime(1_700_000_000 + i, 5), {"i": i, "j": j}) for j in range(records))
        chunks.append(build_chunk("audit", entries, records, size=100, compress=i % 2 == 0, position=i))
    return chunks


def collect(acked: list[int]) -> Callable[[Chunk, float], None]:
    def on_ack(chunk: Chunk, latency: float) -> None:
        assert isinstance(chunk.position, int)
        acked.append(chunk.position)

    return on_ack


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """Reference counting only: what is cyclic garbage stays alive meanwhile, so that a test can see it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def fast_config(**kw: object) -> ClientConfig:
    base: dict[str, object] = {"backoff_initial": 0.01, "backoff_max": 0.05, "ack_timeout": 5.0, "window": 4}
    base.update(kw)
    return ClientConfig(**base)  # type: ignore[arg-type]


async def run_client(
    port: int, chunks: list[Chunk], config: ClientConfig, ssl_ctx: ssl.SSLContext | None = None, timeout: float = 15
) -> tuple[ForwardClient, list[int]]:
    acked: list[int] = []
    client = ForwardClient(connector(port, ssl_ctx), config, on_ack=collect(acked))
    client.start()
    for chunk in chunks:
        client.submit(chunk)
    try:
        assert await client.drain(timeout), f"not drained: {client.stats}"
    finally:
        await client.close()
    return client, acked


async def acking(conn: Conn) -> None:
    async for request in conn.requests():
        conn.ack(request)


async def test_every_chunk_acked_once() -> None:
    seen: list[Request] = []

    async def handler(conn: Conn) -> None:
        async for request in conn.requests():
            seen.append(request)
            conn.ack(request)

    async with scripted(handler) as server:
        client, acked = await run_client(server.port, make_chunks(20), fast_config())
    assert sorted(acked) == list(range(20))
    assert len(seen) == 20
    assert sum(len(r.entries) for r in seen) == 60
    assert seen[0].entries[0].time == EventTime(1_700_000_000, 5)
    assert client.stats.connects == 1


async def test_window_bounds_chunks_in_flight() -> None:
    """The receiver withholds acks: exactly `window` chunks arrive before it acks anything."""
    arrived_before_ack: list[int] = []

    async def handler(conn: Conn) -> None:
        held: list[Request] = []
        async for request in conn.requests():
            held.append(request)
            if len(held) == 3:
                arrived_before_ack.append(len(held))
                # the client must now wait: nothing more arrives until we ack
                with contextlib.suppress(TimeoutError):
                    extra = await asyncio.wait_for(conn.reader.read(65536), 0.3)
                    raise AssertionError(f"client sent {len(extra)} bytes beyond its window")
                for r in held:
                    conn.ack(r)
                held.clear()
                break
        async for request in conn.requests():
            conn.ack(request)

    async with scripted(handler) as server:
        _, acked = await run_client(server.port, make_chunks(6), fast_config(window=3))
    assert arrived_before_ack == [3]
    assert sorted(acked) == list(range(6))


async def test_ack_timeout_drops_connection_and_resends_same_ids() -> None:
    async def handler(conn: Conn) -> None:
        if state.connections == 1:
            async for request in conn.requests():
                assert request.chunk is not None
                state.chunk_ids.append(request.chunk)  # never ack
            return
        async for request in conn.requests():
            assert request.chunk is not None
            state.chunk_ids.append(request.chunk)
            conn.ack(request)

    async with scripted(handler) as state:
        client, acked = await run_client(state.port, make_chunks(2), fast_config(ack_timeout=0.3))
    assert sorted(acked) == [0, 1]
    assert state.connections >= 2
    assert client.stats.chunks_retried >= 2
    assert len(state.chunk_ids) >= 4
    assert len(set(state.chunk_ids)) == 2  # the retries carried the same chunk ids as the first sends


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"\xc1garbage", id="garbage"),
        pytest.param(encode_ack(b"not-a-chunk-we-sent"), id="unknown-ack-id"),
        pytest.param(encode_helo(make_helo(user_auth=False)), id="unexpected-helo"),
    ],
)
async def test_bad_answers_make_the_client_reconnect_and_resend(answer: bytes) -> None:
    async def handler(conn: Conn) -> None:
        if state.connections == 1:
            await conn.next_events()
            conn.writer.write(answer)
            await conn.writer.drain()
            await conn.reader.read()  # the client must hang up
            state.chunk_ids.append(b"closed-by-client")
            return
        await acking(conn)

    async with scripted(handler) as state:
        client, acked = await run_client(state.port, make_chunks(3), fast_config())
    assert sorted(acked) == [0, 1, 2]
    assert state.chunk_ids == [b"closed-by-client"]
    assert client.stats.connects >= 2


async def test_receiver_closing_before_every_nth_ack_loses_nothing() -> None:
    async def handler(conn: Conn) -> None:
        count = 0
        async for request in conn.requests():
            count += 1
            state.records += 1
            if state.records % 4 == 0 and count > 0:
                return  # close without acking this one
            conn.ack(request)

    async with scripted(handler) as state:
        _, acked = await run_client(state.port, make_chunks(12), fast_config(window=2))
    assert sorted(set(acked)) == list(range(12))
    assert len(acked) == 12  # on_ack fires once per chunk, even when the receiver saw it twice


async def test_unreachable_receiver_is_retried_until_it_comes_up() -> None:
    async with scripted(acking) as state:
        port = state.port
    # nothing listens on `port` now: the client must keep trying, without losing the chunks
    acked: list[int] = []
    client = ForwardClient(connector(port), fast_config(), on_ack=collect(acked))
    client.start()
    for chunk in make_chunks(3):
        client.submit(chunk)

    async def failed_attempt() -> None:
        while not client.stats.last_error:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(failed_attempt(), 5)
    assert "refused" in client.stats.last_error
    server = await asyncio.start_server(lambda r, w: acking(Conn(r, w)), "127.0.0.1", port)
    try:
        assert await client.drain(10)
    finally:
        await client.close()
        server.close()
    assert sorted(acked) == [0, 1, 2]


# --- handshake ---------------------------------------------------------------------------------------------
def handshake_receiver(
    shared_key: str, *, users: dict[str, str] | None = None, tamper: Callable[[Pong], Pong] | None = None
) -> Handler:
    async def handler(conn: Conn) -> None:
        helo = make_helo(user_auth=bool(users))
        conn.writer.write(encode_helo(helo))
        events = await conn.next_events()
        ping = events[0]
        assert isinstance(ping, Ping)
        reason = verify_ping(ping, nonce=helo.nonce, shared_key=shared_key, auth=helo.auth, users=users or {})
        pong = make_pong(
            ping,
            ok=reason is None,
            reason=reason or "",
            nonce=helo.nonce,
            hostname="receiver-host",
            shared_key=shared_key,
        )
        if tamper is not None:
            pong = tamper(pong)
        after_ping = len(conn.raw)
        conn.writer.write(encode_pong(pong))
        await conn.writer.drain()
        if reason is not None or tamper is not None:
            await conn.reader.read()  # wait for the client to hang up
            handler.bytes_after_ping.append(len(conn.raw) - after_ping)  # type: ignore[attr-defined]
            return
        await acking(conn)

    handler.bytes_after_ping = []  # type: ignore[attr-defined]
    return handler


async def test_shared_key_handshake_then_acks() -> None:
    async with scripted(handshake_receiver("k3y")) as state:
        _, acked = await run_client(state.port, make_chunks(3), fast_config(shared_key="k3y", hostname="shipper"))
    assert sorted(acked) == [0, 1, 2]


async def test_user_auth_handshake() -> None:
    handler = handshake_receiver("k3y", users={"alice": "pw"})
    async with scripted(handler) as state:
        _, acked = await run_client(
            state.port, make_chunks(1), fast_config(shared_key="k3y", username="alice", password="pw")
        )
    assert acked == [0]


@pytest.mark.parametrize(
    ("client_key", "tamper"),
    [
        pytest.param("wrong", None, id="wrong-shared-key"),
        pytest.param("k3y", lambda p: Pong(True, "", p.hostname, b"0" * 128), id="wrong-pong-digest"),
        pytest.param("k3y", lambda p: Pong(True, "", b"shipper", p.shared_key_digest), id="pong-with-own-hostname"),
    ],
)
async def test_failed_handshake_never_sends_data(client_key: str, tamper: Callable[[Pong], Pong] | None) -> None:
    handler = handshake_receiver("k3y", tamper=tamper)
    async with scripted(handler) as state:
        acked: list[int] = []
        client = ForwardClient(
            connector(state.port),
            fast_config(shared_key=client_key, hostname="shipper"),
            on_ack=lambda c, _: acked.append(1),
        )
        client.start()
        client.submit(make_chunks(1)[0])

        async def refused_twice() -> None:
            while len(handler.bytes_after_ping) < 2:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)

        await asyncio.wait_for(refused_twice(), 10)
        await client.close()
    assert acked == []
    assert handler.bytes_after_ping[:2] == [0, 0]  # type: ignore[attr-defined]
    assert client.stats.last_error


async def test_mtls(certs: CertFiles) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(certs.ca))
    client_ctx.load_cert_chain(certs.client_cert, certs.client_key)
    async with scripted(acking, server_ctx) as state:
        _, acked = await run_client(state.port, make_chunks(5), fast_config(), ssl_ctx=client_ctx)
    assert sorted(acked) == list(range(5))


async def test_reconnect_resends_unacked_on_the_new_connection() -> None:
    first_conn = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if state.connections == 1:
            await conn.next_events()
            first_conn.set()
            await conn.reader.read()
            return
        await acking(conn)

    async with scripted(handler) as state:
        acked: list[int] = []
        client = ForwardClient(connector(state.port), fast_config(), on_ack=collect(acked))
        client.start()
        for chunk in make_chunks(2):
            client.submit(chunk)
        await asyncio.wait_for(first_conn.wait(), 5)
        client.reconnect("test")
        assert await client.drain(5)
        await client.close()
    assert sorted(acked) == [0, 1]
    assert state.connections == 2


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
async def test_a_connection_reset_by_the_receiver_is_freed_at_once(tls: bool, certs: CertFiles) -> None:
    """The StreamReader of a connection that died keeps its error, whose traceback keeps the frames that hold
    the reader: cyclic garbage, with the decoder's buffer and the transports. The shipper makes so few container
    objects that the collector's older generations seldom run, and RSS grew with every reconnect (issue 11
    item 5). With automatic collection off, the first connection's reader and writer must be gone once the
    second connection has acked everything."""
    server_ctx = client_ctx = None
    if tls:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
        server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        client_ctx = ssl.create_default_context(cafile=str(certs.ca))
        client_ctx.load_cert_chain(certs.client_cert, certs.client_key)
    streams: list[tuple[weakref.ref[asyncio.StreamReader], weakref.ref[asyncio.StreamWriter]]] = []

    async def connect() -> Stream:
        reader, writer = await connector(state.port, client_ctx)()
        streams.append((weakref.ref(reader), weakref.ref(writer)))
        return reader, writer

    async def handler(conn: Conn) -> None:
        if state.connections == 1:
            await conn.next_events()
            conn.reset()
            return
        await acking(conn)

    with gc_off():
        async with scripted(handler, server_ctx) as state:
            acked: list[int] = []
            client = ForwardClient(connect, fast_config(), on_ack=collect(acked))
            client.start()
            for chunk in make_chunks(2):
                client.submit(chunk)
            assert await client.drain(10), f"not drained: {client.stats}"
            await client.close()
        assert sorted(acked) == [0, 1]
        assert client.stats.connects == 2, client.stats
        assert "reset" in client.stats.last_error.lower(), client.stats.last_error
        reader, writer = streams[0]
        assert reader() is None, "the first connection's StreamReader is still alive (cyclic garbage)"
        assert writer() is None, "the first connection's StreamWriter is still alive (cyclic garbage)"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
async def test_a_connection_that_fails_on_a_write_is_freed_at_once(tls: bool, certs: CertFiles) -> None:
    """As above, but the connection dies on a write: the receiver resets it while the client does not read its
    socket (a reset that comes between the loop's last look at the socket and a chunk written by submit), so that
    the write is what fails (EPIPE/ECONNRESET inside asyncio's socket transport, under the TLS layer or not).
    With automatic collection off, the first connection's reader and writer must be gone once the second
    connection has acked everything."""
    server_ctx = client_tls = None
    if tls:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
        server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        files = TLSFiles(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        client_tls = TLSMaterial(files, purpose="client", name="receiver")
        client_tls.load()
    streams: list[tuple[weakref.ref[asyncio.StreamReader], weakref.ref[asyncio.StreamWriter]]] = []
    go, reset = asyncio.Event(), asyncio.Event()

    async def connect() -> Stream:
        reader, writer = await open_stream(Destination(host="127.0.0.1", port=state.port, tls=client_tls))
        streams.append((weakref.ref(reader), weakref.ref(writer)))
        return reader, writer

    async def handler(conn: Conn) -> None:
        if state.connections == 1:
            async for request in conn.requests():
                conn.ack(request)
                await conn.writer.drain()
                await go.wait()
                conn.reset()
                await conn.writer.wait_closed()  # the socket is closed (the RST sent) before this returns
                reset.set()
                return
        await acking(conn)

    with gc_off():
        async with scripted(handler, server_ctx) as state:
            acked: list[int] = []
            client = ForwardClient(connect, fast_config(), on_ack=collect(acked))
            client.start()
            chunks = make_chunks(2)
            client.submit(chunks[0])
            assert await client.drain(10), f"not drained: {client.stats}"  # connected, its socket read to the end
            first = streams[0][1]()
            assert first is not None
            raw = socket_transport(first)
            assert raw is not None
            raw.pause_reading()  # the loop no longer looks at the socket: the reset is found by the next write
            hangup = select.poll()
            hangup.register(raw.get_extra_info("socket").fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            del first, raw
            go.set()
            await asyncio.wait_for(reset.wait(), 5)
            assert hangup.poll(5000), "the receiver's reset did not come"
            client.submit(chunks[1])  # written at once (connected, nothing queued): the write fails
            assert await client.drain(10), f"not drained: {client.stats}"
            await client.close()
        assert sorted(acked) == [0, 1]
        assert client.stats.connects == 2, client.stats
        error = client.stats.last_error.lower()
        assert "reset" in error or "broken pipe" in error, client.stats.last_error
        reader, writer = streams[0]
        assert reader() is None, "the first connection's StreamReader is still alive (cyclic garbage)"
        assert writer() is None, "the first connection's StreamWriter is still alive (cyclic garbage)"


async def test_ack_deadline_follows_the_oldest_unacked_chunk() -> None:
    """The deadline timer is lazy (set once, checked when it fires): acks for later chunks keep coming, but the one
    chunk never acked still makes the client give up on the connection and send it again."""

    async def handler(conn: Conn) -> None:
        async for request in conn.requests():
            assert request.chunk is not None
            state.chunk_ids.append(request.chunk)
            if state.connections > 1 or request.chunk != first_id:
                conn.ack(request)

    chunks = make_chunks(6)
    first_id = chunks[0].chunk_id_bytes
    acked: list[int] = []
    async with scripted(handler) as state:
        client = ForwardClient(connector(state.port), fast_config(ack_timeout=0.5, window=8), on_ack=collect(acked))
        client.start()
        try:
            client.submit(chunks[0])
            for chunk in chunks[1:]:  # acked one by one while the first waits
                done = len(acked) + 1
                client.submit(chunk)
                while len(acked) < done:
                    await asyncio.sleep(0.01)
            assert await client.drain(10), f"not drained: {client.stats}"
        finally:
            await client.close()
    assert sorted(acked) == list(range(6))
    assert state.connections == 2
    assert state.chunk_ids.count(first_id) == 2  # sent again, on the second connection, and nothing else was


async def _hold_then(
    config: ClientConfig, action: Callable[[ForwardClient, list[Chunk]], Awaitable[None]]
) -> tuple[list[int], float, float]:
    """One chunk acked (connected), then a hold of 30 s from the step of the next write, then `action`. Returns the
    acked positions, the hold's end and the loop time when every chunk was acked."""
    async with scripted(acking) as server:
        acked: list[int] = []
        all_acked = asyncio.Event()
        chunks = make_chunks(3)

        def on_ack(chunk: Chunk, latency: float) -> None:
            collect(acked)(chunk, latency)
            if len(acked) == len(chunks):
                all_acked.set()

        destination = Destination(host="127.0.0.1", port=server.port)  # open_stream: hold_acks finds its socket
        client = ForwardClient(lambda: open_stream(destination), config, on_ack=on_ack)
        client.start()
        loop = asyncio.get_running_loop()
        try:
            client.submit(chunks[0])
            assert await client.drain(5)  # connected; the next submit writes at once
            until = loop.time() + 30
            client.submit(chunks[1])
            client.hold_acks(until)  # in the same step as the write: its ack cannot have been read yet
            await action(client, chunks)
            await asyncio.wait_for(all_acked.wait(), 10)
            return acked, until, loop.time()
        finally:
            await client.close()


async def test_held_acks_are_read_when_the_hold_ends() -> None:
    """hold_acks (steady rates: no wakeup per ack) pauses the socket itself, under any TLS layer: the ack of a chunk
    written during the hold is read when the hold ends (its deadline passed, or release_acks), not before."""
    async with scripted(acking) as server:
        acked: list[int] = []
        destination = Destination(host="127.0.0.1", port=server.port)
        client = ForwardClient(lambda: open_stream(destination), fast_config(), on_ack=collect(acked))
        client.start()
        first, second, third = make_chunks(3)
        loop = asyncio.get_running_loop()
        try:
            client.submit(first)
            assert await client.drain(5)
            until = loop.time() + 0.3
            client.submit(second)
            client.hold_acks(until)
            while len(acked) < 2:
                await asyncio.sleep(0.01)
            assert loop.time() >= until, "the ack was read during the hold"
            client.submit(third)  # and the socket is watched again
            assert await client.drain(5)
        finally:
            await client.close()
    assert acked == [0, 1, 2]
    assert client.stats.connects == 1


async def test_release_acks_ends_a_hold() -> None:
    async def release(client: ForwardClient, chunks: list[Chunk]) -> None:
        client.release_acks()
        client.submit(chunks[2])

    acked, until, done = await _hold_then(fast_config(), release)
    assert acked == [0, 1, 2]
    assert done < until


async def test_a_full_window_ends_a_hold() -> None:
    """The next chunk needs an ack to leave: the hold ends when the window fills (here with the third chunk)."""

    async def fill(client: ForwardClient, chunks: list[Chunk]) -> None:
        client.submit(chunks[2])

    acked, until, done = await _hold_then(fast_config(window=2), fill)
    assert acked == [0, 1, 2]
    assert done < until


async def test_drain_ends_a_hold() -> None:
    async def drain(client: ForwardClient, chunks: list[Chunk]) -> None:
        client.submit(chunks[2])
        assert await client.drain(5)

    acked, until, done = await _hold_then(fast_config(window=8), drain)
    assert acked == [0, 1, 2]
    assert done < until


@pytest.mark.parametrize("close", ["reset", "fin"])
async def test_acks_held_when_the_receiver_goes_are_not_lost(close: str) -> None:
    """The receiver acks, then resets (SO_LINGER 0) or closes the connection while the client holds its acks: they are
    read before anything more is written, so nothing acked is sent again (docs/architecture.md, "What a crash may
    duplicate"). Without the client's check, the next write fails and the connection ends with the acks unread."""
    reset = asyncio.Event()

    async def handler(conn: Conn) -> None:
        async for request in conn.requests():
            assert request.chunk is not None
            state.chunk_ids.append(request.chunk)
            conn.ack(request)
            if state.connections == 1 and len(state.chunk_ids) == 3:
                await conn.writer.drain()
                if close == "reset":
                    conn.reset()  # with the acks already sent
                else:
                    conn.writer.close()
                    await conn.writer.wait_closed()
                reset.set()
                return

    async with scripted(handler) as state:
        acked: list[int] = []
        destination = Destination(host="127.0.0.1", port=state.port)
        client = ForwardClient(lambda: open_stream(destination), fast_config(window=8), on_ack=collect(acked))
        client.start()
        chunks = make_chunks(4)
        try:
            client.submit(chunks[0])
            assert await client.drain(5)  # connected
            client.submit(chunks[1])
            client.hold_acks(asyncio.get_running_loop().time() + 30)
            client.submit(chunks[2])
            await asyncio.wait_for(reset.wait(), 5)
            client.submit(chunks[3])  # (a look at steady rates: a chunk while the acks are held)
            assert await client.drain(10), f"not drained: {client.stats}"
        finally:
            await client.close()
    assert sorted(acked) == [0, 1, 2, 3]
    assert state.chunk_ids[:3] == [c.chunk_id_bytes for c in chunks[:3]]
    assert state.chunk_ids[3:] == [chunks[3].chunk_id_bytes], "an acked chunk was sent again"
