"""The spec's vocabulary shared by the writers, the handshake and the readers: errors, carrier modes, EventTime.

Part of the Forward protocol's sans-IO core (see the package's doc).
"""

from __future__ import annotations

import enum
import struct
import time as _time
from dataclasses import dataclass

import msgpack


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
