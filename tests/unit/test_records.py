"""records.py: RFC 3339 time parsing, line -> (EventTime, record), every fallback counted, JSON output."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyforward import records
from pyforward.protocol import EventTime
from pyforward.records import MAX_DEPTH, RecordParser, RecordStats, parse_time, to_json_line

EPOCH = datetime(1970, 1, 1)
NOW = EventTime(1_700_000_000, 42)
T0 = int((datetime(2026, 11, 26, 12, 0, 0) - EPOCH).total_seconds())


def counters(stats: RecordStats) -> dict[str, int]:
    return {
        "records": stats.records,
        "parse_errors": stats.parse_errors,
        "not_objects": stats.not_objects,
        "invalid_utf8": stats.invalid_utf8,
        "bad_time": stats.bad_time,
        "truncated": stats.truncated,
    }


def only(name: str | None, records: int = 1) -> dict[str, int]:
    expected = dict.fromkeys(("parse_errors", "not_objects", "invalid_utf8", "bad_time", "truncated"), 0)
    expected["records"] = records
    if name is not None:
        expected[name] = 1
    return expected


def packable(t: EventTime, record: dict[str, Any]) -> None:
    """The Forward mode message around the record must pack (msgpack: 64-bit ints, bounded depth)."""
    msgpack.packb(["tag", [[t.seconds, record]], {"chunk": "x"}], use_bin_type=True)


# ------------------------------------------------------------------------------------------ parse_time


@pytest.mark.parametrize(
    ("text", "seconds", "nanos"),
    [
        ("2026-11-26T12:00:00.123456789Z", T0, 123_456_789),
        ("2026-11-26T12:00:00.123456Z", T0, 123_456_000),
        ("2026-11-26T12:00:00.1Z", T0, 100_000_000),
        ("2026-11-26T12:00:00.000000001Z", T0, 1),
        ("2026-11-26T12:00:00.1234567891234Z", T0, 123_456_789),  # beyond ns: truncated
        ("2026-11-26T12:00:00Z", T0, 0),
        ("2026-11-26t12:00:00.5z", T0, 500_000_000),
        ("2026-11-26 12:00:00.25Z", T0, 250_000_000),
        ("2026-11-26T14:00:00+02:00", T0, 0),
        ("2026-11-26T06:30:00.000001-05:30", T0, 1000),
        ("2026-11-26T12:00:00-00:00", T0, 0),
        ("2026-11-27T11:59:00+23:59", T0, 0),
        ("2024-02-29T00:00:00Z", 1_709_164_800, 0),
        ("1970-01-01T00:00:00Z", 0, 0),
        ("1969-12-31T23:00:00-02:00", 3600, 0),  # the offset brings it into EventTime's range
        ("2106-02-07T06:28:15.999999999Z", 2**32 - 1, 999_999_999),
    ],
)
def test_parse_time_valid(text: str, seconds: int, nanos: int) -> None:
    assert parse_time(text) == EventTime(seconds, nanos)
    assert parse_time(text) == EventTime(seconds, nanos)  # second call: prefix cache hit


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2026-11-26",
        "2026-11-26T12:00:00",  # RFC 3339 requires an offset
        "2026-11-26T12:00:00.123456",
        "2026-13-01T00:00:00Z",
        "2026-02-29T00:00:00Z",  # 2026 is not a leap year
        "2026-11-31T00:00:00Z",
        "2026-11-26T24:00:00Z",
        "2026-11-26T12:60:00Z",
        "2026-11-26T23:59:60Z",  # leap second: datetime rejects it, so do we
        "0000-01-01T00:00:00Z",
        "2026-11-26T12:00:00+24:00",
        "2026-11-26T12:00:00+02:60",
        "2026-11-26T12:00:00+0200",
        "2026-11-26T12:00:00+02",
        "2026-11-26T12:00:00 02:00",
        "2026-11-26T12:00:00.Z",
        "2026-11-26T12:00:00.12a456Z",
        "2026-11-26T12:00:00.+123Z",
        "2026-11-26T12:00:00,123Z",
        "2026-11-26T12:00:00ZZ",
        "2026-11-26T12:00:00.123456ZZ",
        "2026-11-26X12:00:00Z",
        "2026/11/26T12:00:00Z",
        "+026-11-26T12:00:00Z",
        " 2026-11-26T12:00:00Z",
        "2026-11-26T12:00:00Z ",
        "２０２６-11-26T12:00:00Z",  # fullwidth digits: str.isdigit() is true, RFC 3339 says ASCII
        "2026-11-26T12:00:00.١٢٣Z",  # Arabic-Indic digits in the fraction
        "2026-11-26T12:00:00.123456\u00b2",
        "2026-11-26T12:00:00+0٢:00",
        "2026-1-026T12:00:00Z",
        # Valid RFC 3339 but not representable as a Forward EventTime (uint32 seconds since the epoch):
        "1969-12-31T23:59:59.5Z",
        "1969-12-31T23:59:59.500000Z",
        "1970-01-01T00:30:00+01:00",
        "2106-02-07T06:28:16Z",
        "2106-02-07T06:28:16.000000Z",
        "9999-12-31T23:59:59Z",
    ],
)
def test_parse_time_invalid(text: str) -> None:
    assert parse_time(text) is None


def test_parse_time_cache_is_bounded() -> None:
    for i in range(records._PREFIX_CACHE_MAX + 100):
        stamp = (datetime(2026, 1, 1) + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.5Z")
        assert parse_time(stamp) == EventTime(int((datetime(2026, 1, 1) - EPOCH).total_seconds()) + i, 500_000_000)
    assert len(records._PREFIX_CACHE) <= records._PREFIX_CACHE_MAX


@settings(max_examples=400, deadline=None)
@given(
    moment=st.one_of(
        st.datetimes(min_value=datetime(1969, 12, 30), max_value=datetime(2106, 2, 9)),
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    ),
    extra_nanos=st.integers(0, 999),
    digits=st.integers(0, 12),
    offset_minutes=st.integers(-(23 * 60 + 59), 23 * 60 + 59),
    zone=st.sampled_from(["Z", "z", "offset"]),
    separator=st.sampled_from(["T", "t", " "]),
)
def test_parse_time_agrees_with_datetime(
    moment: datetime, extra_nanos: int, digits: int, offset_minutes: int, zone: str, separator: str
) -> None:
    """Format a wall-clock time with a fraction of 0..12 digits and a zone; compare with datetime arithmetic
    (exact, nanoseconds included) and with datetime.fromisoformat where it accepts the text."""
    nanos = moment.microsecond * 1000 + extra_nanos
    fraction = f"{nanos:09d}{'123'}"[:digits]
    if zone == "offset":
        sign = "+" if offset_minutes >= 0 else "-"
        hours, minutes = divmod(abs(offset_minutes), 60)
        suffix = f"{sign}{hours:02d}:{minutes:02d}"
        offset = timedelta(minutes=offset_minutes)
    else:
        suffix, offset = zone, timedelta(0)
    text = moment.strftime(f"%Y-%m-%d{separator}%H:%M:%S")
    if len(text) != 19:  # strftime does not zero-pad years < 1000 on every platform
        text = f"{moment.year:04d}" + text[text.index("-") :]
    text += ("." + fraction if digits else "") + suffix

    expected_nanos = int(fraction.ljust(9, "0")[:9]) if digits else 0
    wall = moment.replace(microsecond=0)
    expected_seconds = (wall - offset - EPOCH) // timedelta(seconds=1)
    if 0 <= expected_seconds < 2**32:
        assert parse_time(text) == EventTime(expected_seconds, expected_nanos)
    else:  # EventTime is uint32 seconds (Forward spec)
        assert parse_time(text) is None

    if separator != "t" and zone != "z":  # fromisoformat (3.11) accepts these forms
        parsed = datetime.fromisoformat(text)
        assert parsed.utcoffset() == offset
        assert (parsed.replace(microsecond=0, tzinfo=None) - offset - EPOCH) // timedelta(seconds=1) == (
            expected_seconds
        )
        assert parsed.microsecond == expected_nanos // 1000


# ------------------------------------------------------------------------------------------ RecordParser

AUDIT_LINE = (
    b'{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a-1",'
    b'"user":{"username":"j\xc3\xbcrgen \xf0\x9f\x9a\x80"},'
    b'"requestReceivedTimestamp":"2026-11-26T11:59:59.999000Z","stageTimestamp":"2026-11-26T12:00:00.123456Z"}'
)


def test_object_is_kept_as_is_with_its_time_key() -> None:
    stats = RecordStats()
    t, record = RecordParser(stats=stats).parse(AUDIT_LINE, now=NOW)
    assert t == EventTime(T0, 123_456_000)
    assert record == orjson.loads(AUDIT_LINE)
    assert record["stageTimestamp"] == "2026-11-26T12:00:00.123456Z"
    assert record["user"]["username"] == "jürgen 🚀"
    assert counters(stats) == only(None)


def test_custom_time_key() -> None:
    parser = RecordParser(time_key="requestReceivedTimestamp")
    t, _ = parser.parse(AUDIT_LINE, now=NOW)
    assert t == EventTime(T0 - 1, 999_000_000)


def test_missing_time_key_uses_read_time_without_counting() -> None:
    parser = RecordParser()
    t, record = parser.parse(b'{"a":1}', now=NOW)
    assert (t, record) == (NOW, {"a": 1})
    assert counters(parser.stats) == only(None)


def test_default_read_time_is_now() -> None:
    before = EventTime.now()
    t, _ = RecordParser().parse(b'{"a":1}')
    after = EventTime.now()
    assert before.to_ns() <= t.to_ns() <= after.to_ns()


@pytest.mark.parametrize(
    "value",
    [
        '"yesterday"',
        '"2026-11-26T12:00:00"',
        '""',
        "1764158400",
        "null",
        '{"seconds":1}',
        '"1969-12-31T23:59:59Z"',  # before the epoch: EventTime seconds are uint32 (Forward spec)
        '"2106-02-07T06:28:16Z"',  # 2**32 seconds
    ],
)
def test_bad_time_uses_read_time_and_counts(value: str) -> None:
    parser = RecordParser()
    line = b'{"stageTimestamp":%s,"x":1}' % value.encode()
    t, record = parser.parse(line, now=NOW)
    assert t == NOW
    assert record == orjson.loads(line)  # the record still ships, unchanged
    assert counters(parser.stats) == only("bad_time")


def test_last_representable_time_is_accepted() -> None:
    t, _ = RecordParser().parse(b'{"stageTimestamp":"2106-02-07T06:28:15.999999999Z"}', now=NOW)
    assert t == EventTime(2**32 - 1, 999_999_999)


@pytest.mark.parametrize(
    ("line", "counter", "log"),
    [
        (b"[1,2,3]", "not_objects", "[1,2,3]"),
        (b"42", "not_objects", "42"),
        (b'"just a string"', "not_objects", '"just a string"'),
        (b"null", "not_objects", "null"),
        (b"[1]\r", "not_objects", "[1]"),
        (b"", "parse_errors", ""),
        (b"   ", "parse_errors", "   "),
        (b"\r", "parse_errors", ""),
        (b"not json", "parse_errors", "not json"),
        (b"not json\r", "parse_errors", "not json"),
        (b'{"a":1', "parse_errors", '{"a":1'),
        (b'{"a":1}{"b":2}', "parse_errors", '{"a":1}{"b":2}'),
        (b'{"a":NaN}', "parse_errors", '{"a":NaN}'),
        (b'{"a":1e400}', "parse_errors", '{"a":1e400}'),
        (b'{"a":"\\ud800"}', "parse_errors", '{"a":"\\ud800"}'),
        (b'\xef\xbb\xbf{"a":1}', "parse_errors", '\ufeff{"a":1}'),
        (b'{"a":"x\x00y"}', "parse_errors", '{"a":"x\x00y"}'),
        (b"\x00\x00\x00", "parse_errors", "\x00\x00\x00"),
        (b'{"a":"\xff\xfe"}', "invalid_utf8", '{"a":"\ufffd\ufffd"}'),
        (b'{"a":"\xc3"}', "invalid_utf8", '{"a":"\ufffd"}'),
        (b'{"a":"\xed\xa0\x80"}', "invalid_utf8", '{"a":"\ufffd\ufffd\ufffd"}'),  # UTF-8-encoded surrogate
        (b"\x80\x81\xfe\xff garbage", "invalid_utf8", "\ufffd\ufffd\ufffd\ufffd garbage"),
        (b"\xff\r", "invalid_utf8", "\ufffd"),
    ],
)
def test_fallbacks_ship_the_line_and_count_it(line: bytes, counter: str, log: str) -> None:
    parser = RecordParser()
    t, record = parser.parse(line, now=NOW)
    assert (t, record) == (NOW, {"log": log})
    assert counters(parser.stats) == only(counter)
    packable(t, record)


def test_crlf_object_is_parsed() -> None:
    parser = RecordParser()
    t, record = parser.parse(b'{"stageTimestamp":"2026-11-26T12:00:00Z"}\r', now=NOW)
    assert (t, record) == (EventTime(T0, 0), {"stageTimestamp": "2026-11-26T12:00:00Z"})
    assert counters(parser.stats) == only(None)


def test_duplicate_keys_last_wins() -> None:
    _, record = RecordParser().parse(b'{"a":1,"b":2,"a":3}', now=NOW)
    assert record == {"a": 3, "b": 2}


def nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


@pytest.mark.parametrize("depth", [10_000, 1025, MAX_DEPTH + 1, 1000])
def test_too_deep_json_ships_as_log(depth: int) -> None:
    parser = RecordParser()
    line = nested(depth)
    t, record = parser.parse(line, now=NOW)
    assert (t, record) == (NOW, {"log": line.decode()})
    assert counters(parser.stats) == only("parse_errors")
    packable(t, record)


def test_deep_but_allowed_json_is_a_record_and_packs() -> None:
    parser = RecordParser()
    line = nested(MAX_DEPTH)
    t, record = parser.parse(line, now=NOW)
    assert record == orjson.loads(line)
    assert counters(parser.stats) == only(None)
    packable(t, record)


def test_many_brackets_in_strings_do_not_trip_the_depth_check() -> None:
    parser = RecordParser()
    line = orjson.dumps({"s": "[{" * 2000, "list": [[1]] * 400})
    _, record = parser.parse(line, now=NOW)
    assert record == orjson.loads(line)
    assert counters(parser.stats) == only(None)


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**40, -(10**30)])
def test_integers_beyond_64_bits_ship_the_raw_line(number: int) -> None:
    """orjson would silently turn these into floats; msgpack cannot carry them: the raw line is faithful."""
    parser = RecordParser()
    line = b'{"stageTimestamp":"2026-11-26T12:00:00Z","n":%d}' % number
    t, record = parser.parse(line, now=NOW)
    assert (t, record) == (NOW, {"log": line.decode()})
    assert counters(parser.stats) == only("parse_errors")
    packable(t, record)


@pytest.mark.parametrize("number", [2**64 - 1, -(2**63), 2**63, 10**18, 1234567890123456789])
def test_64_bit_integers_are_kept_exactly(number: int) -> None:
    parser = RecordParser()
    line = b'{"n":%d,"s":"%d"}' % (number, 10**40)  # a long digit run in a string is not a number
    t, record = parser.parse(line, now=NOW)
    assert record == {"n": number, "s": str(10**40)}
    assert type(record["n"]) is int
    assert counters(parser.stats) == only(None)
    packable(t, record)


def test_float_with_long_mantissa_is_kept() -> None:
    _, record = RecordParser().parse(b'{"f":1.23456789012345678901234}', now=NOW)
    assert record == {"f": 1.23456789012345678901234}


def test_truncated_line() -> None:
    parser = RecordParser()
    t, record = parser.parse(b'{"kind":"Event","user":"j\xc3\xbcr', truncated_from=123_456, now=NOW)
    assert t == NOW
    assert record == {
        "log": '{"kind":"Event","user":"jür',
        "pyforward_truncated": True,
        "pyforward_original_bytes": 123_456,
    }
    assert counters(parser.stats) == only("truncated")
    packable(t, record)


def test_truncated_in_the_middle_of_a_character_is_not_invalid_utf8() -> None:
    parser = RecordParser()
    _, record = parser.parse("ab日本".encode()[:-1], truncated_from=100, now=NOW)  # cut inside "本"
    assert record["log"] == "ab日"
    _, record = parser.parse(b"a\xffb\xe6", truncated_from=100, now=NOW)  # real garbage: replaced
    assert record["log"] == "a\ufffdb\ufffd"
    assert counters(parser.stats) == only("truncated", records=2) | {"truncated": 2}


def test_truncated_valid_json_is_still_marked_truncated() -> None:
    parser = RecordParser()
    _, record = parser.parse(b'{"a":1}', truncated_from=9, now=NOW)
    assert record == {"log": '{"a":1}', "pyforward_truncated": True, "pyforward_original_bytes": 9}


def test_counters_accumulate_in_a_shared_stats_object() -> None:
    stats = RecordStats()
    parser = RecordParser(stats=stats)
    for line in (AUDIT_LINE, b"[]", b"nope", b"\xff", b'{"stageTimestamp":1}'):
        parser.parse(line, now=NOW)
    parser.parse(b"x", truncated_from=5, now=NOW)
    assert counters(stats) == {
        "records": 6,
        "parse_errors": 1,
        "not_objects": 1,
        "invalid_utf8": 1,
        "bad_time": 1,
        "truncated": 1,
    }


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_never_raise_and_always_pack(line: bytes) -> None:
    parser = RecordParser()
    t, record = parser.parse(line, now=NOW)
    assert isinstance(record, dict)
    packable(t, record)
    stats = parser.stats
    fallbacks = stats.parse_errors + stats.not_objects + stats.invalid_utf8
    assert stats.records == 1
    assert stats.truncated == 0
    if fallbacks:
        assert fallbacks == 1
        text = line[:-1] if line.endswith(b"\n") else line
        text = text[:-1] if text.endswith(b"\r") else text
        assert record == {"log": text.decode("utf-8", "replace")}
    else:
        assert record == orjson.loads(line)


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_object_is_shipped_faithfully(value: Any) -> None:
    """Either the exact record (by the stdlib json module's reading) or the exact line as text."""
    line = json.dumps({"v": value}, ensure_ascii=False).encode()
    t, record = RecordParser().parse(line, now=NOW)
    packable(t, record)
    if record.keys() == {"log"}:
        assert record["log"] == line.decode()
    else:
        assert record == json.loads(line)


# ------------------------------------------------------------------------------------------ to_json_line


def test_to_json_line_plain() -> None:
    record = orjson.loads(AUDIT_LINE)
    line = to_json_line(record)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert orjson.loads(line) == record
    assert "jürgen 🚀".encode() in line  # UTF-8, not \u escapes


def test_to_json_line_replaces_lone_surrogates() -> None:
    # What msgpack.unpackb(..., unicode_errors="surrogateescape") makes of a peer's invalid UTF-8.
    record = {"log": b"caf\xe9 \xff".decode("utf-8", "surrogateescape"), "k\ud800": ["\udfff"]}
    line = to_json_line(record)
    assert orjson.loads(line) == {"log": "caf\ufffd \ufffd", "k\ufffd": ["\ufffd"]}


def test_to_json_line_handles_peer_types() -> None:
    record: dict[Any, Any] = {"b": b"\x00bin\xff", 1: "int key", "t": (1, 2), "nan": float("nan")}
    assert orjson.loads(to_json_line(record)) == {"b": "\x00bin\ufffd", "1": "int key", "t": [1, 2], "nan": None}


def test_to_json_line_huge_integer_is_exact() -> None:
    line = to_json_line({"n": 2**70, "s": "\udc80"})
    assert json.loads(line) == {"n": 2**70, "s": "\ufffd"}


def test_to_json_line_deeper_than_orjson_allows() -> None:
    record: dict[str, Any] = {}
    node = record
    for _ in range(400):  # orjson.dumps stops at 254 levels
        node["a"] = {}
        node = node["a"]
    assert json.loads(to_json_line(record)) == record


def test_to_json_line_never_raises_on_absurd_depth() -> None:
    record: dict[str, Any] = {}
    node = record
    for _ in range(100_000):
        node["a"] = {}
        node = node["a"]
    line = to_json_line(record)
    assert line.endswith(b"\n")
    json.loads(line)


def test_to_json_line_of_parsed_fallbacks_round_trips() -> None:
    parser = RecordParser()
    for raw in (b"\xff\xfe oops", b"[1,2]", b'{"a":"\\u00fc"}', nested(600)):
        _, record = parser.parse(raw, now=NOW)
        assert orjson.loads(to_json_line(record)) == record


def test_fast_event_time_is_a_real_event_time() -> None:
    """parse_time writes EventTime's slots directly (hot path): the result must be indistinguishable."""
    assert records._event_time is not EventTime  # the fast constructor is in use with today's EventTime
    for text in ("2026-11-26T12:00:00.000000007Z", "2026-11-26T12:00:00.123456Z", "2026-11-26T13:00:00+01:00"):
        t = parse_time(text)
        assert type(t) is EventTime
        reference = EventTime(t.seconds, t.nanoseconds)
        assert t == reference
        assert hash(t) == hash(reference)
        assert repr(t) == repr(reference)
        assert t.pack() == reference.pack()
        with pytest.raises(AttributeError):
            t.seconds = 1  # type: ignore[misc]
    t = parse_time("2026-11-26T12:00:00.000000007Z")
    assert t is not None
    assert t.to_ns() == T0 * 10**9 + 7
    assert datetime.fromtimestamp(t.seconds, UTC) == datetime(2026, 11, 26, 12, tzinfo=UTC)
