"""Lines -> records: one audit-log line (bytes) becomes ``(EventTime, record)``.

This is the per-event hot path (target: 50k events/s end to end in pure Python), so the common case is
one ``orjson.loads``, one dict lookup and a time parse that is a dict hit plus a slice; everything
else (fallbacks, big-integer and depth checks) runs only when a cheap byte-level test says it may be needed.

Decisions (each counted in :class:`RecordStats`, never an exception to the caller):

* A JSON object is shipped as-is, the time key kept in it (fluentd's ``keep_time_key``-style: the audit
  event stays byte-for-byte meaningful for consumers that read ``stageTimestamp`` themselves).
* Anything else (array, scalar, invalid JSON, empty line, NUL/control bytes, nesting beyond orjson's
  1024 levels, ``NaN``, BOM, lone ``\\uD800`` escapes) goes as ``{"log": <line>}``: the raw text is the
  only faithful representation we can ship.
* Invalid UTF-8: orjson rejects it, and we do *not* try to repair the JSON (a replaced byte inside a key or
  value would silently alter the event); the line goes as ``{"log": line.decode(errors="replace")}``.
* Integers outside the 64-bit range: orjson does not raise for them, it silently turns them into a float
  (``18446744073709551616`` -> ``1.8446744073709552e19``), which is not faithful, and MessagePack cannot
  carry an integer wider than 64 bits anyway (spec: int format family stops at int64/uint64). Such lines
  are detected with a cheap digit-run test, confirmed with the stdlib ``json`` module (exact ints), and
  shipped as the raw line in ``{"log": ...}``.
* Nesting: the Forward message wraps each record in three more arrays (``[tag, [[time, record]], option]``)
  and msgpack-python refuses to pack beyond 1024 levels, so records deeper than :data:`MAX_DEPTH` are
  shipped as the raw line too (counted as a parse error).
* Time: ``record[time_key]`` when it is an RFC 3339 string that fits the Forward EventTime (uint32 seconds,
  spec "EventTime Ext Format"); otherwise the read time, counted as ``bad_time`` when the key was present
  (a non-string value, e.g. a number or null, counts as present-but-unusable).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MemberDescriptorType
from typing import Any, Final

import orjson

from pyforward.protocol import EntryPacker, EventTime

_packb_fast: Callable[[Any], bytes] | None
try:
    # Packs what orjson returns into the same bytes as msgpack-python (a property test holds them to it), at about half
    # its CPU: in bulk 18.3 -> 15.4 us of CPU per event, at steady rates 3-5 % of the sidecar's (bench/README.md).
    from ormsgpack import packb as _ormsgpack_packb

    _packb_fast = _ormsgpack_packb
except ImportError:  # (no wheel for this platform: msgpack-python packs every record)
    _packb_fast = None

__all__ = ["MAX_DEPTH", "EntryEncoder", "RecordParser", "RecordStats", "parse_time", "to_json_line"]

#: Deepest record (levels of object/array nesting, the record itself being level 1) shipped as a record.
#: msgpack-python packs at most 1024 levels and the Forward message adds 3; 512 leaves a wide margin for
#: receivers with smaller limits. Deeper (but still valid) JSON is shipped as ``{"log": <line>}``.
MAX_DEPTH: Final = 512

_EPOCH: Final = datetime(1970, 1, 1)
_ONE_SECOND: Final = datetime(1970, 1, 1, 0, 0, 1) - _EPOCH
_UINT32_MAX: Final = 0xFFFF_FFFF
_INT64_MIN: Final = -(1 << 63)
_UINT64_MAX: Final = (1 << 64) - 1

# ---------------------------------------------------------------------------------------------- time


# "YYYY-MM-DDTHH:MM:SS" -> epoch seconds (UTC, before the offset is applied). Audit logs repeat the same
# second thousands of times, so a tiny dict turns the expensive part into one lookup. Bounded by clearing:
# a log never has more than a handful of distinct seconds "in flight".
_PREFIX_CACHE: dict[str, int] = {}
_PREFIX_CACHE_MAX: Final = 4096
# 10 ** (9 - digits): scales a fraction of 1..9 digits to nanoseconds.
_FRACTION_SCALE: Final = (0, 100_000_000, 10_000_000, 1_000_000, 100_000, 10_000, 1_000, 100, 10, 1)


def _prefix_seconds(value: str) -> int | None:
    """Validate and convert "YYYY-MM-DD[Tt ]HH:MM:SS" (the first 19 characters); cache the result."""
    prefix = value[:19]
    if (
        len(prefix) != 19
        or prefix[4] != "-"
        or prefix[7] != "-"
        or prefix[10] not in "Tt "
        or prefix[13] != ":"
        or prefix[16] != ":"
    ):
        return None
    digits = prefix[0:4] + prefix[5:7] + prefix[8:10] + prefix[11:13] + prefix[14:16] + prefix[17:19]
    # isascii() first: str.isdigit() is also true for non-ASCII digits ("٣", "²") that RFC 3339 forbids.
    if not (digits.isascii() and digits.isdigit()):
        return None
    try:
        # datetime validates month/day (leap years included) and the clock ranges. A leap second
        # ("23:59:60", allowed by RFC 3339 section 5.7) is rejected, as datetime rejects it.
        moment = datetime(
            int(digits[0:4]),
            int(digits[4:6]),
            int(digits[6:8]),
            int(digits[8:10]),
            int(digits[10:12]),
            int(digits[12:14]),
        )
    except ValueError:
        return None
    seconds = (moment - _EPOCH) // _ONE_SECOND
    if len(_PREFIX_CACHE) >= _PREFIX_CACHE_MAX:
        _PREFIX_CACHE.clear()
    _PREFIX_CACHE[prefix] = seconds
    return seconds


def _event_time_maker() -> Callable[[int, int], EventTime]:
    """``EventTime(seconds, nanoseconds)`` without re-validation, for values parse_time already checked.

    The frozen dataclass constructor costs ~1.2 us (``object.__setattr__`` per field plus the range checks in
    ``__post_init__``); writing the two slots directly costs ~0.5 us, per event. Falls back to the public
    constructor if EventTime's layout ever changes (checked once, here).
    """
    fields = getattr(EventTime, "__dataclass_fields__", {})
    slots = [EventTime.__dict__.get(name) for name in ("seconds", "nanoseconds")]
    if list(fields) != ["seconds", "nanoseconds"] or not all(isinstance(slot, MemberDescriptorType) for slot in slots):
        return EventTime
    new = object.__new__
    set_seconds = slots[0].__set__  # type: ignore[union-attr]
    set_nanoseconds = slots[1].__set__  # type: ignore[union-attr]

    def make(seconds: int, nanoseconds: int) -> EventTime:
        event_time: EventTime = new(EventTime)
        set_seconds(event_time, seconds)
        set_nanoseconds(event_time, nanoseconds)
        return event_time

    return make


_event_time: Final = _event_time_maker()


def parse_time(value: str) -> EventTime | None:
    """Parse an RFC 3339 timestamp to an :class:`EventTime`, keeping nanosecond precision.

    Accepted: ``YYYY-MM-DD`` + ``T``/``t``/space + ``HH:MM:SS``, an optional fraction of any length
    (digits beyond the 9th are truncated, as ``datetime`` truncates beyond the 6th), then ``Z``/``z`` or
    ``+HH:MM``/``-HH:MM``. A missing offset is *not* accepted (RFC 3339 section 5.6 requires one, and
    guessing a zone would shift events silently). Returns None for anything else, and for instants an
    EventTime cannot carry (Forward spec: uint32 seconds, i.e. 1970-01-01T00:00:00Z..2106-02-07T06:28:15Z).
    """
    if not value.isascii():  # O(1) in CPython; makes every isdigit() below mean [0-9]
        return None
    seconds = _PREFIX_CACHE.get(value[:19])
    if seconds is None:
        seconds = _prefix_seconds(value)
        if seconds is None:
            return None
    rest = value[19:]
    size = len(rest)
    # Fast path: kube-apiserver's format, microseconds and "Z" (".123456Z").
    if size == 8 and rest[0] == "." and (rest[7] == "Z" or rest[7] == "z"):
        fraction = rest[1:7]
        if fraction.isdigit() and 0 <= seconds <= _UINT32_MAX:
            return _event_time(seconds, int(fraction) * 1000)
        return None
    if not size:
        return None
    last = rest[-1]
    if last == "Z" or last == "z":
        body = rest[:-1]
    else:
        if size < 6 or rest[-3] != ":":
            return None
        sign = rest[-6]
        hours = rest[-5:-3]
        minutes = rest[-2:]
        if sign not in "+-" or not (hours.isdigit() and minutes.isdigit()):
            return None
        offset_h = int(hours)
        offset_m = int(minutes)
        if offset_h > 23 or offset_m > 59:
            return None
        offset = offset_h * 3600 + offset_m * 60
        # local time = UTC + offset  =>  UTC = local - offset
        seconds = seconds - offset if sign == "+" else seconds + offset
        body = rest[:-6]
    if not 0 <= seconds <= _UINT32_MAX:
        return None
    if not body:
        return _event_time(seconds, 0)
    if body[0] != "." or len(body) < 2:
        return None
    fraction = body[1:]
    if not fraction.isdigit():
        return None
    if len(fraction) > 9:
        fraction = fraction[:9]
    return _event_time(seconds, int(fraction) * _FRACTION_SCALE[len(fraction)])


# ------------------------------------------------------------------------------------------- records


@dataclass(slots=True)
class RecordStats:
    """Counters for the lines seen by a :class:`RecordParser` (each fallback line counted exactly once).

    ``records`` counts every line parsed (every call to ``parse``); each line that did not become a JSON
    object record is counted in exactly one of ``parse_errors``, ``not_objects``, ``invalid_utf8`` or
    ``truncated``. ``bad_time`` counts records whose time key was present but unusable.
    """

    records: int = 0
    parse_errors: int = 0
    not_objects: int = 0
    invalid_utf8: int = 0
    bad_time: int = 0
    truncated: int = 0


_MISSING: Final[Any] = object()
_DIGIT_RUN_TABLE: Final = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
# 19 digits: the shortest decimal that can exceed int64 (9223372036854775807 has 19 digits).
_LONG_DIGIT_RUN: Final = b"0" * 19


class _HugeIntegerError(ValueError):
    pass


def _checked_int(text: str) -> int:
    """``parse_int`` hook for the stdlib json module: reject integers MessagePack cannot represent."""
    number = int(text)
    if number < _INT64_MIN or number > _UINT64_MAX:
        raise _HugeIntegerError(text)
    return number


def _has_huge_integer(line: bytes) -> bool:
    try:
        json.loads(line, parse_int=_checked_int)
    except _HugeIntegerError:
        return True
    except (ValueError, RecursionError):
        # orjson accepted the line; if the stdlib disagrees (e.g. its recursion limit), nothing here is a
        # huge integer we could detect -- the depth check handles very deep lines.
        return False
    return False


def _deeper_than(obj: Any, limit: int) -> bool:
    """True when ``obj`` nests more than ``limit`` levels (iterative: safe for any depth)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
    return False


def _decode_truncated(line: bytes) -> str:
    """Decode a line cut at a byte limit: an incomplete final character is our cut, not bad data."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data" and error.start >= len(line) - 3:
            try:
                return line[: error.start].decode("utf-8")
            except UnicodeDecodeError:
                pass
    return line.decode("utf-8", "replace")


class RecordParser:
    """Turn one log line into ``(EventTime, record)``; never raises for any byte string."""

    __slots__ = ("stats", "time_key")

    def __init__(self, *, time_key: str = "stageTimestamp", stats: RecordStats | None = None) -> None:
        self.time_key = time_key
        self.stats = stats if stats is not None else RecordStats()

    def parse(
        self, line: bytes, *, truncated_from: int | None = None, now: EventTime | None = None
    ) -> tuple[EventTime, dict[str, Any]]:
        """Parse ``line`` (without its ``\\n``; a trailing ``\\r`` or ``\\n`` is tolerated and stripped).

        ``truncated_from``: the line was cut by the reader; its original length in bytes.
        ``now``: the read time to use when the line has no usable time (default ``EventTime.now()``).
        """
        stats = self.stats
        stats.records += 1
        if truncated_from is not None:
            stats.truncated += 1
            text = _decode_truncated(_strip_eol(line))
            record: dict[str, Any] = {
                "log": text,
                "pyforward_truncated": True,
                "pyforward_original_bytes": truncated_from,
            }
            return (now if now is not None else EventTime.now()), record
        # JSON whitespace includes "\r" and "\n", so the hot path needs no strip.
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return (now if now is not None else EventTime.now()), self._fallback(line, is_json=False)
        if type(obj) is not dict:
            return (now if now is not None else EventTime.now()), self._fallback(line, is_json=True)
        size = len(line)
        # Cheap guards first: a >64-bit integer needs a run of >= 19 digits; MAX_DEPTH levels need at least
        # 2 * MAX_DEPTH bytes. Audit lines (~1 KB, short numbers) skip the expensive confirmations.
        if size >= 19 and _LONG_DIGIT_RUN in line.translate(_DIGIT_RUN_TABLE) and _has_huge_integer(line):
            stats.parse_errors += 1
            return (now if now is not None else EventTime.now()), {"log": _strip_eol(line).decode("utf-8")}
        if size >= 2 * MAX_DEPTH and line.count(b"{") + line.count(b"[") > MAX_DEPTH and _deeper_than(obj, MAX_DEPTH):
            stats.parse_errors += 1
            return (now if now is not None else EventTime.now()), {"log": _strip_eol(line).decode("utf-8")}
        value = obj.get(self.time_key, _MISSING)
        if type(value) is str:
            event_time = parse_time(value)
            if event_time is not None:
                return event_time, obj
            stats.bad_time += 1
        elif value is not _MISSING:
            stats.bad_time += 1
        return (now if now is not None else EventTime.now()), obj

    def _fallback(self, line: bytes, *, is_json: bool) -> dict[str, Any]:
        """``{"log": <line>}`` for a line that is not a JSON object; count why."""
        stats = self.stats
        line = _strip_eol(line)
        if is_json:
            stats.not_objects += 1
            return {"log": line.decode("utf-8")}  # orjson validated the UTF-8
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            stats.invalid_utf8 += 1
            return {"log": line.decode("utf-8", "replace")}
        stats.parse_errors += 1
        return {"log": text}


# ------------------------------------------------------------------------------------------- entries

# "YYYY-MM-DDTHH:MM:SS" -> the packed entry's head up to the nanoseconds: fixarray(2), fixext8 type 0, uint32 BE
# seconds (Forward spec "EventTime Ext Format"). Bounded like _PREFIX_CACHE.
_HEAD_CACHE: dict[str, bytes] = {}
# msgpack float 64: how msgpack-python packs every Python float. An int, not b"\xcb": `bytes in bytes` first tries
# the needle as an integer and builds (and drops) a TypeError, ten times the cost of the memchr that follows.
_FLOAT64: Final = 0xCB


def _kube_time_head(value: str) -> bytes | None:
    """``92 d7 00`` + seconds + nanoseconds for kube-apiserver's exact format ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.

    None for any other string: the caller then takes the general path (:func:`parse_time`), so this only has
    to be right for the format it accepts, where it must agree with parse_time (tested).
    """
    if len(value) != 27 or value[19] != "." or value[26] != "Z" or not value.isascii():
        return None
    prefix = value[:19]
    head = _HEAD_CACHE.get(prefix)
    if head is None:
        seconds = _prefix_seconds(value)
        if seconds is None or not 0 <= seconds <= _UINT32_MAX:
            return None
        if len(_HEAD_CACHE) >= _PREFIX_CACHE_MAX:
            _HEAD_CACHE.clear()
        head = _HEAD_CACHE[prefix] = b"\x92\xd7\x00" + seconds.to_bytes(4, "big")
    fraction = value[20:26]
    if not fraction.isdigit():
        return None
    return head + (int(fraction) * 1000).to_bytes(4, "big")


class EntryEncoder:
    """One log line -> one packed Forward entry ``[EventTime, record]`` (msgpack bytes): the shipper's hot path.

    ``encode(line, now)`` returns exactly ``packer.pack_entry(*parser.parse(line, now=now))`` and counts the
    same in ``parser.stats`` (tested on every kind of line), with less work for a well-formed audit event:

    * the time comes from kube-apiserver's exact ``stageTimestamp`` format straight to its packed bytes (no
      EventTime object); any other form takes the general path;
    * the huge-integer test (``RecordParser.parse`` translates every line to find runs of 19 digits) runs only
      when the packed record holds a float: orjson turns an integer beyond 64 bits into a float, and
      msgpack-python (ormsgpack too) packs every float as float 64 (``cb``), so a record whose bytes have no ``cb``
      at all has no such integer. A ``cb`` byte inside a string or an integer only costs that test.

    Anything unusual (not JSON, not an object, too deep, no usable time, a huge integer, a string msgpack cannot
    encode) goes through ``parse`` + ``pack_entry`` themselves, so their decisions stay the only ones.
    """

    __slots__ = ("_pack", "_pack_entry", "_parse", "_stats", "_time_key")

    def __init__(self, parser: RecordParser, packer: EntryPacker | None = None) -> None:
        packer = packer if packer is not None else EntryPacker()
        self._parse = parser.parse
        self._stats = parser.stats
        self._time_key = parser.time_key
        self._pack_entry = packer.pack_entry
        self._pack = packer.pack_record if _packb_fast is None else _packb_fast

    def encode(self, line: bytes, now: EventTime) -> bytes:
        """``line`` (without its newline) as a packed entry; ``now`` is the time for lines without a usable one."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return self._general(line, now)
        if type(obj) is not dict:
            return self._general(line, now)
        if len(line) >= 2 * MAX_DEPTH and line.count(b"{") + line.count(b"[") > MAX_DEPTH:
            return self._general(line, now)  # maybe too deep: parse decides
        value = obj.get(self._time_key)
        head = _kube_time_head(value) if type(value) is str else None
        if head is None:
            return self._general(line, now)
        try:
            body = self._pack(obj)
        except (UnicodeEncodeError, TypeError):  # (TypeError: ormsgpack's MsgpackEncodeError, e.g. nesting it refuses)
            return self._general(line, now)
        if _FLOAT64 in body and _LONG_DIGIT_RUN in line.translate(_DIGIT_RUN_TABLE) and _has_huge_integer(line):
            return self._general(line, now)
        self._stats.records += 1
        return head + body

    def _general(self, line: bytes, now: EventTime) -> bytes:
        return self._pack_entry(*self._parse(line, now=now))


def _strip_eol(line: bytes) -> bytes:
    if line[-1:] == b"\n":
        line = line[:-1]
    if line[-1:] == b"\r":
        line = line[:-1]
    return line


# ------------------------------------------------------------------------------------------- output

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _sanitize(value: Any) -> Any:
    """Make a decoded msgpack value JSON-serialisable: lone surrogates (a peer's invalid UTF-8 decoded with
    ``surrogateescape``) become U+FFFD, bytes are decoded with replacement, other types become strings."""
    kind = type(value)
    if kind is str:
        return _SURROGATE.sub("\ufffd", value)
    if kind is dict:
        return {_sanitize_key(k): _sanitize(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_sanitize(v) for v in value]
    if kind is bytes or kind is bytearray or kind is memoryview:
        return bytes(value).decode("utf-8", "replace")
    if kind is float:
        return value if math.isfinite(value) else None  # as orjson does for NaN/Infinity
    if value is None or kind is bool or kind is int:
        return value
    if isinstance(value, Mapping):
        return {_sanitize_key(k): _sanitize(v) for k, v in value.items()}
    return _SURROGATE.sub("\ufffd", str(value))


def _sanitize_key(key: Any) -> str:
    if type(key) is str:
        return _SURROGATE.sub("\ufffd", key)
    if isinstance(key, bytes | bytearray):
        return bytes(key).decode("utf-8", "replace")
    return _SURROGATE.sub("\ufffd", str(key))


def to_json_line(record: Mapping[str, Any]) -> bytes:
    """One JSON line (with ``\\n``) for ``record``; never raises for anything msgpack can decode.

    Fast path: ``orjson.dumps``. Fallbacks, in order: sanitised copy (lone surrogates -> U+FFFD, bytes
    decoded, non-string keys stringified); the stdlib json module for nesting beyond orjson's 254 levels;
    finally a marker object, so one hostile record cannot stop the output.
    """
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        pass
    try:
        clean = _sanitize(record)
    except RecursionError:
        return b'{"pyforward_unserializable":true}\n'
    try:
        return orjson.dumps(clean, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        pass
    try:
        return json.dumps(clean, ensure_ascii=False).encode("utf-8") + b"\n"
    except (ValueError, RecursionError):
        return b'{"pyforward_unserializable":true}\n'
