"""Every size a peer controls is bounded: length prefixes, request size, decompressed size, entry count."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgpack
import pytest

from pyforward.protocol import (
    ClientDecoder,
    Entry,
    EventTime,
    Mode,
    ProtocolError,
    Request,
    ServerDecoder,
    encode_compressed_packed_forward,
    encode_forward,
    encode_packed_forward,
)

MiB = 1 << 20


def fed_until_error(decoder: ServerDecoder | ClientDecoder, wire: bytes, step: int) -> int:
    """Feed `wire` in `step`-byte pieces; return how many bytes had been fed when ProtocolError came (-1: never)."""
    for offset in range(0, len(wire), step):
        try:
            decoder.feed(wire[offset : offset + step])
        except ProtocolError:
            return min(offset + step, len(wire))
    return -1


@contextmanager
def allocation_peak() -> Iterator[Callable[[], int]]:
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HUGE_PREFIXES = {
    "bin32 entries": bytes.fromhex("93 a1 74 c6 ffffffff"),
    "str32 entries": bytes.fromhex("93 a1 74 db ffffffff"),
    "str32 tag": bytes.fromhex("93 db ffffffff"),
    "array32 entries": bytes.fromhex("93 a1 74 dd ffffffff"),
    "array32 request": bytes.fromhex("dd ffffffff"),
    "map32 record": bytes.fromhex("93 a1 74 01 df ffffffff"),
    "str32 inside a record": bytes.fromhex("93 a1 74 01 81 a3 6c6f67 db ffffffff"),
    "ext32 time": bytes.fromhex("93 a1 74 c9 ffffffff"),
    "bin32 top level": bytes.fromhex("c6 ffffffff"),
    "bin16 over a small limit": bytes.fromhex("93 a1 74 c5 ffff"),
}


@pytest.mark.parametrize("prefix", HUGE_PREFIXES.values(), ids=HUGE_PREFIXES.keys())
def test_huge_length_prefix_fails_at_the_header(prefix: bytes) -> None:
    decoder = ServerDecoder(max_request_bytes=60_000)
    with allocation_peak() as peak, pytest.raises(ProtocolError, match=r"60000|max_"):
        # Only the header bytes are sent: the error must not wait for (or buffer) the claimed payload.
        decoder.feed(prefix + b"\x00" * 16)
    assert peak() < 1 * MiB


@pytest.mark.parametrize("prefix", HUGE_PREFIXES.values(), ids=HUGE_PREFIXES.keys())
def test_huge_length_prefix_fails_when_fed_byte_by_byte(prefix: bytes) -> None:
    # The error comes as soon as the length field is complete.
    assert fed_until_error(ServerDecoder(max_request_bytes=60_000), prefix + b"\x00" * 16, 1) == len(prefix)


def test_default_limits_reject_4gb_prefix_without_allocating() -> None:
    with allocation_peak() as peak, pytest.raises(ProtocolError):
        ServerDecoder().feed(bytes.fromhex("93 a9 6b38732e6175646974 c6 ffffffff") + b"\x1f\x8b")
    assert peak() < 1 * MiB


def test_client_decoder_rejects_huge_prefix() -> None:
    with allocation_peak() as peak, pytest.raises(ProtocolError):
        ClientDecoder().feed(bytes.fromhex("81 a3 61636b db ffffffff") + b"x")
    assert peak() < 1 * MiB


def test_request_over_max_request_bytes() -> None:
    entries = b"".join(msgpack.packb([1, {"k": "v" * 100}]) for _ in range(40))
    wire = encode_packed_forward("t", entries)
    assert len(wire) > 4000
    with pytest.raises(ProtocolError, match="exceeds 4000"):
        ServerDecoder(max_request_bytes=4000).feed(wire)


def test_request_over_limit_fed_in_small_pieces_fails_before_the_end() -> None:
    wire = encode_forward("t", [(1, {"k": "v" * 100})] * 100)  # forward mode: no single huge length prefix
    assert len(wire) > 10_000
    assert 4000 < fed_until_error(ServerDecoder(max_request_bytes=4000), wire, 100) <= 4100


def test_request_exactly_at_limit_is_accepted_and_many_small_ones_in_one_feed() -> None:
    wire = encode_packed_forward("t", msgpack.packb([1, {}]) * 10)
    decoder = ServerDecoder(max_request_bytes=len(wire))
    assert len(decoder.feed(wire)) == 1
    # 100x the limit in one feed call: fine, because no single request is over it.
    assert len(decoder.feed(wire * 100)) == 100


def test_big_request_in_one_feed_under_default_limit() -> None:
    entries = msgpack.packb([1, {"log": "x" * 1000}]) * 5000  # ~5 MB, several feed slices
    requests = ServerDecoder().feed(encode_packed_forward("t", entries) * 2)
    assert [len(r.entries) for r in requests if isinstance(r, Request)] == [5000, 5000]


def test_gzip_bomb_is_bounded() -> None:
    # One entry whose record claims a huge string, then zeros: decompression, not entry parsing, must stop it.
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = bomb.compress(bytes.fromhex("92 01 81 a1 61 db 7fffffff")) + bomb.compress(bytes(16 * MiB)) + bomb.flush()
    assert len(blob) < 32 * 1024
    wire = encode_compressed_packed_forward("t", blob, {"chunk": "x"})
    decoder = ServerDecoder(max_decompressed_bytes=1 * MiB)
    with allocation_peak() as peak, pytest.raises(ProtocolError, match="gzip bomb"):
        decoder.feed(wire)
    assert peak() < 4 * MiB


def test_decompressed_exactly_at_limit_is_accepted() -> None:
    entries = msgpack.packb([1, {"a": "b"}]) * 100
    wire = encode_compressed_packed_forward("t", gzip.compress(entries))
    request = ServerDecoder(max_decompressed_bytes=len(entries)).feed(wire)[0]
    assert isinstance(request, Request)
    assert len(request.entries) == 100
    with pytest.raises(ProtocolError, match="inflate beyond"):
        ServerDecoder(max_decompressed_bytes=len(entries) - 1).feed(wire)


def test_uncompressed_entries_over_decompressed_bound() -> None:
    entries = msgpack.packb([1, {"a": "b"}]) * 100
    with pytest.raises(ProtocolError, match="exceed"):
        ServerDecoder(max_decompressed_bytes=len(entries) - 1).feed(encode_packed_forward("t", entries))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (gzip.compress(msgpack.packb([1, {}]))[:-6], "truncated"),
        (b"not gzip at all", "gzip error"),
        (gzip.compress(msgpack.packb([1, {}])) + b"trailing", "gzip error"),
    ],
    ids=["truncated", "garbage", "trailing-garbage"],
)
def test_bad_gzip(blob: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        ServerDecoder().feed(encode_compressed_packed_forward("t", blob))


def test_empty_gzip_blob_is_zero_entries() -> None:
    request = ServerDecoder().feed(encode_compressed_packed_forward("t", b""))[0]
    assert request == Request("t", Mode.COMPRESSED_PACKED_FORWARD, [], {"compressed": "gzip"}, None, 0)


def test_many_gzip_members() -> None:
    entry = msgpack.packb([EventTime(5, 6).to_ext(), {"n": 1}])
    blob = b"".join(gzip.compress(entry) for _ in range(500))
    request = ServerDecoder().feed(encode_compressed_packed_forward("t", blob))[0]
    assert isinstance(request, Request)
    assert request.entries == [Entry(EventTime(5, 6), {"n": 1})] * 500


def test_packed_entries_truncated_or_garbage() -> None:
    entry = msgpack.packb([1, {"a": "b"}])
    with pytest.raises(ProtocolError, match="middle of an entry"):
        ServerDecoder().feed(encode_packed_forward("t", entry + entry[:-1]))
    with pytest.raises(ProtocolError, match="malformed msgpack in packed entries"):
        ServerDecoder().feed(encode_packed_forward("t", entry + b"\xc1"))


def test_max_entries() -> None:
    forward = encode_forward("t", [(1, {})] * 11)
    packed = encode_packed_forward("t", msgpack.packb([1, {}]) * 11)
    compressed = encode_compressed_packed_forward("t", gzip.compress(msgpack.packb([1, {}]) * 11))
    for wire in (forward, packed, compressed):
        assert len(ServerDecoder(max_entries=11).feed(wire)[0].entries) == 11  # type: ignore[union-attr]
        with pytest.raises(ProtocolError):
            ServerDecoder(max_entries=10).feed(wire)


def test_client_decoder_message_over_max_buffer() -> None:
    ack = msgpack.packb({"ack": "x" * 5000})
    with pytest.raises(ProtocolError):
        ClientDecoder(max_buffer=1000).feed(ack)
    # The str16 header declares 5000 bytes: rejected with the first piece that completes it.
    assert fed_until_error(ClientDecoder(max_buffer=1000), ack, 10) == 10
    # Only small declarations, but 1.5 KB in total: rejected no later than just past the limit.
    many = b"\x9f" + (b"\xd9\x64" + b"x" * 100) * 15
    assert 900 < fed_until_error(ClientDecoder(max_buffer=1000), many, 10) <= 1010
