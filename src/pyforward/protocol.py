"""Sans-IO core of the Fluentd Forward protocol (spec v1 and v1.5).

No sockets, no asyncio, no logging: bytes in, events out; values in, bytes out.

* Encoding (client side, the hot path): `EntryPacker` packs one ``[time, record]`` entry per call with one
  reused `msgpack.Packer`; `build_chunk` wraps concatenated entries into a PackedForward or
  CompressedPackedForward request carrying a ``chunk`` option, which asks the receiver for an ack.
* Handshake (only when the receiver has a shared key): HELO -> PING -> PONG, digests are lowercase hex
  SHA-512 over raw bytes. Every handshake field is handled as raw bytes, because fluent-bit puts 16 random
  bytes (invalid UTF-8) into msgpack *str* fields.
* Decoding: `ClientDecoder` turns receiver bytes into `Helo` / `Pong` / `Ack`; `ServerDecoder` turns client
  bytes into `Ping` / `Request` / `HealthCheck` / `NotArray`, streaming, with every size bounded.

The facts (and the traps) this module follows: shared/reference/forward-protocol.md.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import importlib
import os
import struct
import time as _time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack

__all__ = [
    "Ack",
    "Chunk",
    "ClientDecoder",
    "Entry",
    "EntryPacker",
    "EventTime",
    "HandshakeError",
    "HealthCheck",
    "Helo",
    "Mode",
    "NotArray",
    "Ping",
    "Pong",
    "ProtocolError",
    "Request",
    "ServerDecoder",
    "build_chunk",
    "encode_ack",
    "encode_compressed_packed_forward",
    "encode_forward",
    "encode_helo",
    "encode_message",
    "encode_packed_forward",
    "encode_ping",
    "encode_pong",
    "gzip_compress",
    "make_helo",
    "make_ping",
    "make_pong",
    "new_chunk_id",
    "verify_ping",
    "verify_pong",
]


class ProtocolError(Exception):
    """Malformed or oversized input from the peer: the connection must be closed (no ack)."""


class HandshakeError(ProtocolError):
    """The shared-key handshake failed: refused, wrong digest, or the peer claims our own hostname."""


class Mode(enum.Enum):
    """Forward protocol carrier modes (spec v1, "Event Modes")."""

    MESSAGE = "message"
    FORWARD = "forward"
    PACKED_FORWARD = "packed_forward"
    COMPRESSED_PACKED_FORWARD = "compressed_packed_forward"


# --------------------------------------------------------------------------------------------- EventTime

_UINT32_MAX = 0xFFFFFFFF
_NS_PER_S = 1_000_000_000
_II = struct.Struct(">II")
_pack_ii = _II.pack
_unpack_ii = _II.unpack


@dataclass(frozen=True, slots=True, order=True)
class EventTime:
    """Spec EventTime: msgpack ext type 0 with uint32 BE seconds and uint32 BE nanoseconds."""

    seconds: int
    nanoseconds: int = 0

    def __post_init__(self) -> None:
        if type(self.seconds) is not int or type(self.nanoseconds) is not int:
            raise TypeError("EventTime seconds and nanoseconds must be int")
        if not 0 <= self.seconds <= _UINT32_MAX:
            raise ValueError(f"EventTime seconds {self.seconds!r} outside uint32 range")
        if not 0 <= self.nanoseconds < _NS_PER_S:
            raise ValueError(f"EventTime nanoseconds {self.nanoseconds!r} outside 0..999999999")

    @classmethod
    def from_ns(cls, ns: int) -> EventTime:
        seconds, nanoseconds = divmod(ns, _NS_PER_S)
        return cls(seconds, nanoseconds)

    @classmethod
    def now(cls) -> EventTime:
        return cls.from_ns(_time.time_ns())

    def to_ns(self) -> int:
        return self.seconds * _NS_PER_S + self.nanoseconds

    def to_ext(self) -> msgpack.ExtType:
        return msgpack.ExtType(0, _pack_ii(self.seconds, self.nanoseconds))

    def pack(self) -> bytes:
        # Always fixext8 (d7 00): the form every receiver (fluentd, fluent-bit, node) accepts.
        return b"\xd7\x00" + _pack_ii(self.seconds, self.nanoseconds)


# ------------------------------------------------------------------------------------------------ encoding


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
) -> Chunk:
    """PackedForward (or CompressedPackedForward) with options ``{"size", "chunk"[, "compressed"]}``."""
    cid = new_chunk_id() if chunk_id is None else chunk_id
    options = {"size": records, "chunk": cid}
    if compress:
        payload = encode_compressed_packed_forward(tag, gzip_compress(entries, level), options)
    else:
        payload = encode_packed_forward(tag, entries, options)
    return Chunk(chunk_id=cid, payload=payload, records=records, size=size, position=position)


# ----------------------------------------------------------------------------------------------- handshake


@dataclass(frozen=True, slots=True)
class Helo:
    nonce: bytes
    auth: bytes
    keepalive: bool = True


@dataclass(frozen=True, slots=True)
class Ping:
    hostname: bytes
    salt: bytes
    shared_key_digest: bytes
    username: bytes
    password_digest: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    auth_ok: bool
    reason: str
    hostname: bytes
    shared_key_digest: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    chunk_id: bytes  # raw bytes as received: compare byte-exactly


def _hexdigest(*parts: bytes) -> bytes:
    h = hashlib.sha512()
    for part in parts:
        h.update(part)
    return h.hexdigest().encode("ascii")


def _utf8(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def make_helo(*, user_auth: bool, keepalive: bool = True) -> Helo:
    """A receiver's HELO: 16 random nonce bytes, and 16 random auth-salt bytes when users are configured."""
    return Helo(nonce=os.urandom(16), auth=os.urandom(16) if user_auth else b"", keepalive=keepalive)


def encode_helo(helo: Helo) -> bytes:
    """``["HELO", {"nonce": bin, "auth": bin, "keepalive": bool}]`` (fluentd's shape: random bytes as bin)."""
    return b"".join(
        (
            b"\x92\xa4HELO\x83\xa5nonce",
            _bin_header(len(helo.nonce)),
            helo.nonce,
            b"\xa4auth",
            _bin_header(len(helo.auth)),
            helo.auth,
            b"\xa9keepalive",
            b"\xc3" if helo.keepalive else b"\xc2",
        )
    )


def make_ping(
    helo: Helo,
    *,
    hostname: str,
    shared_key: str,
    username: str = "",
    password: str = "",
    salt: bytes | None = None,
) -> Ping:
    """The client's PING for this HELO.

    The salt defaults to 32 hex characters (fluentd's choice): ASCII, so C receivers that strlen() it agree.
    When the HELO carries an auth salt the user digest is always sent, even without credentials: fluentd's
    in_forward sends a non-empty auth whenever security is on and its own out_forward then sends
    ``sha512(auth + "" + "")`` with an empty username (out_forward/handshake_protocol.rb generate_ping).
    """
    salt_bytes = os.urandom(16).hex().encode("ascii") if salt is None else salt
    host = hostname.encode("utf-8")
    digest = _hexdigest(salt_bytes, host, helo.nonce, shared_key.encode("utf-8"))
    if helo.auth:
        user = username.encode("utf-8")
        password_digest = _hexdigest(helo.auth, user, password.encode("utf-8"))
    else:
        user = b""
        password_digest = b""
    return Ping(
        hostname=host,
        salt=salt_bytes,
        shared_key_digest=digest,
        username=user,
        password_digest=password_digest,
    )


def encode_ping(ping: Ping) -> bytes:
    """``["PING", hostname, salt, digest, username, password_digest]``, every field a msgpack str
    carrying the raw bytes (fluent-bit's in_forward rejects any field that is not str)."""
    return b"".join(
        (
            b"\x96\xa4PING",
            _raw_str(ping.hostname),
            _raw_str(ping.salt),
            _raw_str(ping.shared_key_digest),
            _raw_str(ping.username),
            _raw_str(ping.password_digest),
        )
    )


def verify_ping(ping: Ping, *, nonce: bytes, shared_key: str, auth: bytes, users: Mapping[str, str]) -> str | None:
    """Check a client's PING against our HELO. Returns None when accepted, else the reason for the PONG.

    User authentication applies only when `users` is non-empty (fluentd: `user_auth`).
    """
    expected = _hexdigest(ping.salt, ping.hostname, nonce, shared_key.encode("utf-8"))
    if not hmac.compare_digest(expected, ping.shared_key_digest):
        return "shared_key mismatch"
    if users:
        try:
            username = ping.username.decode("utf-8")
        except UnicodeDecodeError:
            return "username/password mismatch"
        password = users.get(username)
        if password is None:
            # Still hash something so an unknown user costs the same as a wrong password.
            hmac.compare_digest(_hexdigest(auth, ping.username, b""), ping.password_digest)
            return "username/password mismatch"
        user_digest = _hexdigest(auth, ping.username, password.encode("utf-8"))
        if not hmac.compare_digest(user_digest, ping.password_digest):
            return "username/password mismatch"
    return None


def make_pong(ping: Ping, *, ok: bool, reason: str, nonce: bytes, hostname: str, shared_key: str) -> Pong:
    """A receiver's PONG. On refusal, hostname and digest are empty (fluentd and fluent-bit do the same)."""
    if not ok:
        return Pong(auth_ok=False, reason=reason, hostname=b"", shared_key_digest=b"")
    host = hostname.encode("utf-8")
    digest = _hexdigest(ping.salt, host, nonce, shared_key.encode("utf-8"))
    return Pong(auth_ok=True, reason="", hostname=host, shared_key_digest=digest)


def encode_pong(pong: Pong) -> bytes:
    """``["PONG", ok, reason, hostname, digest]``, strings as msgpack str."""
    return b"".join(
        (
            b"\x95\xa4PONG",
            b"\xc3" if pong.auth_ok else b"\xc2",
            _raw_str(pong.reason.encode("utf-8", "surrogateescape")),
            _raw_str(pong.hostname),
            _raw_str(pong.shared_key_digest),
        )
    )


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def verify_pong(pong: Pong, *, salt: bytes, nonce: bytes, shared_key: str, own_hostname: str) -> None:
    """Client-side PONG check (fluentd out_forward check_pong). Raises HandshakeError with the reason."""
    if not pong.auth_ok:
        raise HandshakeError(f"receiver refused the handshake: {_printable(pong.reason) or 'no reason given'}")
    if pong.hostname == own_hostname.encode("utf-8"):
        raise HandshakeError(
            f"receiver reports our own hostname {own_hostname!r}: same hostname on both ends "
            "(configure a distinct self_hostname, or we are talking to ourselves)"
        )
    expected = _hexdigest(salt, pong.hostname, nonce, shared_key.encode("utf-8"))
    if not hmac.compare_digest(expected, pong.shared_key_digest):
        raise HandshakeError("receiver's PONG digest does not match: shared_key mismatch")


def encode_ack(chunk: bytes) -> bytes:
    """``{"ack": chunk}``, the value a msgpack str carrying exactly these bytes (fluentd echoes a str)."""
    return b"\x81\xa3ack" + _raw_str(bytes(chunk))


# ------------------------------------------------------------------------------------------------ decoding


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
