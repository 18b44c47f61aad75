"""Tailer: LineBatch.caught_up (the pipeline's cue to stop reading) and no polling baseline under inotify."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pyforward.tail import Tailer

LINE = b'{"kind":"Event","n":%d}\n'


def write(path: Path, first: int, count: int) -> None:
    with path.open("ab") as f:
        f.write(b"".join(LINE % i for i in range(first, first + count)))


async def test_caught_up_only_at_the_end_of_the_live_file(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 0, 100)
    tailer = Tailer(log, start=None)
    await tailer.open()
    try:
        partial = await tailer.read_batch(len(LINE % 0) * 10)  # room for about 10 of the 100 lines
        assert partial is not None
        assert len(partial.lines) < 100
        assert not partial.caught_up
        rest = await tailer.read_batch(1 << 20)
        assert rest is not None
        assert len(partial.lines) + len(rest.lines) == 100
        assert rest.caught_up
        assert await tailer.read_batch(1 << 20) is None
    finally:
        await tailer.close()


async def test_a_batch_ending_with_a_rotated_file_is_not_caught_up(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, 0, 10)
    tailer = Tailer(log, start=None)
    await tailer.open()
    try:
        os.rename(log, tmp_path / "audit-2026-11-26T12-00-00.000.log")  # lumberjack: rename, then a new file
        write(log, 10, 10)
        first = await tailer.read_batch(1 << 20)
        assert first is not None
        assert first.lines == [(LINE % i).rstrip(b"\n") for i in range(10)]
        assert not first.caught_up  # the next file has lines to read at once
        second = await tailer.read_batch(1 << 20)
        assert second is not None
        assert len(second.lines) == 10
        assert second.caught_up
    finally:
        await tailer.close()


@pytest.mark.parametrize("use_inotify", [True, False])
async def test_polling_baseline_only_when_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_inotify: bool
) -> None:
    log = tmp_path / "audit.log"
    write(log, 0, 1)
    tailer = Tailer(log, start=None, use_inotify=use_inotify, poll_interval=0.01)
    signatures = 0
    real = tailer._watcher.signature

    def counting() -> object:
        nonlocal signatures
        signatures += 1
        return real()

    monkeypatch.setattr(tailer._watcher, "signature", counting)
    await tailer.open()
    try:
        assert await tailer.read_batch(1 << 20) is not None
        waiter = asyncio.create_task(tailer.wait(5.0))
        await asyncio.sleep(0)  # a yield: wait() runs up to its first await, its watch taken
        write(log, 1, 1)
        await asyncio.wait_for(waiter, 5.0)
        before = signatures
        batch = await tailer.read_batch(1 << 20)
        assert batch is not None
        assert batch.lines == [(LINE % 1).rstrip(b"\n")]
        assert (signatures > before) is not use_inotify
    finally:
        await tailer.close()
