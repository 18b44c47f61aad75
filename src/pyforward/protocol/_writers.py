"""Encoding (client side, the hot path): entries, the carrier modes, gzip, chunks with their ``chunk`` option.

Part of the Forward protocol's sans-IO core (see the package's doc).
"""

from __future__ import annotations

import base64
import importlib
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack

from pyforward.protocol._types import _UINT32_MAX, EventTime, _pack_ii


def _pack_default(obj: object) -> object:
    """msgpack `default` hook: EventTime anywhere becomes ext 0; any Mapping packs as a map."""
    if isinstance(obj, EventTime):
        return obj.to_ext()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


#: A fresh Packer per call (thread-safe) whose buffer starts at 1 KiB and grows as needed: msgpack's default, 256 KiB,
#: is above glibc's mmap threshold (memory.py): an mmap, page faults and an munmap for the few bytes of every chunk's
#: options (issue 11).
_PACKB_OPTIONS: dict[str, Any] = {"use_bin_type": True, "default": _pack_default, "buf_size": 1024}


def _packb(obj: object) -> bytes:
    """Pack a small, non-hot-path value (options, one record)."""
    try:
        return msgpack.packb(obj, **_PACKB_OPTIONS)  # type: ignore[no-any-return]
    except UnicodeEncodeError:
        # Strings decoded from a peer with surrogateescape carry their original (invalid UTF-8) bytes.
        return msgpack.packb(obj, **_PACKB_OPTIONS, unicode_errors="surrogateescape")  # type: ignore[no-any-return]


def _str_header(n: int) -> bytes:
    if n < 32:
        return bytes((0xA0 | n,))
    if n < 0x100:
        return b"\xd9" + bytes((n,))
    if n < 0x10000:
        return b"\xda" + n.to_bytes(2, "big")
    if n <= _UINT32_MAX:
        return b"\xdb" + n.to_bytes(4, "big")
    raise ValueError(f"string of {n} bytes is too long for msgpack")


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + bytes((n,))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n <= _UINT32_MAX:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError(f"binary of {n} bytes is too long for msgpack")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    if n <= _UINT32_MAX:
        return b"\xdd" + n.to_bytes(4, "big")
    raise ValueError(f"array of {n} elements is too long for msgpack")


def _raw_str(data: bytes) -> bytes:
    """A msgpack *str* carrying exactly these bytes (valid UTF-8 or not)."""
    return _str_header(len(data)) + data


@lru_cache(maxsize=256)
def _packed_tag(tag: str) -> bytes:
    if not isinstance(tag, str):
        raise TypeError(f"tag must be str, not {type(tag).__name__}")
    if not tag:
        raise ValueError("tag must not be empty")
    return _raw_str(tag.encode("utf-8"))


def _packed_time(time: EventTime | int) -> bytes:
    if isinstance(time, EventTime):
        return time.pack()
    if isinstance(time, int) and not isinstance(time, bool):
        # Minimal msgpack encoding of a non-negative int (positive fixint, uint8, uint16, uint32).
        if 0 <= time < 0x80:
            return bytes((time,))
        if 0x80 <= time < 0x100:
            return b"\xcc" + bytes((time,))
        if 0x100 <= time < 0x10000:
            return b"\xcd" + time.to_bytes(2, "big")
        if 0x10000 <= time <= _UINT32_MAX:
            return b"\xce" + time.to_bytes(4, "big")
        raise ValueError(f"entry time {time} outside uint32 seconds")
    raise TypeError(f"entry time must be EventTime or int seconds, not {type(time).__name__}")


def _as_record(record: object) -> dict[Any, Any]:
    if isinstance(record, Mapping):
        return dict(record)
    raise TypeError(f"record must be a mapping, not {type(record).__name__}")


class EntryPacker:
    """Packs one ``[time, record]`` entry per call: the shipper's hot path.

    One `msgpack.Packer` is reused; the EventTime prefix is written by hand (``92 d7 00`` + 8 bytes) and the
    result is three concatenated bytes objects. Not thread-safe: use one instance per thread/task.
    """

    __slots__ = ("_pack", "_pack_lenient")

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True, default=_pack_default).pack
        # Only used when a record holds surrogate-escaped strings (raw peer bytes); it is slower.
        self._pack_lenient = msgpack.Packer(
            use_bin_type=True, default=_pack_default, unicode_errors="surrogateescape"
        ).pack

    @property
    def pack_record(self) -> Callable[[dict[str, Any]], bytes]:
        """The reused Packer's ``pack``: a record's msgpack bytes. Raises UnicodeEncodeError for a string with
        lone surrogates (``pack_entry`` retries those leniently)."""
        return self._pack  # type: ignore[no-any-return]

    def pack_entry(self, time: EventTime | int, record: Mapping[str, Any]) -> bytes:
        if type(record) is not dict:
            record = _as_record(record)
        try:
            body: bytes = self._pack(record)
        except UnicodeEncodeError:
            body = self._pack_lenient(record)
        if type(time) is EventTime:
            return b"\x92\xd7\x00" + _pack_ii(time.seconds, time.nanoseconds) + body
        return b"\x92" + _packed_time(time) + body


def new_chunk_id() -> str:
    """Spec: base64 of 128 random bits (24 characters, with padding)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def encode_message(
    tag: str, time: EventTime | int, record: Mapping[str, Any], options: Mapping[str, Any] | None = None
) -> bytes:
    """Message mode: ``[tag, time, record(, options)]``."""
    body = _packb(_as_record(record) if type(record) is not dict else record)
    if options is None:
        return b"".join((b"\x93", _packed_tag(tag), _packed_time(time), body))
    return b"".join((b"\x94", _packed_tag(tag), _packed_time(time), body, _packb(options)))


def encode_forward(
    tag: str,
    entries: Sequence[tuple[EventTime | int, Mapping[str, Any]]],
    options: Mapping[str, Any] | None = None,
) -> bytes:
    """Forward mode: ``[tag, [[time, record], ...](, options)]``."""
    packer = EntryPacker()
    parts = [b"\x92" if options is None else b"\x93", _packed_tag(tag), _array_header(len(entries))]
    parts.extend(packer.pack_entry(t, r) for t, r in entries)
    if options is not None:
        parts.append(_packb(options))
    return b"".join(parts)


def encode_packed_forward(tag: str, entries: bytes, options: Mapping[str, Any] | None = None) -> bytes:
    """PackedForward mode: ``[tag, entries as bin(, options)]``; `entries` are concatenated msgpack entries."""
    head = (b"\x92" if options is None else b"\x93") + _packed_tag(tag) + _bin_header(len(entries))
    if options is None:
        return b"".join((head, entries))
    return b"".join((head, entries, _packb(options)))


def encode_compressed_packed_forward(tag: str, gzipped: bytes, options: Mapping[str, Any] | None = None) -> bytes:
    """CompressedPackedForward: PackedForward whose bin is gzip data, with option ``compressed: "gzip"``."""
    opts = dict(options) if options else {}
    opts["compressed"] = "gzip"
    return encode_packed_forward(tag, gzipped, opts)


def _igzip() -> Any:
    """python-isal's igzip_lib (ISA-L), when installed (a dependency on x86_64 and aarch64); else None."""
    try:
        return importlib.import_module("isal.igzip_lib")
    except ImportError:
        return None


_IGZIP = _igzip()
#: Up to this many bytes, ISA-L compresses with its small hash tables (MEM_LEVEL_SMALL): the same output and speed on
#: chunks of this size, and a state small enough to come from the heap. Its default state is 280 KiB, above glibc's
#: mmap threshold (memory.py): an mmap, ~70 page faults and an munmap per chunk, at steady rates a good share of a
#: chunk's CPU (issue 11). Bigger chunks (a backlog, in the gzip thread) keep the default: a slightly better ratio.
_SMALL_GZIP_STATE_BYTES = 256 << 10


def gzip_compress(data: bytes, level: int = 1) -> bytes:
    """One gzip member (RFC 1952 framing). Level 1: the shipper is CPU-bound, not link-bound.

    At level 1, ISA-L when python-isal is installed: the same format, about a quarter of zlib -1's CPU on audit
    events and a slightly better ratio (bench/README.md). Like zlib, it releases the GIL while it compresses.
    """
    if level == 1 and _IGZIP is not None:
        memory = _IGZIP.MEM_LEVEL_SMALL if len(data) <= _SMALL_GZIP_STATE_BYTES else _IGZIP.MEM_LEVEL_DEFAULT
        return _IGZIP.compress(data, 1, _IGZIP.COMP_GZIP, memory)  # type: ignore[no-any-return]
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


@dataclass(slots=True)
class Chunk:
    """One acked request on the wire."""

    chunk_id: str  # the `chunk` option; the ack must echo it byte for byte
    payload: bytes  # the complete encoded request, ready to write
    records: int
    size: int  # source bytes (log lines) this chunk covers, for the in-flight byte bound
    position: object = None  # opaque: where the chunk ends in the log

    @property
    def chunk_id_bytes(self) -> bytes:
        """The exact bytes an `Ack.chunk_id` must equal."""
        return self.chunk_id.encode("utf-8")


def build_chunk(
    tag: str,
    entries: bytes,
    records: int,
    *,
    size: int,
    compress: bool,
    level: int = 1,
    chunk_id: str | None = None,
    position: object = None,
    extra: Mapping[str, Any] | None = None,
) -> Chunk:
    """PackedForward (or CompressedPackedForward) with options ``{"size", "chunk"[, extra...][, "compressed"]}``
    (`extra`: the ``pyforward.*`` record ranges, protocol/_ranges.py)."""
    cid = new_chunk_id() if chunk_id is None else chunk_id
    options: dict[str, Any] = {"size": records, "chunk": cid}
    if extra:
        options.update(extra)
    if compress:
        payload = encode_compressed_packed_forward(tag, gzip_compress(entries, level), options)
    else:
        payload = encode_packed_forward(tag, entries, options)
    return Chunk(chunk_id=cid, payload=payload, records=records, size=size, position=position)
