"""`pyforward receive` (receiver.py) over real sockets, real TLS and real files.

Most tests run the Receiver in-process and talk to it with a raw client built from pyforward.protocol's encoders, so
that every byte on the wire is under the test's control (bad peers included). The CLI tests run
`python -m pyforward receive` as a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from pyforward.certs import TLSFiles, TLSMaterial
from pyforward.protocol import (
    Ack,
    ClientDecoder,
    EntryPacker,
    EventTime,
    Helo,
    Pong,
    encode_compressed_packed_forward,
    encode_forward,
    encode_message,
    encode_packed_forward,
    encode_ping,
    gzip_compress,
    make_ping,
    new_chunk_id,
    verify_pong,
)
from pyforward.receiver import Receiver, ReceiverConfig
from tests.conftest import CertFiles

TAG = "kube.audit"
T0 = EventTime(1_700_000_000, 123_456_789)
DEADLINE = 10.0


# ------------------------------------------------------------------------------------------------ helpers


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def packed(entries: list[tuple[EventTime | int, dict[str, Any]]]) -> bytes:
    packer = EntryPacker()
    return b"".join(packer.pack_entry(t, r) for t, r in entries)


def records(n: int, start: int = 0) -> list[tuple[EventTime | int, dict[str, Any]]]:
    return [
        (EventTime(T0.seconds + i, i), {"seq": i, "verb": "get", "msg": f"record {i}"}) for i in range(start, start + n)
    ]


class RawClient:
    """A Forward client with nothing hidden: bytes out, decoded HELO/PONG/acks in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = ClientDecoder()
        self.messages: deque[Helo | Pong | Ack] = deque()

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None),
            DEADLINE,
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next(self, timeout: float = DEADLINE) -> Helo | Pong | Ack | None:
        """The next message from the receiver; None when it closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no message from the receiver in time")
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except (ConnectionError, ssl.SSLError):
                return None
            if not data:
                return None
            self.messages.extend(self.decoder.feed(data))
        return self.messages.popleft()

    async def ack(self) -> bytes:
        message = await self.next()
        assert isinstance(message, Ack), f"expected an ack, got {message!r}"
        return message.chunk_id

    async def closed(self, timeout: float = DEADLINE) -> list[Helo | Pong | Ack]:
        """Read until the receiver closes the connection; returns what it sent before."""
        seen = []
        while (message := await self.next(timeout)) is not None:
            seen.append(message)
        return seen

    async def handshake(
        self, shared_key: str, *, hostname: str = "test-client", username: str = "", password: str = ""
    ) -> Pong:
        helo = await self.next()
        assert isinstance(helo, Helo), f"expected HELO, got {helo!r}"
        ping = make_ping(helo, hostname=hostname, shared_key=shared_key, username=username, password=password)
        await self.send(encode_ping(ping))
        pong = await self.next()
        assert isinstance(pong, Pong), f"expected PONG, got {pong!r}"
        if pong.auth_ok:
            verify_pong(pong, salt=ping.salt, nonce=helo.nonce, shared_key=shared_key, own_hostname=hostname)
        return pong

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Receiver, int, Path]]:
    output = overrides.pop("output", tmp_path / "received.jsonl")
    config = ReceiverConfig(host="127.0.0.1", port=0, output=output, self_hostname="test-receiver", **overrides)
    receiver = Receiver(config)
    port = await receiver.start()
    try:
        yield receiver, port, output
    finally:
        await asyncio.wait_for(receiver.close(), DEADLINE)


@contextlib.asynccontextmanager
async def client(port: int, tls: ssl.SSLContext | None = None) -> AsyncIterator[RawClient]:
    c = await RawClient.connect(port, tls)
    try:
        yield c
    finally:
        await c.close()


def client_tls(certs: CertFiles, *, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if with_cert:
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return ctx


def server_tls(certs: CertFiles, *, mtls: bool) -> TLSMaterial:
    return TLSMaterial(
        TLSFiles(ca_file=certs.ca if mtls else None, cert_file=certs.server_cert, key_file=certs.server_key),
        purpose="server",
        require_client_cert=mtls,
        name="receiver",
    )


def expected(entries: list[tuple[EventTime | int, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [record for _, record in entries]


# ------------------------------------------------------------------------------------------------ modes


def _request(mode: str, entries: list[tuple[EventTime | int, dict[str, Any]]], chunk: str) -> bytes:
    options = {"chunk": chunk, "size": len(entries)}
    if mode == "forward":
        return encode_forward(TAG, entries, options)
    if mode == "packed-bin":
        return encode_packed_forward(TAG, packed(entries), options)
    if mode == "packed-str":
        # fluentd's out_forward: the entries as a msgpack str32, and compressed: "text".
        blob = packed(entries)
        head: bytes = b"\x93" + msgpack.packb(TAG) + b"\xdb" + len(blob).to_bytes(4, "big")
        options_packed: bytes = msgpack.packb({**options, "compressed": "text"})
        return head + blob + options_packed
    if mode == "compressed":
        return encode_compressed_packed_forward(TAG, gzip_compress(packed(entries)), options)
    if mode == "compressed-members":
        # Several gzip members back to back (fluentd's compressed buffer chunks).
        half = len(entries) // 2
        blob = gzip_compress(packed(entries[:half])) + gzip_compress(packed(entries[half:]))
        return encode_compressed_packed_forward(TAG, blob, options)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["forward", "packed-bin", "packed-str", "compressed", "compressed-members"])
async def test_every_mode_is_written_then_acked(tmp_path: Path, mode: str) -> None:
    entries = records(50)
    chunk = new_chunk_id()
    async with running(tmp_path) as (receiver, port, output), client(port) as c:
        await c.send(_request(mode, entries, chunk))
        assert await c.ack() == chunk.encode()
        # The ack promises the events are written and flushed: the file has them at this very moment.
        assert read_lines(output) == expected(entries)
        assert receiver.stats.records == 50
        assert receiver.stats.requests == 1
        assert receiver.stats.acks == 1


async def test_message_mode_each_request_acked(tmp_path: Path) -> None:
    entries = records(5)
    chunks = [new_chunk_id() for _ in entries]
    async with running(tmp_path) as (receiver, port, output), client(port) as c:
        # Pipelined in one write: acks come back in order, each after its record is written.
        await c.send(
            b"".join(encode_message(TAG, t, r, {"chunk": ch}) for (t, r), ch in zip(entries, chunks, strict=True))
        )
        assert [await c.ack() for _ in chunks] == [ch.encode() for ch in chunks]
        assert read_lines(output) == expected(entries)
        assert receiver.stats.requests == 5


async def test_no_chunk_no_ack(tmp_path: Path) -> None:
    entries = records(3)
    async with running(tmp_path) as (receiver, port, output), client(port) as c:
        await c.send(encode_forward(TAG, entries[:2]))  # no options: no ack wanted
        chunk = new_chunk_id()
        await c.send(encode_forward(TAG, entries[2:], {"chunk": chunk}))
        # The first message the receiver sends is the ack of the second request.
        assert await c.ack() == chunk.encode()
        assert read_lines(output) == expected(entries)
        assert receiver.stats.acks == 1
        assert not c.messages


async def test_chunk_id_echoed_byte_for_byte(tmp_path: Path) -> None:
    # fluentd's ids end in "\n" (Ruby base64); fluent-bit <= 5.0.8 sends 32 hex chars; treat them as opaque.
    ids = ["aGVsbG8gd29ybGQhIQ==\n", "0123456789abcdef0123456789abcdef", "ünïcødé-id"]
    async with running(tmp_path) as (_, port, _output), client(port) as c:
        for i, chunk in enumerate(ids):
            await c.send(encode_forward(TAG, records(1, i), {"chunk": chunk}))
            assert await c.ack() == chunk.encode("utf-8")


async def test_full_format_keeps_tag_nanoseconds_and_unicode(tmp_path: Path) -> None:
    entries: list[tuple[EventTime | int, dict[str, Any]]] = [
        (EventTime(1_700_000_000, 1), {"msg": "nanosecond one", "user": "zoë ✓ 日本 🚀"}),
        (1_700_000_001, {"msg": "integer seconds"}),
    ]
    # spec v1.5: [EventTime, {metadata}] as the time (fluent-bit >= 5.0.5), and EventTime as ext8 (c7 08 00).
    v15 = b"\x92\x92\xd7\x00" + (1_700_000_002).to_bytes(4, "big") + (999_999_999).to_bytes(4, "big")
    v15 += b"\x81\xa1k\xa1v" + msgpack.packb({"msg": "v1.5 metadata"})
    ext8 = b"\x92\xc7\x08\x00" + (1_700_000_003).to_bytes(4, "big") + (42).to_bytes(4, "big")
    ext8 += msgpack.packb({"msg": "ext8"})
    chunk = new_chunk_id()
    async with running(tmp_path, output_format="full") as (_, port, output), client(port) as c:
        await c.send(encode_packed_forward("tag.ünï", packed(entries) + v15 + ext8, {"chunk": chunk}))
        assert await c.ack() == chunk.encode()
    assert read_lines(output) == [
        {"tag": "tag.ünï", "time": "2023-11-14T22:13:20.000000001Z", "record": entries[0][1]},
        {"tag": "tag.ünï", "time": "2023-11-14T22:13:21.000000000Z", "record": entries[1][1]},
        {"tag": "tag.ünï", "time": "2023-11-14T22:13:22.999999999Z", "record": {"msg": "v1.5 metadata"}},
        {"tag": "tag.ünï", "time": "2023-11-14T22:13:23.000000042Z", "record": {"msg": "ext8"}},
    ]


async def test_invalid_utf8_from_a_peer_is_repaired_not_fatal(tmp_path: Path) -> None:
    # A msgpack str with invalid UTF-8 (as fluent-bit may pass through): the line is still valid JSON.
    record = b"\x82\xa3msg\xa4ok\xe9!\xa4good\xa3yes"
    entry = b"\x92\xd7\x00" + T0.pack()[2:] + record
    chunk = new_chunk_id()
    async with running(tmp_path) as (_, port, output), client(port) as c:
        await c.send(encode_packed_forward(TAG, entry, {"chunk": chunk}))
        assert await c.ack() == chunk.encode()
    assert read_lines(output) == [{"msg": "ok\ufffd!", "good": "yes"}]


# ------------------------------------------------------------------------------------------------ dedup


async def test_retried_chunk_is_acked_again_but_written_once(tmp_path: Path) -> None:
    entries = records(10)
    chunk = new_chunk_id()
    request = encode_compressed_packed_forward(TAG, gzip_compress(packed(entries)), {"chunk": chunk})
    async with running(tmp_path) as (receiver, port, output):
        async with client(port) as c:
            await c.send(request)
            assert await c.ack() == chunk.encode()
        # The retry comes on a new connection (the client lost the ack and reconnected).
        async with client(port) as c:
            await c.send(request)
            assert await c.ack() == chunk.encode()
        assert read_lines(output) == expected(entries)
        assert receiver.stats.duplicate_chunks == 1
        assert receiver.stats.acks == 2
        assert receiver.stats.records == 10


async def test_duplicate_while_first_write_in_flight(tmp_path: Path) -> None:
    # Both copies arrive in one read: the second is seen while the first is still being written.
    entries = records(4)
    chunk = new_chunk_id()
    request = encode_forward(TAG, entries, {"chunk": chunk})
    async with running(tmp_path) as (receiver, port, output), client(port) as c:
        await c.send(request + request)
        assert [await c.ack(), await c.ack()] == [chunk.encode()] * 2
        assert read_lines(output) == expected(entries)
        assert receiver.stats.duplicate_chunks == 1


async def test_dedup_memory_is_bounded_lru(tmp_path: Path) -> None:
    async with running(tmp_path, dedup_ids=2) as (receiver, port, output), client(port) as c:
        ids = ["a", "b", "c"]
        for i, chunk in enumerate(ids):
            await c.send(encode_forward(TAG, records(1, i), {"chunk": chunk}))
            assert await c.ack() == chunk.encode()
        # "a" was evicted (limit 2): it is written again. "c" is still remembered.
        await c.send(encode_forward(TAG, records(1, 0), {"chunk": "a"}))
        await c.send(encode_forward(TAG, records(1, 2), {"chunk": "c"}))
        assert [await c.ack(), await c.ack()] == [b"a", b"c"]
        assert [r["seq"] for r in read_lines(output)] == [0, 1, 2, 0]
        assert receiver.stats.duplicate_chunks == 1


async def test_dedup_disabled(tmp_path: Path) -> None:
    request = encode_forward(TAG, records(1), {"chunk": "same"})
    async with running(tmp_path, dedup_ids=0) as (receiver, port, output), client(port) as c:
        await c.send(request + request)
        assert [await c.ack(), await c.ack()] == [b"same", b"same"]
        assert len(read_lines(output)) == 2
        assert receiver.stats.duplicate_chunks == 0


# ------------------------------------------------------------------------------------------------ bad peers


async def test_not_array_is_skipped_and_connection_kept(tmp_path: Path) -> None:
    chunk = new_chunk_id()
    async with running(tmp_path) as (receiver, port, output), client(port) as c:
        # A map, an int, a nil health check, then a good request on the same connection.
        await c.send(msgpack.packb({"hello": "world"}) + msgpack.packb(7) + b"\xc0")
        await c.send(encode_forward(TAG, records(2), {"chunk": chunk}))
        assert await c.ack() == chunk.encode()
        assert len(read_lines(output)) == 2
        assert receiver.stats.bad_requests == 2


async def test_bad_entries_are_skipped_rest_acked(tmp_path: Path) -> None:
    good = records(2)
    bad = msgpack.packb([1.5, {"float": "time is invalid"}]) + msgpack.packb([T0.seconds, "not a map"])
    chunk = new_chunk_id()
    async with running(tmp_path) as (receiver, port, output), client(port) as c:
        await c.send(encode_packed_forward(TAG, packed(good[:1]) + bad + packed(good[1:]), {"chunk": chunk}))
        assert await c.ack() == chunk.encode()
        assert read_lines(output) == expected(good)
        assert receiver.stats.skipped_entries == 2


def _oversized(limit: int) -> bytes:
    return encode_forward(TAG, [(T0, {"blob": "x" * (limit + 10)})], {"chunk": "big"})


def _bomb() -> bytes:
    return encode_compressed_packed_forward(TAG, gzip_compress(b"\x00" * (2 << 20)), {"chunk": "bomb"})


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="invalid-msgpack"),
        pytest.param(encode_compressed_packed_forward(TAG, b"not gzip at all", {"chunk": "x"}), id="bad-gzip"),
        pytest.param(_oversized(64 << 10), id="over-max-request-bytes"),
        pytest.param(_bomb(), id="over-max-decompressed-bytes"),
        pytest.param(msgpack.packb([TAG, 1, 2, 3, 4, 5, 6]), id="array-of-wrong-size"),
    ],
)
async def test_protocol_error_closes_without_ack_and_receiver_goes_on(tmp_path: Path, payload: bytes) -> None:
    limits = {"max_request_bytes": 64 << 10, "max_decompressed_bytes": 1 << 20}
    async with running(tmp_path, **limits) as (receiver, port, output):
        async with client(port) as bystander, client(port) as bad:
            await bad.send(payload)
            assert await bad.closed() == []
            # Another connection, open all along, is unaffected; so is a new one.
            await bystander.send(encode_forward(TAG, records(1), {"chunk": "ok1"}))
            assert await bystander.ack() == b"ok1"
        async with client(port) as c:
            await c.send(encode_forward(TAG, records(1, 1), {"chunk": "ok2"}))
            assert await c.ack() == b"ok2"
        assert [r["seq"] for r in read_lines(output)] == [0, 1]
        assert receiver.stats.bad_requests == 1


async def test_idle_connection_is_closed(tmp_path: Path) -> None:
    async with running(tmp_path, idle_timeout=0.3) as (receiver, port, _), client(port) as c:
        started = time.monotonic()
        await c.send(b"\x93")  # slowloris: a request that never completes
        assert await c.closed(timeout=5) == []
        assert time.monotonic() - started >= 0.25
        await wait_until(lambda: receiver.stats.active_connections == 0, what="connection cleanup")


async def test_connection_cap(tmp_path: Path) -> None:
    async with running(tmp_path, max_connections=1) as (receiver, port, _), client(port) as first:
        await wait_until(lambda: receiver.stats.active_connections == 1, what="first connection")
        async with client(port) as second:
            assert await second.closed() == []
        assert receiver.stats.rejected_connections == 1
        # The first connection still works.
        await first.send(encode_forward(TAG, records(1), {"chunk": "c"}))
        assert await first.ack() == b"c"


async def test_write_error_means_no_ack(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to make writes fail")
    async with running(tmp_path, output=Path("/dev/full")) as (receiver, port, _):
        async with client(port) as c:
            await c.send(encode_forward(TAG, records(100), {"chunk": "never-acked"}))
            assert await c.closed() == []
        assert receiver.stats.write_errors >= 1
        assert receiver.stats.acks == 0
        # The receiver itself is still up: the next connection is accepted (and refused an ack again).
        async with client(port) as c:
            await c.send(encode_forward(TAG, records(1), {"chunk": "again"}))
            assert await c.closed() == []
        assert receiver.stats.acks == 0


async def test_failed_write_half_way_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from pyforward.receiver import output as receiver_module

    real_write = receiver_module._os_write
    calls = 0

    def disk_fills_up(fd: int, data: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, data[: len(data) // 2])  # half of the batch reaches the file...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    async with running(tmp_path) as (receiver, port, output):
        async with client(port) as c:
            await c.send(encode_forward(TAG, records(5), {"chunk": "before"}))
            assert await c.ack() == b"before"
            monkeypatch.setattr(receiver_module, "_os_write", disk_fills_up)
            await c.send(encode_forward(TAG, records(50, 5), {"chunk": "fails"}))
            assert await c.closed() == []
        assert calls == 2
        assert [r["seq"] for r in read_lines(output)] == list(range(5))  # cut back: no half line
        monkeypatch.setattr(receiver_module, "_os_write", real_write)
        async with client(port) as c:  # the client's retry
            await c.send(encode_forward(TAG, records(50, 5), {"chunk": "fails"}))
            assert await c.ack() == b"fails"
        assert [r["seq"] for r in read_lines(output)] == list(range(55))
        assert receiver.stats.write_errors == 1


async def test_many_concurrent_connections_lines_intact(tmp_path: Path) -> None:
    conns, requests_each, per_request = 20, 10, 25

    async def one(n: int, port: int) -> None:
        async with client(port) as c:
            for r in range(requests_each):
                base = (n * requests_each + r) * per_request
                await c.send(encode_forward(TAG, records(per_request, base), {"chunk": f"{n}-{r}"}))
                assert await c.ack() == f"{n}-{r}".encode()

    async with running(tmp_path) as (receiver, port, output):
        await asyncio.gather(*(one(n, port) for n in range(conns)))
        seqs = sorted(r["seq"] for r in read_lines(output))
        assert seqs == list(range(conns * requests_each * per_request))
        assert receiver.stats.connections == conns


async def test_close_lets_a_request_being_written_finish_and_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from pyforward.receiver import output as receiver_module

    started, release = threading.Event(), threading.Event()
    original = receiver_module._Writer._write_output

    def slow_write(self: Any, data: bytes) -> None:
        started.set()
        assert release.wait(DEADLINE)
        original(self, data)

    monkeypatch.setattr(receiver_module._Writer, "_write_output", slow_write)
    async with running(tmp_path) as (receiver, port, output), client(port) as busy, client(port) as idle:
        await busy.send(encode_forward(TAG, records(3), {"chunk": "in-flight"}))
        assert await asyncio.to_thread(started.wait, DEADLINE)
        closing = asyncio.create_task(receiver.close())
        # The idle connection is closed at once; the busy one waits for its write.
        assert await idle.closed() == []
        assert not closing.done()
        release.set()
        assert await busy.ack() == b"in-flight"
        assert await busy.closed() == []
        await asyncio.wait_for(closing, DEADLINE)
        assert len(read_lines(output)) == 3


async def test_close_with_idle_connections_is_quick(tmp_path: Path) -> None:
    async with running(tmp_path) as (receiver, port, _), client(port) as c:
        await wait_until(lambda: receiver.stats.active_connections == 1, what="the connection")
        started = time.monotonic()
        await receiver.close()
        assert time.monotonic() - started < 1.0
        assert await c.closed() == []


async def test_repeated_errors_are_rate_limited_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="pyforward.receiver")
    async with running(tmp_path) as (receiver, port, _):
        for _ in range(12):
            async with client(port) as c:
                await c.send(b"\xc1")
                assert await c.closed() == []
        assert receiver.stats.bad_requests == 12
    lines = [r for r in caplog.records if "closing connection from" in r.getMessage()]
    assert 1 <= len(lines) <= 5


# ------------------------------------------------------------------------------------------------ handshake


async def test_shared_key_handshake_then_data(tmp_path: Path) -> None:
    async with running(tmp_path, shared_key="s3cret") as (receiver, port, output), client(port) as c:
        pong = await c.handshake("s3cret")
        assert pong.auth_ok
        assert pong.hostname == b"test-receiver"
        await c.send(encode_forward(TAG, records(2), {"chunk": "k"}))
        assert await c.ack() == b"k"
        assert len(read_lines(output)) == 2
        assert receiver.stats.auth_failures == 0


async def test_wrong_shared_key_gets_pong_false_and_close(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path, shared_key="s3cret") as (receiver, port, output), client(port) as c:
        pong = await c.handshake("wrong-key")
        assert not pong.auth_ok
        assert "shared_key mismatch" in pong.reason
        assert await c.closed() == []
        assert receiver.stats.auth_failures == 1
    assert not read_lines(output)
    assert "s3cret" not in caplog.text
    assert "wrong-key" not in caplog.text


async def test_data_before_handshake_is_rejected(tmp_path: Path) -> None:
    async with running(tmp_path, shared_key="s3cret") as (receiver, port, output), client(port) as c:
        helo = await c.next()
        assert isinstance(helo, Helo)
        await c.send(encode_forward(TAG, records(1), {"chunk": "sneaky"}))
        assert await c.closed() == []
        assert receiver.stats.auth_failures == 1
    assert not read_lines(output)


async def test_client_claiming_our_hostname_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path, shared_key="k") as (_, port, _output), client(port) as c:
        pong = await c.handshake("k", hostname="test-receiver")
        assert not pong.auth_ok
        assert "hostname" in pong.reason


@pytest.mark.parametrize(
    ("username", "password", "ok"),
    [("alice", "wonderland", True), ("alice", "wrong", False), ("mallory", "wonderland", False), ("", "", False)],
)
async def test_user_auth(tmp_path: Path, username: str, password: str, ok: bool) -> None:
    users = {"alice": "wonderland", "bob": "builder"}
    async with running(tmp_path, shared_key="k", users=users) as (receiver, port, output), client(port) as c:
        pong = await c.handshake("k", username=username, password=password)
        assert pong.auth_ok is ok
        if ok:
            await c.send(encode_forward(TAG, records(1), {"chunk": "u"}))
            assert await c.ack() == b"u"
            assert len(read_lines(output)) == 1
        else:
            assert pong.reason == "username/password mismatch"
            assert await c.closed() == []
            assert receiver.stats.auth_failures == 1


async def test_handshake_timeout(tmp_path: Path) -> None:
    async with running(tmp_path, shared_key="k", handshake_timeout=0.3) as (receiver, port, _), client(port) as c:
        assert isinstance(await c.next(), Helo)
        assert await c.closed(timeout=5) == []  # never sent a PING
        assert receiver.stats.requests == 0


# ------------------------------------------------------------------------------------------------ TLS


async def test_tls(tmp_path: Path, certs: CertFiles) -> None:
    async with running(tmp_path, tls=server_tls(certs, mtls=False)) as (receiver, port, output):
        assert receiver.mode == "tls"
        async with client(port, client_tls(certs, with_cert=False)) as c:
            await c.send(encode_forward(TAG, records(3), {"chunk": "t"}))
            assert await c.ack() == b"t"
        assert len(read_lines(output)) == 3
        # A plaintext client gets nothing and is dropped; the receiver goes on.
        async with client(port) as plain:
            await plain.send(encode_forward(TAG, records(1), {"chunk": "p"}))
            assert await plain.closed() == []
        assert len(read_lines(output)) == 3


async def test_mtls_requires_a_client_certificate(tmp_path: Path, certs: CertFiles) -> None:
    material = server_tls(certs, mtls=True)
    async with running(tmp_path, tls=material, shared_key="k") as (receiver, port, output):
        assert receiver.mode == "mtls"
        async with client(port, client_tls(certs, with_cert=True)) as c:
            assert (await c.handshake("k")).auth_ok
            await c.send(encode_forward(TAG, records(2), {"chunk": "m"}))
            assert await c.ack() == b"m"
        # TLS 1.3: the client's side of the handshake completes before the server checks the certificate, so
        # the refusal shows on the first read (or as a failed connect).
        try:
            no_cert = await RawClient.connect(port, client_tls(certs, with_cert=False))
        except (ssl.SSLError, ConnectionError):
            pass
        else:
            try:
                assert await no_cert.closed() == []
            finally:
                await no_cert.close()
        assert len(read_lines(output)) == 2


async def test_tls_with_wrong_ca_on_client_side(tmp_path: Path, certs: CertFiles) -> None:
    from tests.conftest import write_certs

    other = write_certs(tmp_path / "other", name="other")
    async with running(tmp_path, tls=server_tls(certs, mtls=False)) as (_receiver, port, _):
        with pytest.raises(ssl.SSLCertVerificationError):
            await RawClient.connect(port, client_tls(other, with_cert=False))
        # The failed handshake is logged and counted as a connection; the receiver keeps serving.
        async with client(port, client_tls(certs, with_cert=False)) as c:
            await c.send(encode_forward(TAG, records(1), {"chunk": "after"}))
            assert await c.ack() == b"after"


# ------------------------------------------------------------------------------------------------ uvloop

# uvloop (the `fast` extra) starts reading a socket before the protocol can pause it, which broke a TLS
# start-up that works on asyncio's loop: the scenarios that touch sockets differently run on it too.
UVLOOP_CASES: dict[str, Callable[[Path, CertFiles], Awaitable[None]]] = {
    "modes": lambda tmp, certs: test_every_mode_is_written_then_acked(tmp, "compressed-members"),
    "message-mode": lambda tmp, certs: test_message_mode_each_request_acked(tmp),
    "dedup-in-flight": lambda tmp, certs: test_duplicate_while_first_write_in_flight(tmp),
    "protocol-error": lambda tmp, certs: test_protocol_error_closes_without_ack_and_receiver_goes_on(tmp, b"\xc1"),
    "idle": lambda tmp, certs: test_idle_connection_is_closed(tmp),
    "connection-cap": lambda tmp, certs: test_connection_cap(tmp),
    "concurrency": lambda tmp, certs: test_many_concurrent_connections_lines_intact(tmp),
    "handshake": lambda tmp, certs: test_shared_key_handshake_then_data(tmp),
    "data-before-handshake": lambda tmp, certs: test_data_before_handshake_is_rejected(tmp),
    "tls": test_tls,
    "mtls": test_mtls_requires_a_client_certificate,
    "close": lambda tmp, certs: test_close_with_idle_connections_is_quick(tmp),
}


@pytest.mark.parametrize("case", sorted(UVLOOP_CASES))
def test_on_uvloop(case: str, tmp_path: Path, certs: CertFiles) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(UVLOOP_CASES[case](tmp_path, certs))


# ------------------------------------------------------------------------------------------------ CLI


def _receive_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyforward", "receive", *args]


class ReceiveProcess:
    """`pyforward receive` as a child process; the ready line is read from its stderr with a deadline."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen(
            _receive_cmd(*args), stdout=stdout, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
        )
        self.stderr_lines: list[str] = []

    def wait_ready(self, timeout: float = 30) -> tuple[int, str]:
        import selectors

        assert self.proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buffer = b""
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                continue
            chunk = os.read(self.proc.stderr.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode()
                self.stderr_lines.append(line)
                if line.startswith("pyforward receive: listening on "):
                    address, mode = line.removeprefix("pyforward receive: listening on ").split(" ")
                    return int(address.rsplit(":", 1)[1]), mode.strip("()")
        self.proc.kill()
        raise AssertionError(f"receiver not ready; stderr: {[*self.stderr_lines, buffer.decode()]}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, "\n".join(self.stderr_lines) + (err or b"").decode()


@pytest.fixture
def receive_process() -> Iterator[Callable[..., ReceiveProcess]]:
    started: list[ReceiveProcess] = []

    def start(*args: str, **kwargs: Any) -> ReceiveProcess:
        proc = ReceiveProcess(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def _send_sync(port: int, payload: bytes, *, expect_ack: bytes | None) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(payload)
        if expect_ack is not None:
            decoder = ClientDecoder()
            got: list[Any] = []
            while not got:
                data = s.recv(65536)
                assert data, "receiver closed without an ack"
                got = decoder.feed(data)
            assert got == [Ack(expect_ack)]


async def test_cli_ready_line_output_file_and_sigterm(
    tmp_path: Path, receive_process: Callable[..., ReceiveProcess]
) -> None:
    out = tmp_path / "out.jsonl"
    proc = receive_process("--bind", "127.0.0.1:0", "--output", str(out), "--format", "full")
    port, mode = proc.wait_ready()
    assert mode == "plain"
    await asyncio.to_thread(_send_sync, port, encode_forward(TAG, records(3), {"chunk": "cli"}), expect_ack=b"cli")
    assert [r["record"]["seq"] for r in read_lines(out)] == [0, 1, 2]
    code, err = proc.stop()
    assert code == 0, err


async def test_cli_stdout_and_shared_key_from_env(
    tmp_path: Path, receive_process: Callable[..., ReceiveProcess]
) -> None:
    proc = receive_process(
        "--bind", "127.0.0.1:0", env={"PYFORWARD_RECEIVER_SHARED_KEY": "from-env"}, stdout=subprocess.PIPE
    )
    port, _ = proc.wait_ready()
    async with client(port) as c:
        assert (await c.handshake("from-env")).auth_ok
        await c.send(encode_message(TAG, T0, {"msg": "to stdout ✓"}, {"chunk": "o"}))
        assert await c.ack() == b"o"
    assert proc.proc.stdout is not None
    line = await asyncio.to_thread(proc.proc.stdout.readline)
    assert orjson.loads(line) == {"msg": "to stdout ✓"}
    code, err = proc.stop()
    assert code == 0
    assert "from-env" not in err


async def test_cli_tls_modes(tmp_path: Path, certs: CertFiles, receive_process: Callable[..., ReceiveProcess]) -> None:
    tls_args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    proc = receive_process(
        "--bind", "127.0.0.1:0", *tls_args, "--tls-ca", str(certs.ca), "--output", str(tmp_path / "o.jsonl")
    )
    port, mode = proc.wait_ready()
    assert mode == "mtls"
    async with client(port, client_tls(certs, with_cert=True)) as c:
        await c.send(encode_forward(TAG, records(1), {"chunk": "mt"}))
        assert await c.ack() == b"mt"
    assert proc.stop()[0] == 0
    proc = receive_process("--bind", "127.0.0.1:0", *tls_args, "--output", str(tmp_path / "o.jsonl"))
    assert proc.wait_ready()[1] == "tls"
    assert proc.stop()[0] == 0


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--bind", "nonsense"], {}, "--bind"),
        (["--bind", "127.0.0.1:99999"], {}, "out of range"),
        (["--format", "xml"], {}, "--format"),
        (["--max-request-bytes", "lots"], {}, "byte size"),
        (["--tls-cert", "/nonexistent.crt"], {}, "--tls-key"),
        (["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"], {}, "/nonexistent"),
        (["--user", "alice:pw"], {}, "shared key"),
        (["--user", "alice"], {}, "NAME:PASSWORD"),
        (["--idle-timeout", "-1"], {}, "positive"),
        ([], {"PYFORWARD_RECEIVER_USERS": "broken"}, "PYFORWARD_RECEIVER_USERS"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(
    args: list[str],
    env: dict[str, str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In-process (a process per case would cost a second each); the real process is checked below.
    from pyforward.cli import main

    monkeypatch.delenv("PYFORWARD_RECEIVER_SHARED_KEY", raising=False)
    monkeypatch.delenv("PYFORWARD_RECEIVER_USERS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["receive", *args] if "--bind" in args else ["receive", "--bind", "127.0.0.1:0", *args]
    code: str | int | None
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert needle in lines[0]
    assert lines[0].startswith("pyforward receive: error: ")


def test_cli_output_and_address_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyforward.cli import main

    code: str | int | None
    try:
        code = main(["receive", "--bind", "127.0.0.1:0", "--output", str(tmp_path / "missing" / "out.jsonl")])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pyforward receive: error: cannot open output {tmp_path / 'missing' / 'out.jsonl'}: no such file or directory"
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["receive", "--bind", f"127.0.0.1:{port}", "--output", str(tmp_path / "o")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"pyforward receive: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in line


def test_cli_bad_value_real_process() -> None:
    result = subprocess.run(
        _receive_cmd("--bind", "127.0.0.1:0", "--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"),
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.decode().strip().splitlines() == [
        "pyforward receive: error: cannot read receiver tls certificate /nonexistent.crt: no such file or directory"
    ]


def test_cli_secrets_never_echoed_on_error() -> None:
    result = subprocess.run(
        _receive_cmd("--bind", "127.0.0.1:0", "--user", "alice-hunter2"), capture_output=True, timeout=60
    )
    assert result.returncode == 2
    assert b"hunter2" not in result.stderr


def test_cli_help_documents_every_option() -> None:
    import argparse

    from pyforward.receiver import configure_parser

    parser = argparse.ArgumentParser(prog="pyforward receive")
    configure_parser(parser)
    result = subprocess.run(_receive_cmd("--help"), capture_output=True, timeout=60, check=True)
    text = result.stdout.decode()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text, flag
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
