"""records.EntryEncoder: the shipper's per-event fast path gives exactly what parse + pack_entry give."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyforward import records
from pyforward.auditgen import generate_events
from pyforward.protocol import EntryPacker, EventTime
from pyforward.records import MAX_DEPTH, EntryEncoder, RecordParser, RecordStats, _kube_time_head, parse_time

NOW = EventTime(1_700_000_000, 42)


def counters(stats: RecordStats) -> tuple[int, ...]:
    return (
        stats.records,
        stats.parse_errors,
        stats.not_objects,
        stats.invalid_utf8,
        stats.bad_time,
        stats.truncated,
    )


def assert_same(lines: list[bytes], time_key: str = "stageTimestamp") -> None:
    """encode() == pack_entry(*parse()) for every line, and both count the same."""
    reference = RecordParser(time_key=time_key)
    packer = EntryPacker()
    fast = RecordParser(time_key=time_key)
    encoder = EntryEncoder(fast)
    for line in lines:
        expected = packer.pack_entry(*reference.parse(line, now=NOW))
        assert encoder.encode(line, NOW) == expected, line[:200]
    assert counters(fast.stats) == counters(reference.stats)


def event(**fields: Any) -> bytes:
    record = {"kind": "Event", "auditID": "a", "stageTimestamp": "2026-11-26T12:00:00.123456Z", **fields}
    return json.dumps(record, ensure_ascii=False).encode()


def test_audit_corpus() -> None:
    lines = [line.rstrip(b"\n") for line in generate_events(3000, seed=7)]
    assert_same(lines)


@pytest.mark.parametrize(
    "line",
    [
        event(),
        event(stageTimestamp="2026-11-26T12:00:00.123456z"),  # lowercase z: the general path
        event(stageTimestamp="2026-11-26t12:00:00.123456Z"),
        event(stageTimestamp="2026-11-26 12:00:00.123456Z"),
        event(stageTimestamp="2026-11-26T12:00:00.123456789Z"),
        event(stageTimestamp="2026-11-26T12:00:00Z"),
        event(stageTimestamp="2026-11-26T12:00:00.123456+02:00"),
        event(stageTimestamp="2026-02-30T12:00:00.123456Z"),  # no such day
        event(stageTimestamp="2026-11-26T24:00:00.123456Z"),
        event(stageTimestamp="2026-11-26T12:00:00.12345xZ"),
        event(stageTimestamp="2026-11-26T12:00:00.12345٣Z"),  # a non-ASCII digit
        event(stageTimestamp="2106-02-07T06:28:15.999999Z"),  # the last second an EventTime can carry
        event(stageTimestamp="2106-02-07T06:28:16.000000Z"),  # one beyond
        event(stageTimestamp="1969-12-31T23:59:59.000000Z"),
        event(stageTimestamp=""),
        event(stageTimestamp=None),
        event(stageTimestamp=1764158400),
        event(stageTimestamp=["2026-11-26T12:00:00.123456Z"]),
        b'{"kind":"Event"}',  # no time key
        event(latency=0.25),  # a float: the huge-integer test runs, finds none
        event(n=2**64),  # orjson makes it a float: shipped as the raw line
        event(n=-(2**63) - 1),
        event(n=2**64 - 1, m=-(2**63)),  # the edges of what msgpack carries
        event(text="1" * 40, latency=0.5),  # a digit run in a string next to a float
        event(text="ˀ˿"),  # U+02C0 and U+02FF are UTF-8 cb 80 / cb bf: a float64 tag byte in a string
        event(n=0xCBCBCBCB),  # ... and in an integer
        event(nested=json.loads("[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2))),  # as deep as allowed
        event(nested=json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))),  # one level too deep
        event(text="[{" * 600),  # many brackets, all inside a string
        b"[" * 2000 + b"]" * 2000,
        b"not json",
        b"",
        b"[1, 2]",
        b'"just a string"',
        b'{"kind": "Event", "bad": "\xff\xfe"}',  # invalid UTF-8
        event() + b"\r",
        b'{"stageTimestamp":"2026-11-26T12:00:00.123456Z","k":"\\ud800"}',  # a lone surrogate escape
        b"\xef\xbb\xbf" + event(),  # BOM
    ],
)
def test_every_kind_of_line(line: bytes) -> None:
    assert_same([line])


def test_custom_time_key() -> None:
    assert_same([event(requestReceivedTimestamp="2026-11-26T11:59:59.999999Z")], time_key="requestReceivedTimestamp")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes(line: bytes) -> None:
    assert_same([line])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
times = st.one_of(
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2120, 1, 1)).map(
        lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ),
    st.text(max_size=30),
    json_values,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), times)
def test_any_json_object(record: dict[str, Any], stage: Any) -> None:
    record["stageTimestamp"] = stage
    assert_same([json.dumps(record).encode()])


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2106, 2, 7, 6, 28, 15)),
    st.integers(0, 999_999),
)
def test_time_head_agrees_with_parse_time(moment: datetime, micros: int) -> None:
    text = moment.replace(microsecond=micros).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    parsed = parse_time(text)
    assert parsed is not None
    assert _kube_time_head(text) == b"\x92" + parsed.pack()
    expected = moment.replace(microsecond=micros, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    assert parsed.to_ns() == expected // timedelta(microseconds=1) * 1000


# --- the record's msgpack bytes: ormsgpack packs what msgpack-python packs ---------------------------------------

#: Sizes where msgpack changes its encoding (fix*, 8-, 16-, 32-bit lengths and integers).
_EDGES = [0, 1, 15, 16, 31, 32, 127, 128, 255, 256, 65_535, 65_536]
edge_ints = st.sampled_from(
    [sign * (edge + delta) for edge in (*_EDGES, 2**31, 2**32, 2**63) for delta in (-1, 0) for sign in (1, -1)]
).filter(lambda n: -(2**63) <= n < 2**64)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | edge_ints
    | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    | st.sampled_from(_EDGES).map(lambda n: "é" * (n // 2) + "x" * (n % 2)),  # multi-byte UTF-8 at the edges
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(json_like)
def test_fast_record_packing_is_msgpack_byte_for_byte(value: Any) -> None:
    """What EntryEncoder packs records with (ormsgpack where it has a wheel) gives msgpack-python's bytes for every
    value orjson can return: the entries on the wire do not depend on which one packed them."""
    assert records._packb_fast is not None, "ormsgpack is a dependency on this platform (pyproject.toml)"
    assert records._packb_fast(value) == EntryPacker().pack_record(value)


@pytest.mark.parametrize("size", [15, 16, 65_535, 65_536])
def test_fast_record_packing_of_large_maps_and_arrays(size: int) -> None:
    record = {f"k{i}": [None] * (size if i == 0 else 1) for i in range(size)}
    assert records._packb_fast is not None
    assert records._packb_fast(record) == EntryPacker().pack_record(record)
