"""Exactly once into `pyforward receive` (issue 22): per source, what ends at or before the written end is acked and
not written again; the marks survive a restart; nonsense ranges close the connection. In-process Receiver, real
sockets, real files (the processes with SIGKILL are in tests/chaos/test_exactly_once.py)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyforward.metrics import HealthState, start_server
from pyforward.protocol import (
    OPTION_LENGTHS,
    OPTION_OFFSET,
    OPTION_SOURCE,
    RangeError,
    encode_forward,
    parse_ranges,
    range_options,
)
from pyforward.receiver import output as receiver_module
from pyforward.receiver.markfile import SLOT_BYTES
from pyforward.receiver.metrics import ReceiverMetrics
from tests.integration.test_receiver import DEADLINE, TAG, client, read_lines, records, running, wait_until

A = "2049:11:0123456789abcdef"
B = "2049:12:fedcba9876543210"


def chunk(source: str, first: int, count: int, *, length: int = 10, chunk_id: str | None = None) -> bytes:
    """Records first..first+count-1 of `source`, record i covering [i*length, (i+1)*length)."""
    options: dict[str, Any] = range_options(source, first * length, [length] * count)
    options["chunk"] = chunk_id or f"{source}-{first}-{count}"
    return encode_forward(TAG, records(count, first), options)


async def send(port: int, payload: bytes) -> bytes:
    async with client(port) as c:
        await c.send(payload)
        return await c.ack()


def seqs(output: Path) -> list[int]:
    return [r["seq"] for r in read_lines(output)]


async def test_resent_records_are_acked_not_written(tmp_path: Path) -> None:
    async with running(tmp_path) as (receiver, port, output):
        assert receiver.marks is not None
        await send(port, chunk(A, 0, 5))
        await send(port, chunk(A, 0, 5, chunk_id="a retry after a crash: new id"))
        await send(port, chunk(A, 3, 4, chunk_id="overlap"))  # 3, 4 written already; 5, 6 new
        await send(port, chunk(B, 0, 2))  # another source: its own mark
        assert seqs(output) == [0, 1, 2, 3, 4, 5, 6, 0, 1]
        assert (receiver.marks.dropped_records, receiver.marks.dropped_bytes) == (7, 70)
        assert receiver.marks.tracked == 2
        assert receiver.stats.records == 9


async def test_a_record_straddling_the_mark_is_written(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, port, output):
        await send(port, encode_forward(TAG, records(2), {"chunk": "x", **range_options(A, 0, [10, 10])}))
        # The same bytes cut differently (a sender that changed max_line_bytes): 15..25 is not wholly before 20.
        await send(port, encode_forward(TAG, records(2, 5), {"chunk": "y", **range_options(A, 5, [10, 10])}))
        assert seqs(output) == [0, 1, 6]


async def test_marks_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "marks"
    output = tmp_path / "out.jsonl"
    async with running(tmp_path, output=output, dedup_state=state) as (_, port, _):
        await send(port, chunk(A, 0, 4))
        await send(port, chunk(B, 0, 1))
    assert state.stat().st_size == 3 * SLOT_BYTES  # header + one slot a source
    async with running(tmp_path, output=output, dedup_state=state) as (receiver, port, _):
        assert receiver.marks is not None
        assert receiver.marks.tracked == 2
        await send(port, chunk(A, 2, 4))
        await send(port, chunk(B, 0, 1))
    assert seqs(output) == [0, 1, 2, 3, 0, 4, 5]


async def test_off_writes_everything(tmp_path: Path) -> None:
    async with running(tmp_path, exactly_once=False) as (receiver, port, output):
        await send(port, chunk(A, 0, 2))
        await send(port, chunk(A, 0, 2, chunk_id="again"))
        assert seqs(output) == [0, 1, 0, 1]
        assert receiver.marks is None


async def test_a_resend_while_the_first_copy_is_written_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections with the same records at once (a sender that reconnected): written once, both acked after
    the write; and when that write fails, neither is acked and the retry writes them."""
    real_write = receiver_module._os_write
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    fail = True

    def slow(fd: int, data: memoryview) -> int:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(DEADLINE)
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(receiver_module, "_os_write", slow)
    async with running(tmp_path) as (receiver, port, output), client(port) as first, client(port) as second:
        assert receiver.marks is not None
        await first.send(chunk(A, 0, 3, chunk_id="one"))
        await second.send(chunk(A, 0, 3, chunk_id="two"))
        await wait_until(lambda: receiver.stats.requests == 2, what="both requests queued behind the held write")
        gate.set()
        assert await first.closed() == []
        assert await second.closed() == []
        fail = False
        assert await send(port, chunk(A, 0, 3, chunk_id="two")) == b"two"
        assert seqs(output) == [0, 1, 2]
        monkeypatch.setattr(receiver_module, "_os_write", real_write)
        async with client(port) as one, client(port) as two:
            await one.send(chunk(A, 0, 4, chunk_id="three"))
            await two.send(chunk(A, 0, 4, chunk_id="four"))
            assert {await one.ack(), await two.ack()} == {b"three", b"four"}
        assert seqs(output) == [0, 1, 2, 3]


async def test_sources_are_bounded_and_forgetting_only_duplicates(tmp_path: Path) -> None:
    async with running(tmp_path, dedup_max_sources=2, dedup_state=tmp_path / "marks") as (receiver, port, output):
        assert receiver.marks is not None
        sources = [f"1:{n}:0123456789abcdef" for n in range(5)]
        for source in sources:
            await send(port, chunk(source, 0, 1))
        assert receiver.marks.tracked == 2
        assert receiver.marks.forgotten == 3
        await send(port, chunk(sources[0], 0, 1, chunk_id="forgotten: written again"))
        await send(port, chunk(sources[4], 0, 1, chunk_id="remembered: dropped"))
        assert seqs(output) == [0] * 6
    assert (tmp_path / "marks").stat().st_size <= 4 * SLOT_BYTES  # slots are reused


async def test_idle_sources_are_forgotten(tmp_path: Path) -> None:
    async with running(tmp_path, dedup_forget_after=1e-9) as (receiver, port, output):
        assert receiver.marks is not None
        await send(port, chunk(A, 0, 1))
        await send(port, chunk(B, 0, 1))  # A idle for longer than the setting: forgotten to make room
        assert receiver.marks.tracked == 1
        await send(port, chunk(A, 0, 1, chunk_id="again"))
        assert seqs(output) == [0, 0, 0]


@pytest.mark.parametrize(
    "options",
    [
        {OPTION_SOURCE: A, OPTION_OFFSET: 0, OPTION_LENGTHS: [10, 10, 10]},  # 3 lengths, 2 records
        {OPTION_SOURCE: A, OPTION_OFFSET: -1, OPTION_LENGTHS: [10, 10]},
        {OPTION_SOURCE: "../../etc/passwd", OPTION_OFFSET: 0, OPTION_LENGTHS: [10, 10]},
        {OPTION_SOURCE: A, OPTION_OFFSET: 2**63 - 5, OPTION_LENGTHS: [10, 10]},
        {OPTION_SOURCE: A, OPTION_LENGTHS: [10, 10]},
    ],
)
async def test_nonsense_ranges_close_that_connection_only(tmp_path: Path, options: dict[str, Any]) -> None:
    async with running(tmp_path) as (receiver, port, output), client(port) as good:
        async with client(port) as bad:
            await bad.send(chunk(B, 0, 1))
            await bad.send(encode_forward(TAG, records(2, 100), {"chunk": "bad", **options}))
            assert [m.chunk_id for m in await bad.closed()] == [b"2049:12:fedcba9876543210-0-1"]  # type: ignore[union-attr]
        await good.send(chunk(A, 0, 2))
        assert await good.ack()
        assert seqs(output) == [0, 0, 1]
        assert receiver.stats.bad_ranges == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.none()),
    lengths=st.one_of(st.lists(st.integers(-(2**63), 2**64 - 1), max_size=4), st.binary(max_size=8)),
    source=st.one_of(st.text(max_size=70), st.just(A)),
)
def test_fuzzed_ranges_never_break_the_receiver(tmp_path: Path, offset: Any, lengths: Any, source: Any) -> None:
    """Whatever the values, on the wire: acked and written as ranges that hold, or the connection closed and
    counted; the receiver serves the next connection either way."""

    options = {"chunk": "f", OPTION_SOURCE: source, OPTION_OFFSET: offset, OPTION_LENGTHS: lengths}
    try:
        valid = parse_ranges(options, 2) is not None
    except RangeError:
        valid = False

    async def scenario() -> None:
        async with running(tmp_path, output=tmp_path / "fuzz.jsonl") as (receiver, port, _):
            async with client(port) as c:
                await c.send(encode_forward(TAG, records(2), options))
                message = await c.next()
            assert (message is not None) == valid
            assert receiver.stats.bad_ranges == (0 if valid else 1)
            assert await send(port, chunk(B, 0, 1)) == f"{B}-0-1".encode()

    asyncio.run(scenario())


async def test_metrics(tmp_path: Path) -> None:
    async with running(tmp_path) as (receiver, port, _):
        await send(port, chunk(A, 0, 3))
        await send(port, chunk(A, 0, 3, chunk_id="again"))
        server = start_server("127.0.0.1:0", ReceiverMetrics(receiver), HealthState())
        try:
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read())
        finally:
            server.close()
    body = text.decode()
    assert 'pyforward_receiver_duplicates_dropped_total{unit="records"} 3.0' in body
    assert 'pyforward_receiver_duplicates_dropped_total{unit="bytes"} 30.0' in body
    assert "pyforward_receiver_sources_tracked 1.0" in body
    assert "pyforward_receiver_records_total 3.0" in body


async def test_sync_writes_and_acks(tmp_path: Path) -> None:
    async with running(tmp_path, sync=True, dedup_state=tmp_path / "marks") as (receiver, port, output):
        await send(port, chunk(A, 0, 3))
        await send(port, chunk(A, 0, 3, chunk_id="again"))
        assert seqs(output) == [0, 1, 2]
        assert receiver.marks is not None
        assert receiver.marks.save_errors == 0


def test_cli_state_beside_the_output_and_a_foreign_state_file(tmp_path: Path) -> None:
    from pyforward.receiver.cli import config_from_args, configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    config = config_from_args(parser.parse_args(["--output", str(tmp_path / "out.jsonl")]), {})
    assert config.exactly_once
    assert config.dedup_state == tmp_path / "out.jsonl.pyforward-marks"
    assert config_from_args(parser.parse_args([]), {}).dedup_state is None  # standard output: in memory
    off = config_from_args(parser.parse_args(["--no-exactly-once", "--dedup-max-sources", "9"]), {})
    assert (off.exactly_once, off.dedup_max_sources) == (False, 9)
    foreign = tmp_path / "foreign"
    foreign.write_text("not a state file\n")
    result = subprocess.run(
        [sys.executable, "-m", "pyforward", "receive", "--bind", "127.0.0.1:0", "--output", str(tmp_path / "o"),
         "--dedup-state", str(foreign)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "is not a pyforward receive exactly-once state file" in lines[-1]
