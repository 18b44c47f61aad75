"""`pyforward run` end to end, line by line: copy-truncate, partial lines, long lines, invalid JSON and UTF-8.

Real `pyforward receive` and `pyforward run` processes; the audit log is written with raw ``os.write`` calls where
the exact bytes and their timing matter.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import orjson

from pyforward.auditgen import audit_id
from tests.harness import Harness, assert_delivered, free_port, holds_for, try_metrics, wait_for

SMALL = {"chunk_max_bytes": 16 << 10, "chunk_max_records": 25, "max_line_bytes": 64 << 10}


def append(path: Path, data: bytes) -> None:
    """One write(2), O_APPEND, as kube-apiserver's lumberjack writer does."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def output_records(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


# ------------------------------------------------------------------------------------------------ truncation


def test_copy_truncate_logs_the_lost_bytes_and_ships_later_lines(harness: Harness) -> None:
    """copytruncate (logrotate): audit.log is copied to audit.log.1 (a name pyforward does not read) and truncated
    while the shipper is behind. The bytes it never read are logged as lost -- exactly as many as the events that
    never arrived -- and the lines written after the truncation are shipped."""
    receiver = harness.receiver("plain")
    receiver.pause()
    metrics_bind = f"127.0.0.1:{free_port()}"
    writer = harness.audit_log()
    # Receiver paused (nothing acked) and a 64 KiB in-flight budget: the shipper reads its first 1 MiB block, fills
    # the budget and stops reading; the rest of the 2 MB is still only in the file when it is truncated.
    lines = writer.events(2000)
    writer.write_lines(lines)
    run = harness.run(
        harness.run_env(receiver, chunk_max_bytes=16 << 10, chunk_max_records=25, max_line_bytes=16 << 10,
                        max_inflight_bytes=64 << 10, ack_timeout=60, metrics_bind=metrics_bind)
    )
    run.wait_until(lambda: try_metrics(metrics_bind).get("pyforward_inflight_bytes", 0) >= 48 << 10,
                   what="the in-flight budget to fill up")
    shutil.copyfile(harness.log_path, harness.logdir / "audit.log.1")
    os.truncate(harness.log_path, 0)
    receiver.resume()
    output = receiver.received()
    match = run.wait_log(r"was truncated or rewritten \(now \d+ bytes, we had read (\d+)\): (\d+) bytes that had not "
                         r"been shipped are lost", level="error")
    logged_lost = int(match.group(2))
    later = writer.write(200)  # audit.log goes on from its new start
    harness.wait_delivered(later, output, run=run)
    run.wait_until(lambda: try_metrics(metrics_bind).get("pyforward_truncation_lost_bytes_total") == logged_lost,
                   what="the lost bytes to be counted in the metrics")
    assert run.terminate() == 0

    received = output.refresh()
    before = writer.ids[: len(lines)]
    arrived = [i for i in before if i in received]
    assert 0 < len(arrived) < len(before)
    # What arrived is a prefix of the file (everything read before the truncation), each once ...
    assert arrived == before[: len(arrived)]
    assert_delivered(arrived + later, received)
    # ... and the log line counts exactly the bytes of the events that never arrived.
    never_arrived = sum(len(line) for line in lines[len(arrived) :])
    assert logged_lost == never_arrived
    assert int(match.group(1)) == 1 << 20  # it had read one block: the in-flight bound held


def test_copy_truncate_with_a_backup_name_loses_nothing(harness: Harness) -> None:
    """The same truncation, but the copy carries a rotated-backup name (audit-<time>.log): the shipper reads the
    rest from the copy at its offset, then the truncated live file from its start; nothing is lost or doubled."""
    receiver = harness.receiver("plain")
    receiver.pause()
    metrics_bind = f"127.0.0.1:{free_port()}"
    writer = harness.audit_log()
    writer.write(2000)
    run = harness.run(
        harness.run_env(receiver, chunk_max_bytes=16 << 10, chunk_max_records=25, max_line_bytes=16 << 10,
                        max_inflight_bytes=64 << 10, ack_timeout=60, metrics_bind=metrics_bind)
    )
    run.wait_until(lambda: try_metrics(metrics_bind).get("pyforward_inflight_bytes", 0) >= 48 << 10,
                   what="the in-flight budget to fill up")
    shutil.copyfile(harness.log_path, harness.logdir / "audit-2026-11-26T12-00-00.000.log")
    os.truncate(harness.log_path, 0)
    receiver.resume()
    output = receiver.received()
    run.wait_log(r"was truncated \(copy-truncate\): reading the rest from its copy", level="warning")
    later = writer.write(200)
    harness.wait_delivered(writer.ids, output, run=run)
    assert run.terminate() == 0
    assert_delivered(writer.ids, output.refresh(), context="copy-truncate with a recognised copy")
    assert run.find_log(r"bytes that had not been shipped are lost") is None
    assert later


def test_truncated_and_rewritten_longer_while_caught_up(harness: Harness) -> None:
    """The live file is truncated and at once rewritten with more bytes than had been read (a size check alone
    misses that: fluent-bit #9580): the changed head gives it away, the new lines are shipped from the start,
    nothing was unread so nothing is reported lost, and no old line is sent again."""
    receiver = harness.receiver("plain")
    run = harness.run(harness.run_env(receiver, **SMALL))
    output = receiver.received()
    writer = harness.audit_log()
    old = writer.write(50)
    harness.wait_delivered(old, output, run=run)
    old_size = harness.log_path.stat().st_size
    new_lines = writer.events(100)
    data = b"".join(new_lines)
    assert len(data) > old_size
    with harness.log_path.open("r+b") as f:  # truncate and rewrite in place, before the shipper looks again
        f.truncate(0)
        f.write(data)
    writer.lines.extend(new_lines)
    writer.ids.extend(audit_id(line) for line in new_lines)
    match = run.wait_log(r"was truncated or rewritten .*: (\d+) bytes that had not been shipped are lost")
    assert int(match.group(1)) == 0
    harness.wait_delivered(writer.ids, output, run=run)
    assert run.terminate() == 0
    assert_delivered(writer.ids, output.refresh())


# ------------------------------------------------------------------------------------------------ partial lines


def test_partial_line_is_shipped_once_whole_after_its_newline(harness: Harness) -> None:
    """A line written in two parts with a pause between them goes out once, whole, after its newline."""
    receiver = harness.receiver("plain")
    run = harness.run(harness.run_env(receiver, **SMALL))
    output = receiver.received()
    writer = harness.audit_log()
    first, second, third = writer.events(3)
    ids = [audit_id(x) for x in (first, second, third)]
    cut = len(second) // 2
    # The first line and half of the second in one write: once the first arrives, the shipper has read the half.
    append(harness.log_path, first + second[:cut])
    harness.wait_delivered(ids[:1], output, run=run)
    # The pause: many flush intervals (5 ms); the half line must not go out on its own.
    holds_for(lambda: output.refresh() == {ids[0]: 1} and not output.other, 0.5, what="only the first line arrived")
    append(harness.log_path, second[cut:] + third)
    harness.wait_delivered(ids, output, run=run)
    assert run.terminate() == 0
    records = output_records(receiver.output)
    assert records == [orjson.loads(first), orjson.loads(second), orjson.loads(third)]


def test_partial_line_across_a_restart(harness: Harness) -> None:
    """A half-written line when pyforward stops: the checkpoint stays before it, and after the restart the line
    is shipped once, whole (fluent-bit #11265 loses it)."""
    receiver = harness.receiver("plain")
    env = harness.run_env(receiver, **SMALL)
    run = harness.run(env)
    output = receiver.received()
    writer = harness.audit_log()
    first, second = writer.events(2)
    cut = len(second) // 3
    append(harness.log_path, first + second[:cut])
    harness.wait_delivered([audit_id(first)], output, run=run)
    assert run.terminate() == 0
    checkpoint = json.loads(harness.checkpoint_path.read_bytes())
    assert checkpoint["offset"] == len(first)
    append(harness.log_path, second[cut:])
    run.start()
    harness.wait_delivered([audit_id(second)], output, run=run)
    assert run.terminate() == 0
    assert output_records(receiver.output) == [orjson.loads(first), orjson.loads(second)]


# ------------------------------------------------------------------------------------------------ long lines


def test_long_lines_are_cut_marked_counted_and_the_next_lines_intact(harness: Harness) -> None:
    """Lines over PYFORWARD_MAX_LINE_BYTES go out cut to the limit, marked (pyforward_truncated, original size)
    and counted; a 3 MB line costs no more than the limit and the lines after it are intact."""
    limit = 4096
    receiver = harness.receiver("plain")
    metrics_bind = f"127.0.0.1:{free_port()}"
    run = harness.run(harness.run_env(receiver, max_line_bytes=limit, chunk_max_bytes=16 << 10,
                                      metrics_bind=metrics_bind))
    output = receiver.received()
    writer = harness.audit_log()
    a, b, c, d = writer.events(4)
    # An audit event made long by a big annotation (valid JSON, cut inside a 3-byte UTF-8 character) ...
    event = orjson.loads(b)
    for pad in range(3):  # make the limit fall inside a character
        event["annotations"] = {"pad": "p" * pad, "big": "€" * 5000}
        long_json = orjson.dumps(event)
        if long_json[limit - 1 : limit] != b"\xac" and long_json[limit : limit + 1] in (b"\x82", b"\xac"):
            break
    else:
        raise AssertionError("no padding puts the limit inside a character")
    exact = b"y" * limit  # exactly the limit: not cut
    huge = b"x" * (3 << 20)  # longer than the tailer's 1 MiB read size
    append(harness.log_path, a + long_json + b"\n" + exact + b"\n" + c + huge + b"\n" + d)
    harness.wait_delivered([audit_id(x) for x in (a, c, d)], output, run=run)
    wait_for(lambda: try_metrics(metrics_bind).get("pyforward_truncated_lines_total") == 2, 10,
             what="the truncated-lines counter to reach 2", diagnostics=harness.describe)
    assert run.terminate() == 0

    records = output_records(receiver.output)
    assert len(records) == 6
    assert records[0] == orjson.loads(a)
    expected_text = long_json[:limit].decode("utf-8", "ignore")  # the incomplete last character is dropped
    assert len(expected_text.encode()) < limit
    assert records[1] == {"log": expected_text, "pyforward_truncated": True, "pyforward_original_bytes": len(long_json)}
    assert records[2] == {"log": exact.decode()}  # not JSON, not too long: an ordinary {"log": ...}
    assert records[3] == orjson.loads(c)
    assert records[4] == {"log": "x" * limit, "pyforward_truncated": True, "pyforward_original_bytes": len(huge)}
    assert records[5] == orjson.loads(d)


# ------------------------------------------------------------------------------------------------ bad lines


def test_invalid_json_and_utf8_are_shipped_as_log_records(harness: Harness) -> None:
    """Lines that are not JSON objects, or not UTF-8, go out as {"log": <text>}; nothing crashes, and the audit
    events around them arrive intact."""
    receiver = harness.receiver("plain")
    metrics_bind = f"127.0.0.1:{free_port()}"
    run = harness.run(harness.run_env(receiver, metrics_bind=metrics_bind, **SMALL))
    output = receiver.received()
    writer = harness.audit_log()
    events = writer.events(3)
    bad = [
        b"plain text, not JSON",
        b'{"kind":"Event","auditID":"cut-off',  # a JSON object cut short
        b"[1, 2, 3]",  # JSON, not an object
        b'"just a string"',
        b"\xff\xfe not UTF-8 \xc3\x28",
        b'{"auditID":"bad-utf8-\xff","stage":"ResponseComplete"}',  # a JSON object with an invalid byte
        b"NaN",
        b"\r",  # a CRLF line ending on an empty line
        b"",  # an empty line
        b'{"nested":' * 600 + b"1" + b"}" * 600,  # deeper than MAX_DEPTH
    ]
    append(harness.log_path, events[0] + b"\n".join(bad) + b"\n" + events[1])
    harness.wait_delivered([audit_id(events[0]), audit_id(events[1])], output, run=run)
    append(harness.log_path, events[2])  # still shipping afterwards
    harness.wait_delivered([audit_id(events[2])], output, run=run)
    values = try_metrics(metrics_bind)
    assert run.terminate() == 0

    records = output_records(receiver.output)
    assert len(records) == len(bad) + 3
    assert records[0] == orjson.loads(events[0])
    assert records[-2:] == [orjson.loads(events[1]), orjson.loads(events[2])]
    expected = [{"log": line.removesuffix(b"\r").decode("utf-8", "replace")} for line in bad]
    assert records[1:-2] == expected
    assert values['pyforward_parse_errors_total{kind="invalid_utf8"}'] == 2
    assert values['pyforward_parse_errors_total{kind="not_object"}'] == 2
    assert run.find_log(r"Traceback|exception", level="error") is None
