"""`pyforward receive` cuts at start what a killed receiver wrote but never acked (receiver/recovery.py, issue 22):
every batch records the output's length, with ranges or without, exactly once or not; what lies beyond it is cut and
its re-send written once. Real sockets, real files; in-process receivers, and real `pyforward receive` processes that
SIGKILL themselves at a chosen point of a batch (at random moments: tests/chaos/test_exactly_once.py)."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest

from pyforward.protocol import encode_forward
from pyforward.receiver.markfile import MarkFile, OutputLength
from tests.harness import PYTHON, ReceiverProcess
from tests.integration.test_receiver import TAG, client, records, running
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


# `pyforward receive`, SIGKILLed by itself in its second write batch (the first is acked and recorded): in the middle
# of the output write (complete lines and a torn one), after it and before the state's write, or after that and
# before the ack.
_SIGKILLED_RECEIVER = """
import os, signal, sys
from pyforward.receiver import output
from pyforward.receiver.markfile import MarkFile

where = sys.argv.pop(1)
calls = 0


def second() -> bool:
    global calls
    calls += 1
    return calls == 2


if where == "in the output write":
    def os_write(fd, data):
        if second():
            os.write(fd, bytes(data[: len(data) // 2 + 5]))
            os.kill(os.getpid(), signal.SIGKILL)
        return os.write(fd, data)

    output._os_write = os_write
else:
    state_write = MarkFile.write

    def write(self, slots):
        if second():
            if where == "before the ack":
                state_write(self, slots)
            os.kill(os.getpid(), signal.SIGKILL)
        state_write(self, slots)

    MarkFile.write = write
from pyforward.cli import main
sys.exit(main())
"""


class _SigkilledReceiver(ReceiverProcess):
    def __init__(self, workdir: Path, output: Path, where: str) -> None:
        super().__init__(workdir, output=output, name="sigkilled")
        self.script = workdir / "sigkilled_receiver.py"
        self.script.write_text(_SIGKILLED_RECEIVER)
        self.where = where

    def argv(self) -> list[str]:
        argv = super().argv()
        assert argv[1:3] == ["-m", "pyforward"]
        return [PYTHON, str(self.script), self.where, *argv[3:]]


@pytest.mark.parametrize("where", ["in the output write", "before the state write", "before the ack"])
@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no ranges"])
async def test_a_receiver_sigkilled_in_a_batch_writes_its_resend_once(tmp_path: Path, where: str, ranges: bool) -> None:
    """Whichever point of a batch the receiver is killed at, the sender's re-send of what was not acked leaves every
    record once and no torn line (without ranges: a kill before the ack repeats the batch, at-least-once)."""
    output = tmp_path / "out.jsonl"

    def request(first: int, count: int, chunk_id: str) -> bytes:
        if ranges:
            return chunk(A, first, count, chunk_id=chunk_id)
        return encode_forward(TAG, records(count, first), {"chunk": chunk_id})

    killed = _SigkilledReceiver(tmp_path, output, where).start()
    try:
        async with client(killed.port) as c:
            await c.send(request(0, 3, "first"))
            assert await c.ack() == b"first"
            await c.send(request(3, 4, "second"))
            assert await c.closed() == []  # killed before its ack
        assert killed.proc is not None
        assert killed.proc.wait(30) == -signal.SIGKILL
    finally:
        killed.stop()
    receiver = ReceiverProcess(tmp_path, output=output).start()
    try:
        # The sender sends again what was not acked (`pyforward run` after a restart: from its checkpoint, new ids).
        assert await send(receiver.port, request(0 if ranges else 3, 7 if ranges else 4, "re-sent")) == b"re-sent"
    finally:
        assert receiver.stop() == 0
    data = output.read_bytes()
    assert data.endswith(b"\n")
    seen = [json.loads(line)["seq"] for line in data.splitlines()]  # (a torn line joined onto the next: an error)
    repeated = [3, 4, 5, 6] if where == "before the ack" and not ranges else []
    assert seen == [0, 1, 2, 3, 4, 5, 6, *repeated]
