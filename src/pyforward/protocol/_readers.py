"""Decoding, streaming and bounded: `ClientDecoder` (receiver bytes -> Helo / Pong / Ack) and `ServerDecoder`
(client bytes -> Ping / Request / HealthCheck / NotArray).

Part of the Forward protocol's sans-IO core (see the package's doc).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from pyforward.protocol._handshake import Ack, Helo, Ping, Pong, _printable
from pyforward.protocol._types import _NS_PER_S, _UINT32_MAX, EventTime, Mode, ProtocolError, _unpack_ii


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A lone nil from a client (spec: heartbeat over TCP); ignore it."""


@dataclass(frozen=True, slots=True)
class NotArray:
    """A top-level value that is not an array: log it, no ack, keep the connection (fluentd's behaviour)."""

    value: object


@dataclass(frozen=True, slots=True)
class Entry:
    time: EventTime
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Request:
    tag: str
    mode: Mode
    entries: list[Entry]
    options: dict[str, Any]
    chunk: bytes | None  # raw bytes of the `chunk` option, to echo exactly; None: no ack wanted
    skipped: int  # bad entries dropped (the rest is still delivered and acked)


# Streams are fed to msgpack in slices of this size, draining complete values in between, so that the
# Unpacker's buffer only ever holds one partial value plus one slice.
_FEED_SLICE = 64 * 1024
# For a partial value, the first bytes are scanned for declared lengths that cannot fit in the limit
# (msgpack only checks str/bin/ext lengths once the whole payload has arrived).
_HEAD_SCAN = 1024
# Decompressed output is produced (and bounded) in pieces of this size.
_GZIP_PIECE = 64 * 1024

# Marker byte -> (length field size, extra payload bytes, bytes-per-child for containers).
_VAR_HEADERS: dict[int, tuple[int, int, int]] = {
    0xC4: (1, 0, 0), 0xC5: (2, 0, 0), 0xC6: (4, 0, 0),  # bin
    0xC7: (1, 1, 0), 0xC8: (2, 1, 0), 0xC9: (4, 1, 0),  # ext (type byte + data)
    0xD9: (1, 0, 0), 0xDA: (2, 0, 0), 0xDB: (4, 0, 0),  # str
    0xDC: (2, 0, 1), 0xDD: (4, 0, 1),  # array: every element takes at least one byte
    0xDE: (2, 0, 2), 0xDF: (4, 0, 2),  # map: every pair takes at least two bytes
}  # fmt: skip
# Marker byte -> total size of a fixed-size value (marker included).
_FIXED_SIZES: dict[int, int] = {
    0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,
}  # fmt: skip


def _scan_declared_lengths(head: bytearray, pos: int, limit: int, what: str) -> int:
    """Walk msgpack tokens of a partial value from `pos`; raise if a declared length cannot fit in `limit`.

    msgpack values are prefix-encoded depth-first, so a flat walk over tokens visits every header in order.
    Returns where to resume once more bytes arrive.
    """
    n = len(head)
    while pos < n:
        marker = head[pos]
        if marker < 0x80 or marker >= 0xE0:  # fixint
            pos += 1
        elif marker < 0x90:  # fixmap
            if pos + 1 + 2 * (marker & 0x0F) > limit:
                raise ProtocolError(f"{what} declares a map larger than the {limit}-byte limit")
            pos += 1
        elif marker < 0xA0:  # fixarray
            pos += 1
        elif marker < 0xC0:  # fixstr
            pos += 1 + (marker & 0x1F)
        elif marker in _FIXED_SIZES:
            pos += _FIXED_SIZES[marker]
        elif marker in _VAR_HEADERS:
            size_len, extra, per_child = _VAR_HEADERS[marker]
            if pos + 1 + size_len > n:
                break
            declared = int.from_bytes(head[pos + 1 : pos + 1 + size_len], "big")
            pos += 1 + size_len
            if per_child:
                if pos + per_child * declared > limit:
                    raise ProtocolError(f"{what} declares {declared} container elements, beyond the {limit}-byte limit")
            else:
                pos += extra + declared
                if pos > limit:
                    raise ProtocolError(
                        f"{what} declares a {declared}-byte string/binary, beyond the {limit}-byte limit"
                    )
        else:  # 0xC1, never valid: msgpack itself will reject it
            return _HEAD_SCAN
    return pos


class _Stream:
    """Bounded streaming msgpack framing shared by both decoders."""

    __slots__ = (
        "_boundary",
        "_failed",
        "_fed",
        "_head",
        "_head_start",
        "_limit",
        "_scan_pos",
        "_unpacker",
        "_what",
    )

    def __init__(self, limit: int, what: str, **unpacker_kwargs: Any) -> None:
        if limit <= 0:
            raise ValueError(f"{what} limit must be positive")
        self._limit = limit
        self._what = what
        # The slack of one slice keeps BufferFull for values genuinely over the limit. read_size: the buffer
        # starts at one slice and grows (doubling) only for a bigger value. msgpack's default starts it at
        # min(max_buffer_size, 1 MiB): 1 MiB per connection for the client's acks of a few dozen bytes, and that
        # buffer, once freed, raised glibc's dynamic mmap threshold so that later 1 MiB buffers were carved
        # from the heap instead: RSS that grew with every reconnect (issue 11 item 5, bench/README.md "soak").
        self._unpacker = msgpack.Unpacker(
            None,
            max_buffer_size=limit + _FEED_SLICE,
            read_size=_FEED_SLICE,
            raw=False,
            unicode_errors="surrogateescape",
            **unpacker_kwargs,
        )
        self._fed = 0
        # Stream offset where the last complete value ended. Unpacker.tell() cannot stand in for it after
        # OutOfData: it also counts the headers and scalars already parsed inside the incomplete value.
        self._boundary = 0
        self._head = bytearray()
        self._head_start = 0
        self._scan_pos = 0
        self._failed = False

    def _feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        if self._failed:
            raise ProtocolError("decoder already failed on earlier input; close the connection")
        values: list[object] = []
        try:
            with memoryview(data) as view:
                for offset in range(0, len(view), _FEED_SLICE):
                    self._feed_slice(view[offset : offset + _FEED_SLICE], values)
        except ProtocolError:
            self._failed = True
            raise
        return values

    def _feed_slice(self, piece: memoryview, values: list[object]) -> None:
        unpacker = self._unpacker
        try:
            unpacker.feed(piece)
        except msgpack.BufferFull:
            raise ProtocolError(f"{self._what} exceeds {self._limit} bytes") from None
        slice_start = self._fed
        self._fed += len(piece)
        start = self._boundary
        while True:
            try:
                value = unpacker.unpack()
            except msgpack.OutOfData:
                break
            except Exception as exc:  # any failure to parse peer bytes is the peer's fault
                raise ProtocolError(f"malformed msgpack from peer: {exc}") from exc
            end = unpacker.tell()
            if end - start > self._limit:
                raise ProtocolError(f"{self._what} of {end - start} bytes exceeds {self._limit} bytes")
            values.append(value)
            start = self._boundary = end
        self._check_partial(start, slice_start, piece)

    def _check_partial(self, start: int, slice_start: int, piece: memoryview) -> None:
        pending = self._fed - start
        if pending == 0:
            self._head.clear()
            self._head_start = start
            self._scan_pos = 0
            return
        if pending > self._limit:
            raise ProtocolError(f"{self._what} exceeds {self._limit} bytes")
        if start != self._head_start:  # a new partial value begins inside this slice
            offset = start - slice_start
            self._head = bytearray(piece[offset : offset + _HEAD_SCAN])
            self._head_start = start
            self._scan_pos = 0
        elif len(self._head) < _HEAD_SCAN:  # the same partial value continues
            self._head += piece[: _HEAD_SCAN - len(self._head)]
        else:
            return
        if self._scan_pos < _HEAD_SCAN:
            self._scan_pos = _scan_declared_lengths(self._head, self._scan_pos, self._limit, self._what)


def _as_raw(value: object, field: str) -> bytes:
    """Recover the exact bytes of a str (decoded with surrogateescape) or bin field."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes):
        return value
    raise ProtocolError(f"{field} must be a string or binary, got {type(value).__name__}")


def _as_text(value: object, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    raise ProtocolError(f"{field} must be a string, got {type(value).__name__}")


class ClientDecoder:
    """Bytes from a receiver -> `Helo` / `Pong` / `Ack` events for the client."""

    __slots__ = ("_stream",)

    def __init__(self, max_buffer: int = 1 << 20) -> None:
        self._stream = _Stream(max_buffer, "receiver message", strict_map_key=False)

    def feed(self, data: bytes) -> list[Helo | Pong | Ack]:
        """Decode what `data` completes. Raises ProtocolError on garbage or an unexpected message."""
        stream = self._stream
        values = stream._feed(data)
        try:
            return [self._classify(value) for value in values]
        except ProtocolError:
            stream._failed = True
            raise

    @staticmethod
    def _classify(value: object) -> Helo | Pong | Ack:
        if type(value) is dict:
            if "ack" in value:
                return Ack(_as_raw(value["ack"], "ack value"))
            raise ProtocolError(f"unexpected map from receiver with keys {sorted(map(repr, value))[:5]}")
        if type(value) is list and value and value[0] in ("HELO", b"HELO"):
            return _parse_helo(value)
        if type(value) is list and value and value[0] in ("PONG", b"PONG"):
            return _parse_pong(value)
        raise ProtocolError(f"unexpected {type(value).__name__} from receiver (expected HELO, PONG or ack)")


def _parse_helo(msg: list[Any]) -> Helo:
    if len(msg) < 2:
        raise ProtocolError("HELO without options")
    options = msg[1] if msg[1] is not None else {}
    if type(options) is not dict:
        raise ProtocolError(f"HELO options must be a map, got {type(options).__name__}")
    # fluentd out_forward check_helo: missing nonce/auth read as "".
    nonce = _as_raw(options.get("nonce", b""), "HELO nonce")
    auth = _as_raw(options.get("auth", b""), "HELO auth")
    keepalive = options.get("keepalive", True)  # fluent-bit sends none: spec default true
    if keepalive is None:
        keepalive = True
    if type(keepalive) is not bool:
        raise ProtocolError(f"HELO keepalive must be a boolean, got {type(keepalive).__name__}")
    return Helo(nonce=nonce, auth=auth, keepalive=keepalive)


def _parse_pong(msg: list[Any]) -> Pong:
    if len(msg) != 5:  # fluentd check_pong: exactly 5 elements
        raise ProtocolError(f"PONG has {len(msg)} elements, expected 5")
    _, auth_ok, reason, hostname, digest = msg
    if type(auth_ok) is not bool:
        raise ProtocolError(f"PONG auth result must be a boolean, got {type(auth_ok).__name__}")
    return Pong(
        auth_ok=auth_ok,
        reason=_as_text(reason if reason is not None else "", "PONG reason"),
        hostname=_as_raw(hostname if hostname is not None else b"", "PONG hostname"),
        shared_key_digest=_as_raw(digest if digest is not None else b"", "PONG digest"),
    )


def _parse_ping(msg: list[Any]) -> Ping:
    _, hostname, salt, digest, username, password_digest = msg
    return Ping(
        hostname=_as_raw(hostname, "PING hostname"),
        salt=_as_raw(salt, "PING salt"),
        shared_key_digest=_as_raw(digest, "PING shared key digest"),
        username=_as_raw(username, "PING username"),
        password_digest=_as_raw(password_digest, "PING password digest"),
    )


class _BadTime:
    """Marker for an ext-0 value that is not a valid EventTime (entry gets skipped, stream continues)."""

    __slots__ = ()


_BAD_TIME = _BadTime()


def _ext_hook(code: int, data: bytes) -> object:
    """Ext type 0 with 8 bytes is EventTime, whether sent as fixext8 (d7 00) or ext8 (c7 08 00)."""
    if code == 0:
        if len(data) != 8:
            return _BAD_TIME
        seconds, nanoseconds = _unpack_ii(data)
        if nanoseconds >= _NS_PER_S:
            return _BAD_TIME
        return EventTime(seconds, nanoseconds)
    return msgpack.ExtType(code, data)


def _entry_time(value: object) -> EventTime | None:
    if isinstance(value, EventTime):
        return value
    if isinstance(value, int):
        if isinstance(value, bool) or not 0 <= value <= _UINT32_MAX:
            return None
        return EventTime(value)
    if isinstance(value, list) and len(value) == 2:
        # Spec v1.5 / fluent-bit >= 5.0.5: [EventTime, {metadata}]. The metadata is not kept.
        inner, metadata = value
        if (metadata is None or isinstance(metadata, dict)) and not isinstance(inner, list):
            return _entry_time(inner)
    return None  # float (invalid per spec), str, nil, ...


def _make_entry(value: object) -> Entry | None:
    if type(value) is not list or len(value) != 2:
        return None
    time_value, record = value
    if type(time_value) is EventTime and type(record) is dict:  # the common case, kept short
        return Entry(time_value, record)
    return _message_entry(time_value, record)


def _message_entry(time_value: object, record: object) -> Entry | None:
    if not isinstance(record, dict):
        return None
    event_time = _entry_time(time_value)
    if event_time is None:
        return None
    return Entry(event_time, record)


class ServerDecoder:
    """Bytes from a client -> `Ping` / `Request` / `HealthCheck` / `NotArray`, streaming.

    Every size is bounded: one request (as sent) by `max_request_bytes`, decompressed entries by
    `max_decompressed_bytes`, entries per request by `max_entries`. A bound crossed, a msgpack error or a
    gzip error raises ProtocolError: close the connection without an ack (fluentd in_forward does the same).
    """

    __slots__ = ("_entry_kwargs", "_max_decompressed", "_max_entries", "_stream")

    def __init__(
        self,
        *,
        max_request_bytes: int = 16 << 20,
        max_decompressed_bytes: int = 256 << 20,
        max_entries: int = 1_000_000,
    ) -> None:
        if max_decompressed_bytes <= 0 or max_entries <= 0:
            raise ValueError("max_decompressed_bytes and max_entries must be positive")
        self._stream = _Stream(
            max_request_bytes,
            "request",
            strict_map_key=False,
            ext_hook=_ext_hook,
            max_array_len=min(max_entries, max_request_bytes),
            max_map_len=max(1, min(max_entries, max_request_bytes // 2)),
        )
        self._max_decompressed = max_decompressed_bytes
        self._max_entries = max_entries
        self._entry_kwargs: dict[str, Any] = {
            "max_buffer_size": max_decompressed_bytes + _FEED_SLICE,
            "raw": False,
            "unicode_errors": "surrogateescape",
            "strict_map_key": False,
            "ext_hook": _ext_hook,
            "max_array_len": min(max_entries, max_decompressed_bytes),
            "max_map_len": max(1, min(max_entries, max_decompressed_bytes // 2)),
        }

    def feed(self, data: bytes) -> list[Ping | Request | HealthCheck | NotArray]:
        """Decode every value `data` completes (data may arrive in pieces of any size, even 1 byte)."""
        stream = self._stream
        values = stream._feed(data)
        try:
            return [self._classify(value) for value in values]
        except ProtocolError:
            stream._failed = True
            raise

    def _classify(self, msg: object) -> Ping | Request | HealthCheck | NotArray:
        if msg is None:
            return HealthCheck()
        if type(msg) is not list:
            return NotArray(msg)
        size = len(msg)
        if size == 6 and msg[0] in ("PING", b"PING"):
            return _parse_ping(msg)
        if not 2 <= size <= 4:
            raise ProtocolError(f"request array has {size} elements, expected 2 to 4")
        tag = _as_text(msg[0], "tag")
        second = msg[1]
        # Spec: the mode follows from the 2nd element: str/bin -> PackedForward, array -> Forward.
        if isinstance(second, (str, bytes)):
            if size > 3:
                raise ProtocolError(f"PackedForward request has {size} elements, expected 2 or 3")
            options, chunk = _options(msg[2] if size == 3 else None)
            return self._packed(tag, second, options, chunk)
        if type(second) is list and not _is_v15_message(msg):
            if size > 3:
                raise ProtocolError(f"Forward request has {size} elements, expected 2 or 3")
            options, chunk = _options(msg[2] if size == 3 else None)
            if len(second) > self._max_entries:
                raise ProtocolError(f"request has {len(second)} entries, over the {self._max_entries} limit")
            entries: list[Entry] = []
            skipped = 0
            for item in second:
                entry = _make_entry(item)
                if entry is None:
                    skipped += 1
                else:
                    entries.append(entry)
            return Request(tag, Mode.FORWARD, entries, options, chunk, skipped)
        if size < 3:
            raise ProtocolError("Message request has 2 elements, expected [tag, time, record(, option)]")
        options, chunk = _options(msg[3] if size == 4 else None)
        entry = _message_entry(second, msg[2])
        if entry is None:
            return Request(tag, Mode.MESSAGE, [], options, chunk, 1)
        return Request(tag, Mode.MESSAGE, [entry], options, chunk, 0)

    def _packed(self, tag: str, blob: str | bytes, options: dict[str, Any], chunk: bytes | None) -> Request:
        # fluentd's out_forward sends the entries as str32: recover the exact bytes.
        data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else blob
        compressed = options.get("compressed")
        if compressed == "gzip":
            mode = Mode.COMPRESSED_PACKED_FORWARD
            pieces: Iterable[bytes | memoryview] = _gunzip_pieces(data, self._max_decompressed)
        elif compressed is None or compressed == "text":  # fluentd sends compressed: "text" when plain
            if len(data) > self._max_decompressed:
                raise ProtocolError(f"entries of {len(data)} bytes exceed {self._max_decompressed} bytes")
            mode = Mode.PACKED_FORWARD
            pieces = _slices(data)
        else:
            raise ProtocolError(f"unsupported compression {_printable(repr(compressed), 40)}")
        entries, skipped = self._unpack_entries(pieces)
        return Request(tag, mode, entries, options, chunk, skipped)

    def _unpack_entries(self, pieces: Iterable[bytes | memoryview]) -> tuple[list[Entry], int]:
        unpacker = msgpack.Unpacker(None, **self._entry_kwargs)
        entries: list[Entry] = []
        skipped = 0
        count = 0
        fed = 0
        boundary = 0  # end of the last complete entry (see _Stream._boundary for why not tell())
        max_entries = self._max_entries
        for piece in pieces:
            try:
                unpacker.feed(piece)
            except msgpack.BufferFull:  # not reachable within the decompressed bound, kept as a backstop
                raise ProtocolError("packed entries exceed the buffer bound") from None
            fed += len(piece)
            while True:
                try:
                    value = unpacker.unpack()
                except msgpack.OutOfData:
                    break
                except Exception as exc:
                    raise ProtocolError(f"malformed msgpack in packed entries: {exc}") from exc
                boundary = unpacker.tell()
                count += 1
                if count > max_entries:
                    raise ProtocolError(f"request has more than {max_entries} entries")
                entry = _make_entry(value)
                if entry is None:
                    skipped += 1
                else:
                    entries.append(entry)
        if boundary != fed:
            raise ProtocolError(f"packed entries end in the middle of an entry ({fed - boundary} bytes left)")
        return entries, skipped


def _is_v15_message(msg: list[Any]) -> bool:
    """``[tag, [EventTime, {metadata}], record(, option)]``: a Message with a v1.5 time.

    The spec's mode rule (array -> Forward) cannot tell it apart, but as Forward entries both elements would be
    invalid (an entry is an array), so reading it as a Message never loses a valid Forward request.
    """
    time_value = msg[1]
    return (
        len(msg) >= 3
        and len(time_value) == 2
        and isinstance(time_value[0], (EventTime, int))
        and not isinstance(time_value[0], bool)
        and isinstance(time_value[1], dict)
        and isinstance(msg[2], dict)
    )


def _options(value: object) -> tuple[dict[str, Any], bytes | None]:
    if value is None:  # old Docker (18.x) sends a nil option; fluent-bit lets it pass too
        return {}, None
    if type(value) is not dict:
        raise ProtocolError(f"request option must be a map, got {type(value).__name__}")
    chunk = value.get("chunk")
    if chunk is None:
        return value, None
    if not isinstance(chunk, (str, bytes)):
        raise ProtocolError(f"chunk option must be a string, got {type(chunk).__name__}")
    return value, _as_raw(chunk, "chunk option")


def _slices(data: bytes) -> Iterator[memoryview]:
    view = memoryview(data)
    for offset in range(0, len(view), _FEED_SLICE):
        yield view[offset : offset + _FEED_SLICE]


def _gunzip_pieces(data: bytes, limit: int) -> Iterator[bytes]:
    """Decompress one or more concatenated gzip members, yielding bounded pieces.

    fluentd's compressed buffer chunks are several members back to back, hence the loop over members.
    Output is produced with `max_length`, so a gzip bomb never allocates more than one piece beyond `limit`;
    input is fed in windows, so the `unused_data` copy between members stays small.
    """
    view = memoryview(data)
    size = len(view)
    pos = 0
    total = 0
    decompressor = zlib.decompressobj(wbits=31)
    in_member = False
    pending: bytes | memoryview = b""
    while True:
        if not pending:
            if pos < size:
                pending = view[pos : pos + _FEED_SLICE]
                pos += len(pending)
            elif not in_member:
                return
        try:
            out = decompressor.decompress(pending, _GZIP_PIECE)
        except zlib.error as exc:
            raise ProtocolError(f"gzip error in compressed entries: {exc}") from exc
        in_member = True
        pending = decompressor.unconsumed_tail
        if out:
            total += len(out)
            if total > limit:
                raise ProtocolError(f"compressed entries inflate beyond {limit} bytes (gzip bomb?)")
            yield out
        if decompressor.eof:
            pending = decompressor.unused_data
            decompressor = zlib.decompressobj(wbits=31)
            in_member = False
        elif not out and not pending and pos >= size:
            raise ProtocolError("gzip data ends in the middle of a member (truncated)")
