"""Property-based round trips: every encoder against the streaming decoders, fed at random split points."""

from __future__ import annotations

import gzip
import hashlib
from typing import Any

import msgpack
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from pyforward.protocol import (
    Ack,
    ClientDecoder,
    Entry,
    EntryPacker,
    EventTime,
    HealthCheck,
    Helo,
    Mode,
    NotArray,
    Ping,
    ProtocolError,
    Request,
    ServerDecoder,
    build_chunk,
    encode_ack,
    encode_compressed_packed_forward,
    encode_forward,
    encode_helo,
    encode_message,
    encode_packed_forward,
    encode_ping,
    gzip_compress,
    make_ping,
    verify_ping,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])
FEWER = settings(FAST, max_examples=20)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
records = st.dictionaries(st.text(max_size=8), values, max_size=4)
event_times = st.builds(EventTime, st.integers(0, 2**32 - 1), st.integers(0, 10**9 - 1))
times = event_times | st.integers(0, 2**32 - 1)
tags = st.text(min_size=1, max_size=30)
entry_lists = st.lists(st.tuples(times, records), max_size=5)
chunk_ids = st.none() | st.text(min_size=1, max_size=30)


def as_event_time(value: EventTime | int) -> EventTime:
    return value if isinstance(value, EventTime) else EventTime(value)


def split_feed(decoder: ServerDecoder | ClientDecoder, wire: bytes, cuts: list[int]) -> list[Any]:
    events: list[Any] = []
    previous = 0
    for cut in [*sorted(cuts), len(wire)]:
        events.extend(decoder.feed(wire[previous:cut]))
        previous = cut
    return events


def encode(mode: Mode, tag: str, entries: list[tuple[EventTime | int, dict[str, Any]]], chunk: str | None) -> bytes:
    options = None if chunk is None else {"chunk": chunk}
    if mode is Mode.MESSAGE:
        entry_time, record = entries[0]
        return encode_message(tag, entry_time, record, options)
    if mode is Mode.FORWARD:
        return encode_forward(tag, entries, options)
    packer = EntryPacker()
    blob = b"".join(packer.pack_entry(t, r) for t, r in entries)
    if mode is Mode.PACKED_FORWARD:
        return encode_packed_forward(tag, blob, options)
    return encode_compressed_packed_forward(tag, gzip_compress(blob), options)


def expected_request(
    mode: Mode, tag: str, entries: list[tuple[EventTime | int, dict[str, Any]]], chunk: str | None
) -> Request:
    options: dict[str, Any] = {} if chunk is None else {"chunk": chunk}
    if mode is Mode.COMPRESSED_PACKED_FORWARD:
        options["compressed"] = "gzip"
    return Request(
        tag=tag,
        mode=mode,
        entries=[Entry(as_event_time(t), r) for t, r in entries],
        options=options,
        chunk=None if chunk is None else chunk.encode(),
        skipped=0,
    )


@FAST
@given(tag=tags, entries=entry_lists, mode=st.sampled_from(Mode), chunk=chunk_ids, data=st.data())
def test_every_mode_round_trips_at_any_split(
    tag: str,
    entries: list[tuple[EventTime | int, dict[str, Any]]],
    mode: Mode,
    chunk: str | None,
    data: st.DataObject,
) -> None:
    if mode is Mode.MESSAGE:
        entries = entries[:1] or [(0, {})]
    wire = encode(mode, tag, entries, chunk)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    assert split_feed(ServerDecoder(), wire, cuts) == [expected_request(mode, tag, entries, chunk)]


@FEWER
@given(
    requests=st.lists(st.tuples(st.sampled_from(Mode), tags, entry_lists, chunk_ids), min_size=1, max_size=4),
    data=st.data(),
)
def test_a_stream_of_requests_and_health_checks(
    requests: list[tuple[Mode, str, list[tuple[EventTime | int, dict[str, Any]]], str | None]],
    data: st.DataObject,
) -> None:
    wire = b""
    expected: list[object] = []
    for mode, tag, entries, chunk in requests:
        if mode is Mode.MESSAGE:
            entries = entries[:1] or [(1, {"x": 1})]
        wire += encode(mode, tag, entries, chunk) + b"\xc0"
        expected += [expected_request(mode, tag, entries, chunk), HealthCheck()]
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    assert split_feed(ServerDecoder(), wire, cuts) == expected


@FEWER
@given(entries=entry_lists, members=st.integers(1, 5), compress=st.booleans(), data=st.data())
def test_build_chunk_round_trips_and_multi_member_gzip(
    entries: list[tuple[EventTime | int, dict[str, Any]]], members: int, compress: bool, data: st.DataObject
) -> None:
    packer = EntryPacker()
    packed = [packer.pack_entry(t, r) for t, r in entries]
    chunk = build_chunk("k8s.audit", b"".join(packed), len(packed), size=1, compress=compress)
    request = ServerDecoder().feed(chunk.payload)[0]
    assert isinstance(request, Request)
    assert request.chunk == chunk.chunk_id_bytes
    assert request.entries == [Entry(as_event_time(t), r) for t, r in entries]
    # The same entries as several gzip members back to back (fluentd's compressed buffer).
    bounds = sorted(data.draw(st.lists(st.integers(0, len(packed)), min_size=members - 1, max_size=members - 1)))
    groups = [packed[a:b] for a, b in zip([0, *bounds], [*bounds, len(packed)], strict=True)]
    blob = b"".join(gzip.compress(b"".join(group)) for group in groups)
    request = ServerDecoder().feed(encode_compressed_packed_forward("t", blob))[0]
    assert isinstance(request, Request)
    assert request.entries == [Entry(as_event_time(t), r) for t, r in entries]


@FAST
@given(ns=st.integers(0, (2**32) * 10**9 - 1))
def test_event_time_ns_round_trip(ns: int) -> None:
    t = EventTime.from_ns(ns)
    assert t.to_ns() == ns
    assert msgpack.unpackb(t.pack()) == t.to_ext()
    request = ServerDecoder().feed(encode_message("t", t, {}))[0]
    assert isinstance(request, Request)
    assert request.entries[0].time == t


@FAST
@given(raw=st.dictionaries(st.binary(max_size=10), st.binary(max_size=20), max_size=4))
def test_record_strings_with_arbitrary_bytes_round_trip_exactly(raw: dict[bytes, bytes]) -> None:
    # Peer strings that are not valid UTF-8 come out surrogate-escaped and go back out byte for byte.
    record_bytes = _raw_str_map(raw)
    wire = b"\x93\xa1t\x01" + record_bytes
    request = ServerDecoder().feed(wire)[0]
    assert isinstance(request, Request)
    record = request.entries[0].record
    as_bytes = {k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape") for k, v in record.items()}
    assert as_bytes == raw
    assert EntryPacker().pack_entry(1, record) == b"\x92\x01" + record_bytes


def _raw_str_map(raw: dict[bytes, bytes]) -> bytes:
    def raw_str(data: bytes) -> bytes:
        assert len(data) < 32
        return bytes([0xA0 | len(data)]) + data

    return bytes([0x80 | len(raw)]) + b"".join(raw_str(k) + raw_str(v) for k, v in raw.items())


@FAST
@given(
    nonce=st.binary(min_size=1, max_size=32),
    auth=st.binary(max_size=32),
    salt=st.binary(min_size=1, max_size=32),
    hostname=st.text(min_size=1, max_size=20),
    key=st.text(max_size=20),
    username=st.text(max_size=10),
    password=st.text(max_size=10),
)
def test_handshake_digests_and_wire_round_trip(
    nonce: bytes, auth: bytes, salt: bytes, hostname: str, key: str, username: str, password: str
) -> None:
    helo = Helo(nonce, auth)
    (decoded_helo,) = ClientDecoder().feed(encode_helo(helo))
    assert decoded_helo == helo
    ping = make_ping(helo, hostname=hostname, shared_key=key, username=username, password=password, salt=salt)
    expected = hashlib.sha512(salt + hostname.encode() + nonce + key.encode()).hexdigest().encode()
    assert ping.shared_key_digest == expected
    (decoded_ping,) = ServerDecoder().feed(encode_ping(ping))
    assert decoded_ping == ping
    users = {username: password} if auth else {}
    assert verify_ping(ping, nonce=nonce, shared_key=key, auth=auth, users=users) is None
    assert verify_ping(ping, nonce=nonce, shared_key=key + "x", auth=auth, users=users) == "shared_key mismatch"


@FAST
@given(chunks=st.lists(st.binary(max_size=40), max_size=5), data=st.data())
def test_acks_round_trip_byte_exact(chunks: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(encode_ack(chunk) for chunk in chunks)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    assert split_feed(ClientDecoder(), wire, cuts) == [Ack(chunk) for chunk in chunks]


@settings(FAST, max_examples=200)
@given(garbage=st.binary(max_size=300))
def test_garbage_only_ever_raises_protocol_error(garbage: bytes) -> None:
    for decoder in (ServerDecoder(max_request_bytes=4096, max_entries=100), ClientDecoder(max_buffer=4096)):
        try:
            events = decoder.feed(garbage)
        except ProtocolError:
            continue
        assert isinstance(events, list)


@settings(FAST, max_examples=35)
@given(mode=st.sampled_from(Mode), entries=entry_lists, data=st.data())
def test_corrupted_requests_only_ever_raise_protocol_error(
    mode: Mode, entries: list[tuple[EventTime | int, dict[str, Any]]], data: st.DataObject
) -> None:
    if mode is Mode.MESSAGE:
        entries = entries[:1] or [(0, {})]
    wire = bytearray(encode(mode, "tag", entries, "chunk"))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(wire) - 1))
        wire[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        events = ServerDecoder(max_request_bytes=1 << 16, max_entries=1000).feed(bytes(wire[:cut]))
    except ProtocolError:
        return
    for event in events:
        assert isinstance(event, (Request, HealthCheck, NotArray, Ping))
