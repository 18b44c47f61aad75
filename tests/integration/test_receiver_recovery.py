"""`pyforward receive` cuts at start what a killed receiver wrote but never acked (receiver/recovery.py, issue 22):
every batch records the output's length, with ranges or without, exactly once or not; what lies beyond it is cut and
its re-send written once. In-process Receiver, real sockets, real files (the SIGKILLed processes are in
tests/chaos/test_exactly_once.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pyforward.protocol import encode_forward
from pyforward.receiver.markfile import MarkFile, OutputLength
from tests.integration.test_receiver import TAG, records, running
from tests.integration.test_receiver_dedup import A, B, chunk, send, seqs


def _recorded(state: Path) -> list[OutputLength]:
    file = MarkFile(state)
    file.load()
    file.close()
    return file.outputs


async def test_a_killed_write_is_cut_at_start_and_its_resend_written_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, output = tmp_path / "marks", tmp_path / "out.jsonl"
    async with running(tmp_path, output=output, dedup_state=state) as (_, port, _):
        await send(port, chunk(A, 0, 3))
        first = output.stat().st_size
        await send(port, encode_forward(TAG, records(2, 10), {"chunk": "a sender without ranges"}))
    st = output.stat()
    header, slot = _recorded(state)
    assert slot == OutputLength(st.st_dev, st.st_ino, first)  # with A's end, in its slot
    assert header == OutputLength(st.st_dev, st.st_ino, st.st_size)  # a batch without marks: the header
    acked = output.read_bytes()
    with output.open("ab") as f:  # what a receiver SIGKILLed while writing A's next records leaves behind
        f.write(b'{"seq":3}\n{"seq":4}\n{"se')
    with caplog.at_level(logging.WARNING, logger="pyforward.receiver"):
        async with running(tmp_path, output=output, dedup_state=state) as (_, port, _):
            assert output.read_bytes() == acked
            await send(port, chunk(A, 0, 6, chunk_id="the sender's re-send"))
    assert seqs(output) == [0, 1, 2, 10, 11, 3, 4, 5]
    assert [r.getMessage() for r in caplog.records if "cut " in r.getMessage()] == [
        f"cut 24 bytes from the end of output {output} (written after the last length recorded in the exactly-once "
        "state, never acked: a receiver killed while writing them; the senders send them again)"
    ]


async def test_without_exactly_once_a_state_left_is_kept_current_and_none_created(tmp_path: Path) -> None:
    """A run with --no-exactly-once must move the length of a state file an earlier run left, or the next run with
    exactly once would cut what it acked; with no state file, it creates none and cuts only a torn line."""
    state, output = tmp_path / "marks", tmp_path / "out.jsonl"
    output.write_bytes(b'{"seq":-1}\n{"se')
    async with running(tmp_path, output=output, dedup_state=state, exactly_once=False) as (_, port, _):
        assert output.read_bytes() == b'{"seq":-1}\n'
        await send(port, chunk(A, 0, 1))
    assert not state.exists()
    async with running(tmp_path, output=output, dedup_state=state) as (_, port, _):
        await send(port, chunk(A, 0, 2, chunk_id="exactly once"))
    async with running(tmp_path, output=output, dedup_state=state, exactly_once=False) as (_, port, _):
        await send(port, chunk(B, 0, 2))
    async with running(tmp_path, output=output, dedup_state=state):
        pass
    assert seqs(output) == [-1, 0, 0, 1, 0, 1]  # nothing acked was cut
