"""Encoders: exact bytes, checked against hand-written hex and an independent msgpack decode."""

from __future__ import annotations

import base64
import gzip
import struct
import time
import zlib
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import msgpack
import pytest

from pyforward.protocol import (
    Chunk,
    EntryPacker,
    EventTime,
    build_chunk,
    encode_ack,
    encode_compressed_packed_forward,
    encode_forward,
    encode_message,
    encode_packed_forward,
    gzip_compress,
    new_chunk_id,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def plain_unpack(data: bytes) -> Any:
    """An independent reading: raw msgpack, str as str, bin as bytes, ext untouched."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# ----------------------------------------------------------------------------------------------- EventTime


def test_event_time_pack_is_fixext8() -> None:
    t = EventTime(1_700_000_000, 123_456_789)
    assert t.pack() == h("d7 00 6553f100 075bcd15")
    assert t.pack() == b"\xd7\x00" + struct.pack(">II", 1_700_000_000, 123_456_789)
    assert t.to_ext() == msgpack.ExtType(0, h("6553f100 075bcd15"))
    assert msgpack.packb(t.to_ext()) == t.pack()
    assert EventTime(0).pack() == h("d700 00000000 00000000")
    assert EventTime(0xFFFFFFFF, 999_999_999).pack() == h("d700 ffffffff 3b9ac9ff")


def test_event_time_ns_conversions() -> None:
    t = EventTime.from_ns(1_700_000_000_123_456_789)
    assert t == EventTime(1_700_000_000, 123_456_789)
    assert t.to_ns() == 1_700_000_000_123_456_789
    assert EventTime.from_ns(5) == EventTime(0, 5)
    before = time.time_ns()
    now = EventTime.now()
    after = time.time_ns()
    assert before <= now.to_ns() <= after
    assert EventTime(1, 5) < EventTime(2, 0) < EventTime(2, 1)


@pytest.mark.parametrize(
    ("seconds", "nanoseconds", "error"),
    [
        (-1, 0, ValueError),
        (1 << 32, 0, ValueError),
        (0, 1_000_000_000, ValueError),
        (0, -1, ValueError),
        (1.5, 0, TypeError),
        (1, 0.5, TypeError),
    ],
)
def test_event_time_rejects_out_of_range(seconds: Any, nanoseconds: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        EventTime(seconds, nanoseconds)


def test_event_time_from_ns_out_of_range() -> None:
    with pytest.raises(ValueError):
        EventTime.from_ns(-1)
    with pytest.raises(ValueError):
        EventTime.from_ns((1 << 32) * 1_000_000_000)


# --------------------------------------------------------------------------------------------- EntryPacker


def test_pack_entry_event_time_exact_bytes() -> None:
    packer = EntryPacker()
    t = EventTime(1_700_000_000, 123_456_789)
    assert packer.pack_entry(t, {"a": 1}) == h("92 d700 6553f100 075bcd15 81 a161 01")
    # The packer is reused: a second call is independent of the first.
    assert packer.pack_entry(t, {}) == h("92 d700 6553f100 075bcd15 80")


@pytest.mark.parametrize(
    ("seconds", "hex_time"),
    [(0, "00"), (127, "7f"), (128, "cc80"), (300, "cd012c"), (1_700_000_000, "ce6553f100"), (0xFFFFFFFF, "ceffffffff")],
)
def test_pack_entry_int_time_minimal(seconds: int, hex_time: str) -> None:
    packed = EntryPacker().pack_entry(seconds, {})
    assert packed == h(f"92 {hex_time} 80")
    assert packed == msgpack.packb([seconds, {}])


def test_pack_entry_record_types() -> None:
    packer = EntryPacker()
    expected = msgpack.packb([1, {"a": [1, 2.5, None, True, "é", b"\x00\xff", {"n": {}}]}])
    record: dict[str, Any] = {"a": [1, 2.5, None, True, "é", b"\x00\xff", {"n": {}}]}
    assert packer.pack_entry(1, record) == expected
    assert packer.pack_entry(1, MappingProxyType(record)) == expected
    assert packer.pack_entry(1, OrderedDict(record)) == expected
    # Nested mappings and tuples, and an EventTime inside a record (ext 0).
    nested = {"a": (1, MappingProxyType({"b": EventTime(1, 2)}))}
    assert plain_unpack(packer.pack_entry(1, nested)) == [1, {"a": [1, {"b": EventTime(1, 2).to_ext()}]}]


def test_pack_entry_surrogate_escaped_strings_become_raw_bytes() -> None:
    # Strings decoded from a peer with surrogateescape: re-encoding gives back the peer's exact bytes.
    packer = EntryPacker()
    assert packer.pack_entry(1, {"a": "x\udcff"}) == h("92 01 81 a161 a2 78ff")
    assert packer.pack_entry(1, {"a": "ok"}) == h("92 01 81 a161 a2 6f6b")  # back on the fast path


@pytest.mark.parametrize(
    ("entry_time", "record", "error"),
    [
        (1.5, {}, TypeError),
        (True, {}, TypeError),
        ("1", {}, TypeError),
        (-1, {}, ValueError),
        (1 << 32, {}, ValueError),
        (1, [("a", 1)], TypeError),
        (1, "record", TypeError),
        (1, {"a": object()}, TypeError),
        (1, {"a": "\ud800"}, ValueError),  # a lone surrogate that is not an escaped byte
    ],
)
def test_pack_entry_rejects(entry_time: Any, record: Any, error: type[Exception]) -> None:
    packer = EntryPacker()
    with pytest.raises(error):
        packer.pack_entry(entry_time, record)
    assert packer.pack_entry(1, {}) == h("92 01 80")  # still usable afterwards


# ---------------------------------------------------------------------------------------------- requests


def test_new_chunk_id() -> None:
    ids = {new_chunk_id() for _ in range(100)}
    assert len(ids) == 100
    for chunk_id in ids:
        assert len(chunk_id) == 24
        assert len(base64.b64decode(chunk_id, validate=True)) == 16


def test_encode_message() -> None:
    assert encode_message("t", 1, {"a": 1}) == h("93 a174 01 81 a161 01")
    assert encode_message("t", EventTime(1, 2), {}, {"chunk": "x"}) == h(
        "94 a174 d700 00000001 00000002 80 81 a56368756e6b a178"
    )
    assert encode_message("tag", 1, MappingProxyType({"a": 1})) == msgpack.packb(["tag", 1, {"a": 1}])


def test_encode_forward() -> None:
    wire = encode_forward("t", [(1, {"a": 1}), (EventTime(2, 3), {})])
    assert wire == h("92 a174 92 92 01 81 a161 01 92 d700 00000002 00000003 80")
    wire = encode_forward("t", [], {"size": 0})
    assert wire == h("93 a174 90 81 a473697a65 00")
    many = encode_forward("t", [(1, {})] * 16)
    assert many.startswith(h("92 a174 dc 0010"))


def test_encode_packed_forward() -> None:
    entries = h("92 01 80")
    assert encode_packed_forward("t", entries) == h("92 a174 c403 920180")
    assert encode_packed_forward("t", entries, {"chunk": "x"}) == h("93 a174 c403 920180 81 a56368756e6b a178")


@pytest.mark.parametrize(
    ("size", "header"),
    [(0, "c400"), (255, "c4ff"), (256, "c50100"), (65535, "c5ffff"), (65536, "c600010000")],
)
def test_packed_forward_bin_header_sizes(size: int, header: str) -> None:
    wire = encode_packed_forward("t", b"\x00" * size)
    assert wire[:3] == h("92 a174")
    assert wire[3 : 3 + len(header) // 2] == h(header)
    assert plain_unpack(wire) == ["t", b"\x00" * size]


def test_long_tag_headers() -> None:
    assert encode_packed_forward("x" * 31, b"")[:2] == h("92 bf")
    assert encode_packed_forward("x" * 32, b"")[:3] == h("92 d9 20")
    assert encode_packed_forward("é" * 200, b"")[:4] == h("92 da 0190")
    with pytest.raises(ValueError, match="empty"):
        encode_packed_forward("", b"")
    with pytest.raises(TypeError):
        encode_packed_forward(b"t", b"")  # type: ignore[arg-type]


def test_encode_compressed_packed_forward_adds_compressed_and_leaves_caller_options() -> None:
    options = {"size": 1, "chunk": "abc"}
    blob = gzip_compress(h("92 01 80"))
    wire = encode_compressed_packed_forward("t", blob, options)
    assert options == {"size": 1, "chunk": "abc"}
    tag, data, opts = plain_unpack(wire)
    assert (tag, data) == ("t", blob)
    assert list(opts.items()) == [("size", 1), ("chunk", "abc"), ("compressed", "gzip")]
    assert plain_unpack(encode_compressed_packed_forward("t", blob))[2] == {"compressed": "gzip"}


def test_gzip_compress_is_one_member() -> None:
    data = b"hello " * 1000
    blob = gzip_compress(data)
    assert blob[:3] == h("1f8b08")
    assert gzip.decompress(blob) == data
    decompressor = zlib.decompressobj(wbits=31)
    assert decompressor.decompress(blob) == data
    assert decompressor.eof
    assert decompressor.unused_data == b""
    assert len(gzip_compress(data, level=9)) <= len(blob)
    assert gzip.decompress(gzip_compress(b"")) == b""


# ----------------------------------------------------------------------------------------------- chunks


def test_build_chunk_uncompressed_exact_bytes() -> None:
    entries = h("92 01 80 92 02 80")
    chunk = build_chunk("t", entries, 2, size=123, compress=False, chunk_id="Q0hVTks=", position=("f", 9))
    assert chunk == Chunk("Q0hVTks=", chunk.payload, 2, 123, ("f", 9))
    assert chunk.payload == h("93 a174 c406 920180920280 82 a473697a65 02 a56368756e6b a8") + b"Q0hVTks="
    assert chunk.chunk_id_bytes == b"Q0hVTks="


def test_build_chunk_compressed() -> None:
    entries = b"".join(EntryPacker().pack_entry(EventTime(i, i), {"i": i}) for i in range(100))
    chunk = build_chunk("k8s.audit", entries, 100, size=5000, compress=True, level=6)
    assert len(chunk.chunk_id) == 24
    tag, blob, options = plain_unpack(chunk.payload)
    assert tag == "k8s.audit"
    assert isinstance(blob, bytes)
    assert gzip.decompress(blob) == entries
    # fluent-bit 5.1 sends the same options: size, chunk, compressed.
    assert list(options.items()) == [("size", 100), ("chunk", chunk.chunk_id), ("compressed", "gzip")]
    assert (chunk.records, chunk.size, chunk.position) == (100, 5000, None)


def test_build_chunk_ids_are_fresh() -> None:
    a = build_chunk("t", b"", 0, size=0, compress=False)
    b = build_chunk("t", b"", 0, size=0, compress=False)
    assert a.chunk_id != b.chunk_id


def test_encode_ack() -> None:
    assert encode_ack(b"abc\n") == h("81 a3 61636b a4 6162630a")
    assert encode_ack(b"\xff\x00") == h("81 a3 61636b a2 ff00")  # exact bytes, even invalid UTF-8
    assert encode_ack(b"x" * 40) == h("81 a3 61636b d9 28") + b"x" * 40
    assert encode_ack(b"") == h("81 a3 61636b a0")
