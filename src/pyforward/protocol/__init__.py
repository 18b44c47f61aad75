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

One module per concern, as in h11: `_types` (errors, carrier modes, EventTime), `_writers` (encoding), `_handshake`
(HELO/PING/PONG, acks), `_readers` (decoding), `_ranges` (the ``pyforward.*`` options: where each record of a chunk
came from, issue 22); this package exports their public names.

The facts (and the traps) this package follows: shared/reference/forward-protocol.md.
"""

from __future__ import annotations

from pyforward.protocol._handshake import (
    Ack,
    Helo,
    Ping,
    Pong,
    encode_ack,
    encode_helo,
    encode_ping,
    encode_pong,
    make_helo,
    make_ping,
    make_pong,
    verify_ping,
    verify_pong,
)
from pyforward.protocol._ranges import (
    OPTION_LENGTHS,
    OPTION_OFFSET,
    OPTION_SOURCE,
    RangeError,
    SourceRanges,
    parse_ranges,
    range_options,
)
from pyforward.protocol._readers import ClientDecoder, Entry, HealthCheck, NotArray, Request, ServerDecoder
from pyforward.protocol._types import EventTime, HandshakeError, Mode, ProtocolError
from pyforward.protocol._writers import (
    Chunk,
    EntryPacker,
    build_chunk,
    encode_compressed_packed_forward,
    encode_forward,
    encode_message,
    encode_packed_forward,
    gzip_compress,
    new_chunk_id,
)

__all__ = [
    "OPTION_LENGTHS",
    "OPTION_OFFSET",
    "OPTION_SOURCE",
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
    "RangeError",
    "Request",
    "ServerDecoder",
    "SourceRanges",
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
    "parse_ranges",
    "range_options",
    "verify_ping",
    "verify_pong",
]
