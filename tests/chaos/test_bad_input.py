"""Bad input at the tailer, through a real `pyforward run` -> `pyforward receive`: binary garbage, NUL bytes, invalid
UTF-8, empty lines, a 64 MiB line, JSON that is not an object, 10,000 levels of nesting, huge numbers, duplicate
keys, a bad time. None stops the stream (valid events around them arrive), each is shipped as specified in
records.py (the object as is, else ``{"log": <line>}``, a long line cut and marked), and each is counted in
/metrics (pyforward_parse_errors_total{kind}, pyforward_truncated_lines_total).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from tests.chaos.conftest import Figures
from tests.chaos.tools import MODES, ScriptedReceiver, proc_status
from tests.harness import Harness, free_port, metrics, wait_for

pytestmark = pytest.mark.chaos

MAX_LINE = 64 << 10
HUGE_LINE = 64 << 20


def nested(levels: int, kind: str, key: bytes = b"a") -> bytes:
    if kind == "object":
        return (b'{"' + key + b'":') * levels + b"1" + b"}" * levels
    return b"[" * levels + b"]" * levels


def garbage(seed: int, size: int) -> bytes:
    data = random.Random(seed).randbytes(size).replace(b"\n", b" ")
    return data[: size // 2] + b"BAD-garbage" + data[size // 2 :]


# name -> (line, kind counted in pyforward_parse_errors_total or "truncated" or None, how it must arrive)
# "arrives": ("object", auditID) -- shipped as the JSON object; ("log", marker) -- as {"log": ...} containing marker.
BAD: dict[str, tuple[bytes, str | None, tuple[str, str]]] = {
    "binary garbage": (garbage(1, 4096), "invalid_utf8", ("log", "BAD-garbage")),
    "NUL bytes": (b"\0" * 100 + b"BAD-nul" + b"\0" * 100, "json", ("log", "\0\0BAD-nul")),
    "NUL inside a JSON string": (b'{"auditID":"bad-nul","x":"a\0b"}', "json", ("log", "bad-nul")),
    "invalid UTF-8 in JSON": (b'{"auditID":"bad-utf8","user":"\xff\xfe\xc3"}', "invalid_utf8", ("log", "bad-utf8")),
    "empty line": (b"", "json", ("log", "")),
    "CR only": (b"\r", "json", ("log", "")),
    "JSON array": (b'["BAD-array", 1, 2]', "not_object", ("log", "BAD-array")),
    "JSON number": (b"12345.5e3", "not_object", ("log", "12345.5e3")),
    "JSON string": (b'"BAD-string"', "not_object", ("log", "BAD-string")),
    "JSON null": (b"null", "not_object", ("log", "null")),
    "10,000 nested objects": (nested(10_000, "object"), "json", ("log", '{"a":{"a":')),
    "10,000 nested arrays": (nested(10_000, "array"), "json", ("log", "[[[[")),
    "600 nested objects (> MAX_DEPTH 512)": (nested(600, "object", b"b"), "json", ("log", '{"b":{"b":')),
    "integer of 400 digits": (b'{"auditID":"bad-bigint","n":' + b"9" * 400 + b"}", "json", ("log", "bad-bigint")),
    "integer just above uint64": (b'{"auditID":"bad-u64","n":18446744073709551616}', "json", ("log", "bad-u64")),
    "uint64 max (valid)": (b'{"auditID":"bad-u64max","n":18446744073709551615}', None, ("object", "bad-u64max")),
    "float 1e400": (b'{"auditID":"bad-inf","n":1e400}', "json", ("log", "bad-inf")),
    "NaN": (b'{"auditID":"bad-nan","n":NaN}', "json", ("log", "bad-nan")),
    "duplicate keys": (b'{"auditID":"bad-dupkeys","verb":"get","verb":"list"}', None, ("object", "bad-dupkeys")),
    "UTF-8 BOM": (b'\xef\xbb\xbf{"auditID":"bad-bom"}', "json", ("log", "bad-bom")),
    "lone surrogate escape": (b'{"auditID":"bad-surrogate","x":"\\ud800"}', "json", ("log", "bad-surrogate")),
    "bad stageTimestamp": (b'{"auditID":"bad-time","stageTimestamp":"yesterday"}', "bad_time", ("object", "bad-time")),
    "CRLF ending": (b'{"auditID":"bad-crlf"}\r', None, ("object", "bad-crlf")),
    "64 MiB line": (b'{"auditID":"bad-huge","pad":"' + b"x" * HUGE_LINE + b'"}', "truncated", ("log", "bad-huge")),
}


def arrived(records: list[dict[str, Any]], how: tuple[str, str]) -> list[dict[str, Any]]:
    form, key = how
    if form == "object":
        return [r for r in records if r.get("auditID") == key]
    return [r for r in records if set(r) - {"pyforward_truncated", "pyforward_original_bytes"} == {"log"}
            and (key in r["log"] if key else r["log"] == "")]  # fmt: skip


def test_bad_lines_never_stop_the_stream_and_each_is_shipped_and_counted(harness: Harness, figures: Figures) -> None:
    receiver = harness.receiver("plain")
    writer = harness.audit_log()
    bind = f"127.0.0.1:{free_port()}"
    run = harness.run(harness.run_env(receiver, max_line_bytes=MAX_LINE, metrics_bind=bind))
    output = receiver.received()
    for line, _, _ in BAD.values():
        writer.write(3)  # valid events between the bad lines: the stream must go on around each of them
        writer.log.write_many([line])
    writer.write(3)
    harness.wait_delivered(writer.ids, output, run=run, timeout=120)

    expected: dict[str, float] = {}
    for _, kind, _ in BAD.values():
        if kind is not None:
            expected[kind] = expected.get(kind, 0) + 1

    def counted() -> dict[str, float] | None:
        values = metrics(bind)
        got = {kind: values.get(f'pyforward_parse_errors_total{{kind="{kind}"}}', 0.0) for kind in expected}
        got["truncated"] = values.get("pyforward_truncated_lines_total", 0.0)
        return got if got == expected else None

    try:
        wait_for(counted, 30, what=f"the counters {expected}")
    except AssertionError:
        values = metrics(bind)
        raise AssertionError({k: v for k, v in values.items() if "parse_errors" in k or "truncated" in k}) from None

    records = receiver.received().records()
    for name, (_, _, how) in BAD.items():
        found = arrived(records, how)
        if how == ("log", ""):
            assert len(found) >= 1, f"{name}: not shipped"
        else:
            assert len(found) == 1, f"{name}: {len(found)} records match {how}"
    (huge,) = arrived(records, BAD["64 MiB line"][2])
    assert huge["pyforward_truncated"] is True
    assert huge["pyforward_original_bytes"] == len(BAD["64 MiB line"][0])
    assert len(huge["log"].encode()) == MAX_LINE
    assert len([r for r in records if r == {"log": ""}]) == 2  # the empty line and the lone CR
    (dup,) = arrived(records, ("object", "bad-dupkeys"))
    assert dup["verb"] == "list"  # the last one wins, as in most JSON parsers (RFC 8259 leaves it open)
    peak = proc_status(run.pid, "VmHWM")
    assert peak < 200 * 1024, f"pyforward run peaked at {peak} KiB for a 64 MiB line with a 64 KiB limit"
    assert run.alive
    assert run.terminate() == 0
    assert not [e for e in run.logs(all_runs=True) if e.get("level") == "error"], "an error was logged"
    figures.update(
        scenario="bad lines between valid events (run -> receive)",
        group="bad input", inputs=len(BAD), written=len(writer.ids), lost=0, duplicated=0,
        limits=f"64 MiB line cut to {MAX_LINE >> 10} KiB and marked; peak RSS of run {peak >> 10} MiB; "
        f"counters {json.dumps(expected, sort_keys=True)}",
        notes="; ".join(BAD),
    )  # fmt: skip


def test_chunk_max_records_is_a_hard_cap(harness: Harness, figures: Figures) -> None:
    """PYFORWARD_CHUNK_MAX_RECORDS bounds every request: receivers cap entries per request (pyforward receive and
    fluentd: 1,000,000), so a chunk above the cap is refused on every retry and the stream stops for good. Tiny
    lines (empty ones: 1 byte of source each) make that reachable; here 100 records per chunk, 2,000 empty lines."""
    receiver = ScriptedReceiver().start()
    try:
        writer = harness.audit_log()
        writer.log.write_many([b""] * 2000)
        ids = writer.write(10)
        run = harness.run(harness.run_env(port=receiver.port, chunk_max_records=100, chunk_max_bytes=1 << 20))
        wait_for(lambda: receiver.has_all(ids), 60, what="the events after the empty lines")
        assert run.terminate() == 0
        assert receiver.max_records <= 100, f"a request carried {receiver.max_records} records (cap 100)"
    finally:
        receiver.stop()
    figures.update(
        scenario="2,000 empty lines with chunk_max_records 100", group="bad input", inputs=2000,
        written=len(ids), lost=0, limits=f"largest request {receiver.max_records} records (cap 100)",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_over_a_million_empty_lines_do_not_stop_the_stream(harness: Harness, figures: Figures) -> None:
    """1.2 million empty lines (1.2 MB) with the default chunk settings, then valid events, to `pyforward receive`:
    with the cap not enforced (before the fix) the first chunk held ~1,048,576 records, beyond the receiver's
    1,000,000, and was refused on every retry."""
    receiver = harness.receiver("plain")
    writer = harness.audit_log()
    writer.log.write_many([b""] * 1_200_000)
    ids = writer.write(10)
    run = harness.run(harness.run_env(receiver, ack_timeout=10))
    output = receiver.received()
    harness.wait_delivered(ids, output, run=run, timeout=90)
    assert run.terminate() == 0
    wait_for(lambda: output.refresh() is not None and output.lines >= 1_200_010, 30, what="every empty line")
    figures.update(
        scenario="1,200,000 empty lines, default chunk settings (run -> receive)", group="bad input", mode="long",
        inputs=1_200_000, written=len(ids), lost=0,
        limits=f"{output.lines:,} lines written by the receiver; no request above 10,000 records",
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_no_line_shape_stops_the_stream(harness: Harness, figures: Figures, mode: str) -> None:
    """Random junk lines (random bytes, random lengths up to 3x the line limit, random JSON-ish fragments) mixed
    with valid events: every valid event arrives, every junk line is shipped (as {"log": ...}, cut if long)."""
    lines_count = {"ci": 300, "long": 5000}[mode]
    rng = random.Random(7)
    receiver = harness.receiver("plain")
    writer = harness.audit_log(max_bytes=1 << 20)
    run = harness.run(harness.run_env(receiver, max_line_bytes=4096, chunk_max_bytes=16 << 10, window=4))
    output = receiver.received()
    fragments = [b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b"\0", b"\xff", b"\xc3", b"\xe2\x82", b"1e999",
                 b"true", b"\r", b" ", b'"auditID"']  # fmt: skip
    junk = 0
    for i in range(lines_count):
        if rng.random() < 0.5:
            line = rng.randbytes(rng.randrange(0, 3 * 4096)).replace(b"\n", b"")
        else:
            line = b"".join(rng.choice(fragments) for _ in range(rng.randrange(0, 200)))
        writer.log.write_many([line])
        junk += 1
        if i % 10 == 0:
            writer.write(2)
    writer.write(5)
    harness.wait_delivered(writer.ids, output, run=run, timeout=120)
    wait_for(lambda: output.refresh() is not None and output.lines >= len(writer.ids) + junk, 30,
             what="every junk line shipped")  # fmt: skip
    assert run.terminate() == 0
    assert output.lines == len(writer.ids) + junk
    figures.update(
        scenario="random junk lines (bytes, JSON fragments, up to 3x the line limit)",
        group="bad input", inputs=junk, written=len(writer.ids), lost=0,
        duplicated=output.lines - len(writer.ids) - junk,
        limits="every line shipped exactly once (as a record or {\"log\": ...}), the stream never stopped",
    )  # fmt: skip
