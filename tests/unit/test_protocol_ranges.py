"""The ``pyforward.*`` record-range options (issue 22): encoded by build_chunk, decoded by ServerDecoder, checked by
parse_ranges; every hostile value is a RangeError, never another exception."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyforward.protocol import (
    OPTION_LENGTHS,
    OPTION_OFFSET,
    OPTION_SOURCE,
    EntryPacker,
    EventTime,
    RangeError,
    Request,
    ServerDecoder,
    build_chunk,
    encode_forward,
    parse_ranges,
    range_options,
)
from pyforward.protocol._ranges import MAX_OFFSET

SOURCE = "2049:131077:0123456789abcdef"
sources = st.builds(
    lambda dev, ino, h: f"{dev}:{ino}:{h:016x}",
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)
lengths_lists = st.lists(st.integers(1, 2**32), min_size=1, max_size=50)


def _decode(payload: bytes) -> Request:
    (request,) = ServerDecoder().feed(payload)
    assert isinstance(request, Request)
    return request


@settings(max_examples=100, deadline=None)
@given(source=sources, offset=st.integers(0, 2**40), lengths=lengths_lists, compress=st.booleans())
def test_build_chunk_round_trip(source: str, offset: int, lengths: list[int], compress: bool) -> None:
    packer = EntryPacker()
    entries = b"".join(packer.pack_entry(EventTime(1, 2), {"n": i}) for i in range(len(lengths)))
    chunk = build_chunk(
        "t", entries, len(lengths), size=sum(lengths), compress=compress, extra=range_options(source, offset, lengths)
    )
    request = _decode(chunk.payload)
    assert request.chunk == chunk.chunk_id_bytes
    ranges = parse_ranges(request.options, len(request.entries))
    assert ranges is not None
    assert (ranges.source, ranges.offset, list(ranges.lengths)) == (source, offset, lengths)
    assert ranges.end == offset + sum(lengths)


def test_no_options_is_none() -> None:
    request = _decode(build_chunk("t", EntryPacker().pack_entry(1, {"a": 1}), 1, size=2, compress=False).payload)
    assert parse_ranges(request.options, 1) is None


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 1000), lengths=st.lists(st.integers(1, 50), min_size=1, max_size=30), data=st.data())
def test_ends_at_or_before_matches_the_definition(offset: int, lengths: list[int], data: st.DataObject) -> None:
    ranges = parse_ranges(range_options(SOURCE, offset, lengths), len(lengths))
    assert ranges is not None
    mark = data.draw(st.integers(0, offset + sum(lengths) + 10))
    ends = [offset + sum(lengths[: i + 1]) for i in range(len(lengths))]
    count = ranges.ends_at_or_before(mark)
    assert count == sum(1 for end in ends if end <= mark)
    assert ranges.bytes_of(count) == sum(lengths[:count])


@pytest.mark.parametrize(
    ("options", "entries", "message"),
    [
        ({OPTION_SOURCE: SOURCE}, 1, "without pyforward.offset, pyforward.lengths"),
        ({OPTION_SOURCE: "x", OPTION_OFFSET: 0, OPTION_LENGTHS: [1]}, 1, "not <dev>:<ino>"),
        ({OPTION_SOURCE: SOURCE.upper(), OPTION_OFFSET: 0, OPTION_LENGTHS: [1]}, 1, "not <dev>:<ino>"),
        ({OPTION_SOURCE: b"2049:1:0123456789abcdef", OPTION_OFFSET: 0, OPTION_LENGTHS: [1]}, 1, "not <dev>"),
        ({OPTION_SOURCE: "1" * 30 + ":1:0123456789abcdef", OPTION_OFFSET: 0, OPTION_LENGTHS: [1]}, 1, "not <dev>"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: -1, OPTION_LENGTHS: [1]}, 1, "not an offset"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: True, OPTION_LENGTHS: [1]}, 1, "not an offset"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 1.5, OPTION_LENGTHS: [1]}, 1, "not an offset"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: MAX_OFFSET + 1, OPTION_LENGTHS: [1]}, 1, "not an offset"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 0, OPTION_LENGTHS: b"\x01"}, 1, "not an array"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 0, OPTION_LENGTHS: [1, 2]}, 1, "2 record lengths for 1 records"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 0, OPTION_LENGTHS: []}, 0, "empty request"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 0, OPTION_LENGTHS: [0]}, 1, "not a positive length"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 0, OPTION_LENGTHS: [-5]}, 1, "not a positive length"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 0, OPTION_LENGTHS: ["7"]}, 1, "not a positive length"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: 0, OPTION_LENGTHS: [False]}, 1, "not a positive length"),
        ({OPTION_SOURCE: SOURCE, OPTION_OFFSET: MAX_OFFSET - 1, OPTION_LENGTHS: [1, 1]}, 2, "beyond any file offset"),
    ],
)
def test_nonsense_is_a_range_error(options: dict[str, Any], entries: int, message: str) -> None:
    with pytest.raises(RangeError, match=message):
        parse_ranges(options, entries)


def test_skipped_entries_with_ranges_are_an_error() -> None:
    with pytest.raises(RangeError, match="malformed entries"):
        parse_ranges(range_options(SOURCE, 0, [1, 1]), 1, skipped=1)


_any_msgpack = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=80)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    source=_any_msgpack | sources,
    offset=_any_msgpack | st.integers(-(2**63), 2**64 - 1),
    lengths=_any_msgpack | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5),
    present=st.sets(st.sampled_from([OPTION_SOURCE, OPTION_OFFSET, OPTION_LENGTHS])),
    entries=st.integers(0, 6),
)
def test_fuzzed_options_through_the_decoder(
    source: object, offset: object, lengths: object, present: set[str], entries: int
) -> None:
    """Whatever a hostile sender puts in the options (any msgpack value, on the wire): ranges that hold, None, or a
    RangeError; nothing else escapes."""
    values = {OPTION_SOURCE: source, OPTION_OFFSET: offset, OPTION_LENGTHS: lengths}
    options = {key: values[key] for key in present}
    records = [(EventTime(1), {"i": i}) for i in range(entries)]
    payload = encode_forward("t", records, {"chunk": "c", **options})
    (request,) = ServerDecoder().feed(payload)
    assert isinstance(request, Request)
    try:
        ranges = parse_ranges(request.options, len(request.entries), request.skipped)
    except RangeError:
        return
    if ranges is None:
        assert not present
        return
    assert len(ranges.lengths) == entries >= 1
    assert all(type(n) is int and n >= 1 for n in ranges.lengths)
    assert 0 <= ranges.offset < ranges.end <= MAX_OFFSET


def test_options_are_small() -> None:
    """What the ranges add to a chunk of typical audit lines (~1.5 KiB): 3 bytes a record plus ~90 (docs)."""
    lengths = [1500 + i % 700 for i in range(300)]
    extra = msgpack.packb(range_options(SOURCE, 123_456_789, lengths))
    assert len(extra) <= 3 * len(lengths) + 100
