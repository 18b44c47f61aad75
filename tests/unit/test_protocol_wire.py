"""ServerDecoder against the exact bytes real Forward clients put on the wire.

The fixtures are hand-written hex (annotated), not produced by pyforward's encoder, so a shared
misunderstanding between our encoder and decoder cannot hide here.
"""

from __future__ import annotations

import msgpack
import pytest
from fluent.sender import EventTime as FluentLoggerEventTime
from fluent.sender import FluentSender

from pyforward.protocol import (
    Entry,
    EventTime,
    HealthCheck,
    Mode,
    NotArray,
    Ping,
    ProtocolError,
    Request,
    ServerDecoder,
    encode_ack,
)


def h(text: str) -> bytes:
    """Hex with whitespace and `#` comments allowed."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return bytes.fromhex("".join("".join(lines).split()))


def decode_one(data: bytes, decoder: ServerDecoder | None = None) -> object:
    events = (decoder or ServerDecoder()).feed(data)
    assert len(events) == 1, events
    return events[0]


def decode_bytewise(data: bytes) -> list[object]:
    decoder = ServerDecoder()
    events: list[object] = []
    for i in range(len(data)):
        events.extend(decoder.feed(data[i : i + 1]))
    return events


T1 = EventTime(1_700_000_000, 123_456_789)  # d7 00 6553f100 075bcd15

# fluent-bit 5.1, v1.5 entries ([[EventTime, {metadata}], record]) as its log event encoder writes them:
# dynamic headers, i.e. array32 / map32 even for 2 elements.
FLUENT_BIT_ENTRIES = h("""
    dd00000002                              # array32(2)  entry
      dd00000002                            #   array32(2)  [time, metadata]
        d700 6553f100 075bcd15              #     EventTime(1700000000, 123456789)
        df00000000                          #     map32(0)  metadata
      df00000001 a36c6f67 a568656c6c6f      #   map32(1) {"log": "hello"}
    dd00000002
      dd00000002 d700 6553f101 00000000 df00000000
      df00000002 a36c6f67 a5776f726c64 a673747265616d a67374646f7574   # {"log":"world","stream":"stdout"}
""")
FLUENT_BIT_ENTRIES_GZIP = h(
    "1f8b0800000000000003bbcbc0c0c07417445c67480dfec8c01e7d56f43e90cb00221817e7e4a72fcd48cdc9c9bf8baa8e11"
    "a6044c3081d595e717e5a42c2b2e294a4dcc055229f9a52500dffa6b835e000000"
)
FLUENT_BIT_CHUNK = b"q1Bx3fJ0cY2b5mQpW8zK1A=="  # > 5.0.8: 24-char base64

FLUENT_BIT_EXPECTED = [
    Entry(T1, {"log": "hello"}),
    Entry(EventTime(1_700_000_001, 0), {"log": "world", "stream": "stdout"}),
]


def test_fluent_bit_compressed_packed_forward() -> None:
    assert len(FLUENT_BIT_ENTRIES_GZIP) == 83
    wire = (
        h("93 a9 6b38732e6175646974")  # [ "k8s.audit",
        + h("c4 53")  # bin8(83)
        + FLUENT_BIT_ENTRIES_GZIP
        + h("""
            df00000004                          # options as map32 (flb_mp_map_header)
              a473697a65 02                     # "size": 2
              a56368756e6b b8""")  # "chunk": str(24)
        + FLUENT_BIT_CHUNK
        + h("""
              aa636f6d70726573736564 a4677a6970 # "compressed": "gzip"
              ad666c75656e745f7369676e616c 00   # "fluent_signal": 0
        """)
    )
    request = decode_one(wire)
    assert request == Request(
        tag="k8s.audit",
        mode=Mode.COMPRESSED_PACKED_FORWARD,
        entries=FLUENT_BIT_EXPECTED,
        options={"size": 2, "chunk": FLUENT_BIT_CHUNK.decode(), "compressed": "gzip", "fluent_signal": 0},
        chunk=FLUENT_BIT_CHUNK,
        skipped=0,
    )
    assert decode_bytewise(wire) == [request]
    assert encode_ack(FLUENT_BIT_CHUNK) == h("81 a3 61636b b8") + FLUENT_BIT_CHUNK


def test_fluent_bit_uncompressed_forward_mode_with_old_hex_chunk() -> None:
    # Without compression fluent-bit writes an array header and then its raw entries (Forward mode).
    chunk = b"0123456789abcdef0123456789abcdef"  # <= 5.0.8: 32 hex characters
    wire = (
        h("93 a9 6b38732e6175646974 92")
        + FLUENT_BIT_ENTRIES
        + h("df00000003 a56368756e6b d920")
        + chunk
        + h("a473697a65 02 ad666c75656e745f7369676e616c 00")
    )
    request = decode_one(wire)
    assert isinstance(request, Request)
    assert request.mode is Mode.FORWARD
    assert request.entries == FLUENT_BIT_EXPECTED
    assert request.chunk == chunk
    assert request.skipped == 0


FLUENTD_ENTRIES = h("""
    92 d700 6553f100 00000005 81 a76d657373616765 a56669727374                     # [t, {"message":"first"}]
    92 d700 6553f102 3b9ac9ff 82 a76d657373616765 a67365636f6e64 a56c6576656c a4696e666f
""")
FLUENTD_CHUNK = b"Bf3Gk2nX0cQm8vT1aPzR7w==\n"  # Ruby Base64.encode64: 24 characters plus "\n"
FLUENTD_EXPECTED = [
    Entry(EventTime(1_700_000_000, 5), {"message": "first"}),
    Entry(EventTime(1_700_000_002, 999_999_999), {"message": "second", "level": "info"}),
]


def test_fluentd_out_forward_str32_text() -> None:
    assert len(FLUENTD_ENTRIES) == 64
    wire = (
        h("93 a8 6170702e6c6f6773")  # [ "app.logs",
        + h("db 00000040")  # str32(64): out_forward always writes entries as str32
        + FLUENTD_ENTRIES
        + h("83 a473697a65 02 aa636f6d70726573736564 a474657874 a56368756e6b b9")  # size, compressed:"text", chunk
        + FLUENTD_CHUNK
    )
    request = decode_one(wire)
    assert isinstance(request, Request)
    assert request.mode is Mode.PACKED_FORWARD
    assert request.entries == FLUENTD_EXPECTED
    assert request.chunk == FLUENTD_CHUNK
    assert request.chunk.endswith(b"\n")
    # The ack echoes the id byte for byte, newline included.
    assert encode_ack(request.chunk) == h("81 a3 61636b b9") + FLUENTD_CHUNK
    assert decode_bytewise(wire) == [request]


def test_fluentd_gzip_with_two_members_in_str32() -> None:
    # A compressed fluentd buffer chunk is one gzip member per append, back to back.
    member1 = h("1f8b08000000000002039b749d2135f8230310b0362ecf4d2d2e4e4c4f5d9a9659545c0200814f41f11a000000")
    member2 = h(
        "1f8b08000000000002039b749d2135f82393f5ac93ff9b96e7a6161727a6a72e2b4e4dcecf4b599a935a969ab324332f2d"
        "1f008e5352b426000000"
    )
    blob = member1 + member2
    wire = (
        h("93 a8 6170702e6c6f6773 db")
        + len(blob).to_bytes(4, "big")
        + blob
        + h("83 a473697a65 02 aa636f6d70726573736564 a4677a6970 a56368756e6b b9")
        + FLUENTD_CHUNK
    )
    request = decode_one(wire)
    assert isinstance(request, Request)
    assert request.mode is Mode.COMPRESSED_PACKED_FORWARD
    assert request.entries == FLUENTD_EXPECTED
    assert request.chunk == FLUENTD_CHUNK


def test_fluentd_forward_mode_with_integer_time() -> None:
    # fluentd time_as_integer / v0.12 peers: [tag, [[int, record], ...]] without options.
    wire = h("92 a3 616263 92 92 ce6553f100 81 a161 01 92 01 80")
    assert decode_one(wire) == Request(
        "abc",
        Mode.FORWARD,
        [Entry(EventTime(1_700_000_000), {"a": 1}), Entry(EventTime(1), {})],
        {},
        None,
        0,
    )


def test_node_logger_packed_forward_with_bin_entries() -> None:
    # @fluent-org/logger: [tag, bin(entries), {"size": n, "chunk": "<base64>"}], entries with fixext8 times.
    chunk = b"AAECAwQFBgcICQoLDA0ODw=="
    wire = h("93 a4 6e6f6465 c4 40") + FLUENTD_ENTRIES + h("82 a473697a65 02 a56368756e6b b8") + chunk
    request = decode_one(wire)
    assert isinstance(request, Request)
    assert request.mode is Mode.PACKED_FORWARD
    assert request.entries == FLUENTD_EXPECTED
    assert request.chunk == chunk


def test_fluent_logger_python_message_mode() -> None:
    # The real fluent-logger-python library builds the packet; no socket is opened.
    sender = FluentSender("app", nanosecond_precision=False)
    wire = sender._make_packet("web", 1_700_000_000, {"path": "/", "status": 200})
    assert decode_one(wire) == Request(
        "app.web", Mode.MESSAGE, [Entry(EventTime(1_700_000_000), {"path": "/", "status": 200})], {}, None, 0
    )
    precise = FluentSender("app", nanosecond_precision=True)
    wire = precise._make_packet(None, FluentLoggerEventTime(1_700_000_000, 250), {"x": None})
    request = decode_one(wire)
    assert isinstance(request, Request)
    assert request.entries == [Entry(EventTime(1_700_000_000, 250), {"x": None})]


def test_message_mode_with_chunk_option() -> None:
    wire = h("94 a1 74 d700 00000001 00000002 81 a161 a162 81 a56368756e6b a3 616263")
    assert decode_one(wire) == Request(
        "t", Mode.MESSAGE, [Entry(EventTime(1, 2), {"a": "b"})], {"chunk": "abc"}, b"abc", 0
    )


def test_ext8_event_time_is_accepted_everywhere() -> None:
    ext8 = "c7 08 00 6553f100 075bcd15"  # ext8 instead of fixext8
    message = h(f"93 a1 74 {ext8} 80")
    assert decode_one(message) == Request("t", Mode.MESSAGE, [Entry(T1, {})], {}, None, 0)
    forward = h(f"92 a1 74 91 92 {ext8} 80")
    assert decode_one(forward) == Request("t", Mode.FORWARD, [Entry(T1, {})], {}, None, 0)
    packed = h(f"92 a1 74 c4 0d 92 {ext8} 80")
    assert decode_one(packed) == Request("t", Mode.PACKED_FORWARD, [Entry(T1, {})], {}, None, 0)


def test_v15_time_in_message_mode() -> None:
    wire = h("93 a1 74 92 d700 6553f100 075bcd15 81 a16b a176 81 a161 01")  # [[t, {"k": "v"}], {"a": 1}]
    assert decode_one(wire) == Request("t", Mode.MESSAGE, [Entry(T1, {"a": 1})], {}, None, 0)


def test_non_minimal_headers_everywhere() -> None:
    wire = h("""
        dd00000003                          # array32(3) request
          db00000001 74                     # str32 tag "t"
          dd00000001                        # array32(1) entries
            dc0002                          #   array16(2) entry
              ce00000007                    #     uint32 time 7
              df00000001 da0001 61 d0 05    #     map32 {str16 "a": int8 5}
          de0000                            # map16(0) options
    """)
    assert decode_one(wire) == Request("t", Mode.FORWARD, [Entry(EventTime(7), {"a": 5})], {}, None, 0)


def test_bad_entries_are_skipped_and_counted_rest_kept() -> None:
    wire = h("""
        93 a1 74
        98                                  # 8 entries
          92 01 81 a161 01                  # ok: [1, {"a": 1}]
          92 cb 3ff8000000000000 80         # float time 1.5: invalid per spec
          92 a3 6e6f77 80                   # str time
          92 ff 80                          # negative time
          92 c3 80                          # bool time
          92 02 a3 737472                   # record is not a map
          93 03 80 80                       # three elements
          92 d700 00000004 3b9aca00 80      # nanoseconds = 1e9: not an EventTime
        81 a56368756e6b a178                # {"chunk": "x"}
    """)
    request = decode_one(wire)
    assert request == Request("t", Mode.FORWARD, [Entry(EventTime(1), {"a": 1})], {"chunk": "x"}, b"x", 7)


def test_bad_packed_entries_skipped() -> None:
    entries = h("92 01 80  92 cb 3ff8000000000000 80  c0  92 02 80")
    wire = h("93 a1 74 c4") + bytes([len(entries)]) + entries + h("80")
    request = decode_one(wire)
    assert isinstance(request, Request)
    assert request.entries == [Entry(EventTime(1), {}), Entry(EventTime(2), {})]
    assert request.skipped == 2


@pytest.mark.parametrize(
    ("record_hex", "time_hex"),
    [("a3 737472", "01"), ("c0", "01"), ("91 01", "01"), ("80", "cb 3ff8000000000000")],
    ids=["str-record", "nil-record", "array-record", "float-time"],
)
def test_bad_message_is_skipped_but_chunk_kept(record_hex: str, time_hex: str) -> None:
    wire = h(f"94 a1 74 {time_hex} {record_hex} 81 a56368756e6b a178")
    assert decode_one(wire) == Request("t", Mode.MESSAGE, [], {"chunk": "x"}, b"x", 1)


def test_health_check_not_array_and_stream_continues() -> None:
    wire = h("c0  2a  a568656c6c6f  81 a161 01  92 a1 74 90")
    assert decode_bytewise(wire) == [
        HealthCheck(),
        NotArray(42),
        NotArray("hello"),
        NotArray({"a": 1}),
        Request("t", Mode.FORWARD, [], {}, None, 0),
    ]


def test_ping_from_client_and_ping_tag_is_still_a_request() -> None:
    salt = bytes(range(0xF0, 0x100))  # 16 bytes of invalid UTF-8, as fluent-bit sends it, in a str
    wire = h("96 a4 50494e47 a6 636c69656e74 b0") + salt + h("a3 646967 a0 a0")
    assert decode_one(wire) == Ping(b"client", salt, b"dig", b"", b"")
    # A Message whose tag happens to be "PING" is not a handshake frame.
    message = h("93 a4 50494e47 01 80")
    assert decode_one(message) == Request("PING", Mode.MESSAGE, [Entry(EventTime(1), {})], {}, None, 0)


def test_record_strings_with_invalid_utf8_survive_as_surrogates() -> None:
    wire = h("93 a1 74 01 81 a161 a2 ff41")
    request = decode_one(wire)
    assert isinstance(request, Request)
    value = request.entries[0].record["a"]
    assert value.encode("utf-8", "surrogateescape") == b"\xffA"


def test_bin_tag_and_nil_options_accepted() -> None:
    wire = h("93 c4 01 74 90 c0")  # bin tag, nil options (old Docker)
    assert decode_one(wire) == Request("t", Mode.FORWARD, [], {}, None, 0)


def test_chunk_option_as_bin_is_kept_exactly() -> None:
    wire = h("93 a1 74 90 81 a56368756e6b c4 03 00ff0a")
    request = decode_one(wire)
    assert isinstance(request, Request)
    assert request.chunk == b"\x00\xff\n"


@pytest.mark.parametrize(
    ("wire_hex", "message"),
    [
        ("91 a1 74", "1 elements"),
        ("95 a1 74 01 80 80 80", "5 elements"),
        ("92 a1 74 01", "Message request has 2 elements"),
        ("94 a1 74 90 80 80", "Forward request has 4"),
        ("94 a1 74 c4 00 80 80", "PackedForward request has 4"),
        ("93 01 90 80", "tag must be a string"),
        ("93 a1 74 90 a178", "option must be a map"),
        ("93 a1 74 90 81 a56368756e6b 01", "chunk option must be a string"),
        ("93 a1 74 c4 00 81 aa636f6d70726573736564 a47a737464", "unsupported compression"),
        ("96 a4 50494e47 01 02 03 04 05", "PING hostname"),
        ("c1", "malformed msgpack"),
        ("81 91 01 02", "malformed msgpack"),  # unhashable map key
    ],
)
def test_malformed_requests_raise(wire_hex: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        ServerDecoder().feed(h(wire_hex))


def test_decoder_stays_failed_after_an_error() -> None:
    decoder = ServerDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(h("91 a1 74"))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(h("c0"))


def test_deep_nesting_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        ServerDecoder().feed(b"\x91" * 5000 + b"\xc0")


def test_independent_msgpack_agrees_on_fixture_shapes() -> None:
    # Sanity check of the hand-written fixtures with a plain msgpack decoder.
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(FLUENTD_ENTRIES)
    decoded = list(unpacker)
    assert [entry[1] for entry in decoded] == [e.record for e in FLUENTD_EXPECTED]
    assert decoded[1][0] == msgpack.ExtType(0, h("6553f102 3b9ac9ff"))
