"""Interop with the Python `fluent-logger` package -> `pyforward receive`.

fluent-logger speaks Message mode only, without acks, TLS or the handshake; with `nanosecond_precision` it
sends EventTime. Without acks the only proof of delivery is the output file, polled with a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from fluent import asyncsender, handler, sender

from tests.interop.conftest import PyforwardReceiver, rfc3339

pytestmark = pytest.mark.interop

RECORDS = [
    {"seq": 0, "msg": "zoë ✓ 日本語 🚀", "nested": {"list": [1, 2.5, None, True], "empty": {}}},
    {"seq": 1, "msg": 'quote " backslash \\ newline \n tab \t control \u0001'},
    {"seq": 2, "msg": "", "int64": 2**63 - 1, "negative": -(2**63)},
    {"seq": 3, "msg": "e\u0301 \u200b \ufeff \u05d0"},
]


@pytest.fixture
def receiver(pyforward_receiver: Callable[..., PyforwardReceiver]) -> PyforwardReceiver:
    return pyforward_receiver()


@pytest.fixture
def fluent_sender(receiver: PyforwardReceiver) -> Iterator[Callable[..., sender.FluentSender]]:
    senders: list[sender.FluentSender] = []

    def make(tag: str, **kwargs: object) -> sender.FluentSender:
        s = sender.FluentSender(tag, host="127.0.0.1", port=receiver.port, timeout=10, **kwargs)
        senders.append(s)
        return s

    yield make
    for s in senders:
        s.close()


def test_event_time_with_nanoseconds(
    receiver: PyforwardReceiver, fluent_sender: Callable[..., sender.FluentSender]
) -> None:
    s = fluent_sender("app", nanosecond_precision=True)
    times = [(1_700_000_000 + i, 100_000_000 * i + 7) for i in range(len(RECORDS))]
    for (seconds, nanos), record in zip(times, RECORDS, strict=True):
        assert s.emit_with_time("audit", sender.EventTime(seconds, nanoseconds=nanos), record), s.last_error
    lines = receiver.wait_lines(len(RECORDS))
    assert lines == [
        {"tag": "app.audit", "time": rfc3339(seconds, nanos), "record": record}
        for (seconds, nanos), record in zip(times, RECORDS, strict=True)
    ]


def test_integer_seconds(receiver: PyforwardReceiver, fluent_sender: Callable[..., sender.FluentSender]) -> None:
    s = fluent_sender("app")
    for i, record in enumerate(RECORDS):
        assert s.emit_with_time(None, 1_600_000_000 + i, record), s.last_error
    lines = receiver.wait_lines(len(RECORDS))
    assert [line["time"] for line in lines] == [rfc3339(1_600_000_000 + i, 0) for i in range(len(RECORDS))]
    assert [line["tag"] for line in lines] == ["app"] * len(RECORDS)
    assert [line["record"] for line in lines] == RECORDS


def test_async_sender_many_records(receiver: PyforwardReceiver) -> None:
    count = 2000
    s = asyncsender.FluentSender("bulk", host="127.0.0.1", port=receiver.port, nanosecond_precision=True)
    try:
        for i in range(count):
            assert s.emit("event", {"seq": i, "msg": f"record {i} ✓"})
    finally:
        s.close()  # flushes the queue
    lines = receiver.wait_lines(count)
    assert len(lines) == count
    assert sorted(line["record"]["seq"] for line in lines) == list(range(count))


def test_logging_handler(receiver: PyforwardReceiver) -> None:
    log = logging.getLogger("tests.interop.fluent")
    h = handler.FluentHandler("app.log", host="127.0.0.1", port=receiver.port)
    h.setFormatter(handler.FluentRecordFormatter({"level": "%(levelname)s", "where": "%(name)s"}))
    log.addHandler(h)
    try:
        log.warning({"msg": "from the logging module ✓"})
    finally:
        log.removeHandler(h)
        h.close()
    [line] = receiver.wait_lines(1)
    assert line["tag"] == "app.log"
    assert line["record"] == {"level": "WARNING", "where": "tests.interop.fluent", "msg": "from the logging module ✓"}


def test_no_handshake_means_nothing_written(pyforward_receiver: Callable[..., PyforwardReceiver]) -> None:
    # fluent-logger cannot do the shared-key handshake; a receiver with a shared key must write nothing.
    guarded = pyforward_receiver("--shared-key", "k")
    s = sender.FluentSender("app", host="127.0.0.1", port=guarded.port, timeout=5)
    try:
        s.emit("x", {"msg": "must not be written"})
    finally:
        s.close()
    guarded.proc.wait_stderr("data before the handshake")
    assert guarded.lines() == []
