"""Tailer: real files, real renames, truncations and gzip, as kube-apiserver's lumberjack does them."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from pyforward.checkpoint import FINGERPRINT_BYTES, Position, load_checkpoint, save_checkpoint
from pyforward.tail import LineBatch, Tailer, TailerStats

MiB = 1 << 20


class Apiserver:
    """kube-apiserver writing its audit log, rotating it like lumberjack (close, rename to
    NAME-<UTC ms timestamp>.EXT, optionally gzip the backup, create a new file)."""

    def __init__(self, directory: Path, name: str = "audit.log") -> None:
        self.dir = directory
        self.path = directory / name
        self.count = 0
        self._clock = datetime(2026, 11, 26, 12, 0, 0)
        directory.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def line(self, n: int, pad: int = 0) -> bytes:
        # Audit events share a long common prefix: exactly what makes short fingerprints ambiguous.
        body = f'{{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"{n:08d}"'
        return (body + ',"pad":"' + "x" * pad + '"}').encode()

    def write(self, count: int, pad: int = 40) -> list[bytes]:
        lines = [self.line(self.count + i, pad) for i in range(count)]
        self.count += count
        self.append(b"".join(x + b"\n" for x in lines))
        return lines

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)

    def backup_name(self) -> Path:
        self._clock += timedelta(milliseconds=1234)
        stamp = self._clock.strftime("%Y-%m-%dT%H-%M-%S.") + f"{self._clock.microsecond // 1000:03d}"
        prefix, ext = os.path.splitext(self.path.name)
        return self.dir / f"{prefix}-{stamp}{ext}"

    def rotate(self) -> Path:
        backup = self.backup_name()
        os.rename(self.path, backup)
        self.path.touch()
        return backup

    @staticmethod
    def compress(backup: Path) -> Path:
        target = backup.with_name(backup.name + ".gz")
        with open(backup, "rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        backup.unlink()
        return target


async def drain(tailer: Tailer, max_bytes: int = MiB) -> list[bytes]:
    """Every line available now."""
    lines: list[bytes] = []
    while (batch := await tailer.read_batch(max_bytes)) is not None:
        lines.extend(batch.lines)
    return lines


async def read_lines(tailer: Tailer, count: int, *, max_bytes: int = MiB, timeout: float = 10.0) -> list[bytes]:
    """Read until `count` lines arrived (waiting on the tailer when caught up)."""
    lines: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(lines) < count:
            batch = await tailer.read_batch(max_bytes)
            if batch is None:
                await tailer.wait(1.0)
            else:
                lines.extend(batch.lines)
    return lines


async def batches(tailer: Tailer, max_bytes: int) -> list[LineBatch]:
    out = []
    while (batch := await tailer.read_batch(max_bytes)) is not None:
        out.append(batch)
    return out


# --- lines -------------------------------------------------------------------------------------------------


async def test_partial_line_waits_for_its_newline(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.append(b"one\r\ntwo\nthr")
    tailer = make_tailer(api.path)
    await tailer.open()
    batch = await tailer.read_batch(MiB)
    assert batch is not None
    assert batch.lines == [b"one\r", b"two"]  # "\r" kept as is
    assert batch.end.offset == 9
    assert batch.size == 9
    assert await tailer.read_batch(MiB) is None  # "thr" has no newline yet
    assert tailer.position is not None
    assert tailer.position.offset == 9
    api.append(b"ee\n")
    batch = await tailer.read_batch(MiB)
    assert batch is not None
    assert batch.lines == [b"three"]
    assert (batch.end.offset, batch.size) == (15, 6)


async def test_batches_respect_max_bytes_and_cover_everything(
    api: Apiserver, make_tailer: Callable[..., Tailer]
) -> None:
    written = api.write(500)
    total = api.path.stat().st_size
    tailer = make_tailer(api.path, read_size=4096)
    await tailer.open()
    got = await batches(tailer, 2000)
    assert [line for b in got for line in b.lines] == written
    line_size = len(written[0]) + 1
    assert all(b.size <= 2000 + line_size for b in got)
    assert sum(b.size for b in got) == total
    assert [b.end.offset for b in got] == sorted({b.end.offset for b in got})
    assert got[-1].end.offset == total
    assert tailer.stats.lines == 500
    assert tailer.stats.bytes == total


async def test_tiny_budget_still_returns_one_line(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    written = api.write(3)
    tailer = make_tailer(api.path)
    await tailer.open()
    got = await batches(tailer, 1)
    assert [b.lines for b in got] == [[x] for x in written]


@pytest.mark.parametrize("read_size", [256, MiB], ids=["across-reads", "within-a-read"])
async def test_long_line_is_cut_recorded_and_the_next_line_intact(
    api: Apiserver, make_tailer: Callable[..., Tailer], read_size: int
) -> None:
    long = b"{" + b"y" * 9_998 + b"}"
    api.append(b"short\n" + long + b"\nnext\n")
    tailer = make_tailer(api.path, max_line_bytes=100, read_size=read_size)
    await tailer.open()
    batch = await tailer.read_batch(MiB)
    assert batch is not None
    assert batch.lines == [b"short", long[:100], b"next"]
    assert batch.truncated == [(1, 10_000)]
    assert batch.size == api.path.stat().st_size
    assert tailer.stats.truncated_lines == 1
    assert tailer.stats.long_line_bytes_dropped == 9_900


async def test_long_line_memory_stays_bounded(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    # A 16 MB line written in pieces, read with a 1 KiB limit: the tailer never holds more than a chunk or two.
    piece = b"z" * MiB
    tailer = make_tailer(api.path, max_line_bytes=1024, read_size=64 * 1024)
    await tailer.open()
    growth: list[int] = []
    tracemalloc.start()
    try:
        for _ in range(16):
            api.append(piece)
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            assert await tailer.read_batch(MiB) is None  # no newline yet: nothing to return, nothing piles up
            growth.append(tracemalloc.get_traced_memory()[1] - before)
        api.append(b"\nafter\n")
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        batch = await tailer.read_batch(64 * MiB)
        growth.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert max(growth) < 512 * 1024, growth  # a few 64 KiB reads, never the 16 MiB line
    assert batch is not None
    assert batch.lines == [b"z" * 1024, b"after"]
    assert batch.truncated == [(0, 16 * MiB)]


# --- identity ----------------------------------------------------------------------------------------------


async def test_fingerprint_grows_with_the_file(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.append(b"first\n")
    tailer = make_tailer(api.path)
    await tailer.open()
    b1 = await tailer.read_batch(MiB)
    assert b1 is not None
    assert b1.end.file.fp_len == 6
    api.write(100)
    b2 = await tailer.read_batch(MiB)
    assert b2 is not None
    assert b2.end.file.fp_len == FINGERPRINT_BYTES
    st = api.path.stat()
    assert (b2.end.file.dev, b2.end.file.ino) == (st.st_dev, st.st_ino)
    head = api.path.read_bytes()[:FINGERPRINT_BYTES]
    assert b1.end.file.matches_head(head)  # an older, shorter fingerprint still matches the file
    assert b2.end.file.matches_head(head)


# --- rotation while running --------------------------------------------------------------------------------


async def test_rotation_while_reading(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    tailer = make_tailer(api.path, read_size=1000)
    await tailer.open()
    written: list[bytes] = []
    got: list[bytes] = []
    for i in range(30):
        written += api.write(7 + i)
        if i % 3 == 0:  # sometimes catch up before the rotation, sometimes not
            got += await drain(tailer, max_bytes=700)
        else:
            batch = await tailer.read_batch(500)
            got += batch.lines if batch else []
        api.rotate()
    written += api.write(5)
    got += await drain(tailer)
    assert got == written
    assert tailer.stats.rotations >= 20


async def test_several_rotations_between_two_reads(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    """Rotation faster than the shipper: every backup between the current file and the live one, in order."""
    tailer = make_tailer(api.path, read_size=512)
    await tailer.open()
    written = api.write(20)
    batch = await tailer.read_batch(300)  # part of the first file only
    assert batch is not None
    got = list(batch.lines)
    for _ in range(5):
        api.rotate()
        written += api.write(20)
    got += await drain(tailer, max_bytes=700)
    assert got == written
    assert tailer.stats.files_opened == 6


async def test_backup_deleted_before_it_was_read_to_the_end(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    tailer = make_tailer(api.path, read_size=256)
    await tailer.open()
    written = api.write(50)
    batch = await tailer.read_batch(200)
    assert batch is not None
    got = list(batch.lines)
    backup = api.rotate()
    backup.unlink()  # lumberjack's MaxBackups: the fd we hold keeps the data
    written += api.write(10)
    got += await drain(tailer)
    assert got == written


async def test_unterminated_last_line_of_rotated_file_is_returned(
    api: Apiserver, make_tailer: Callable[..., Tailer]
) -> None:
    tailer = make_tailer(api.path)
    await tailer.open()
    api.append(b"a\nb\nno newline")
    assert [x for b in await batches(tailer, MiB) for x in b.lines] == [b"a", b"b"]
    backup = api.rotate()
    api.append(b"c\n")
    got = await batches(tailer, MiB)
    assert [b.lines for b in got] == [[b"no newline"], [b"c"]]  # a batch never spans two files
    assert got[0].end.offset == backup.stat().st_size
    assert got[0].end.path == str(backup)  # the name it has now, for messages and backlog estimates


async def test_rename_before_the_new_file_exists(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    tailer = make_tailer(api.path)
    await tailer.open()
    written = api.write(3)
    api.append(b"unterminated")
    assert await drain(tailer) == written
    os.rename(api.path, api.backup_name())  # lumberjack's gap between rename and create
    # Our file is a backup now, so it is complete: its unterminated last line is a line.
    assert await drain(tailer) == [b"unterminated"]
    api.path.touch()
    written2 = api.write(2)
    assert await drain(tailer) == written2


async def test_gzipped_backup_of_the_current_file_is_not_read_again(
    api: Apiserver, make_tailer: Callable[..., Tailer]
) -> None:
    tailer = make_tailer(api.path)
    await tailer.open()
    written = api.write(100)
    assert await drain(tailer) == written
    Apiserver.compress(api.rotate())  # rotated and gzipped before the tailer looked again
    written2 = api.write(5)
    assert await drain(tailer) == written2
    assert tailer.stats.compressed_files_read == 0


async def test_unread_gzipped_backups_are_read_decompressed(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    tailer = make_tailer(api.path)
    await tailer.open()
    first = api.write(100)
    assert await drain(tailer) == first
    Apiserver.compress(api.rotate())  # the one we read: skipped
    unread = api.write(80)
    gz = Apiserver.compress(api.rotate())  # never read: read decompressed
    live = api.write(3)
    got = await batches(tailer, MiB)
    assert [x for b in got for x in b.lines] == unread + live
    assert tailer.stats.compressed_files_read == 1
    gz_batch = got[0]
    # Positions in a .gz are offsets into the decompressed data.
    assert gz_batch.end.offset == len(gzip.decompress(gz.read_bytes()))
    assert gz_batch.end.file.ino == gz.stat().st_ino


async def test_corrupt_gz_backup_is_logged_and_skipped(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    api.write(3)
    bad = api.rotate()
    bad.with_name(bad.name + ".gz").write_bytes(b"this is not gzip")
    bad.unlink()
    written = api.write(2)
    tailer = make_tailer(api.path)
    await tailer.open()
    with caplog.at_level(logging.ERROR, "pyforward.tailer"):
        assert await drain(tailer) == written
    assert tailer.stats.unreadable_files == 1
    assert any("skipping" in r.getMessage() and ".gz" in r.getMessage() for r in caplog.records)


# --- start and restart -------------------------------------------------------------------------------------


async def test_no_checkpoint_head_starts_at_the_oldest_backup(
    api: Apiserver, make_tailer: Callable[..., Tailer]
) -> None:
    written = api.write(10)
    Apiserver.compress(api.rotate())
    written += api.write(10)
    api.rotate()
    written += api.write(10)
    tailer = make_tailer(api.path, start_at="head")
    await tailer.open()
    assert await drain(tailer) == written


async def test_no_checkpoint_tail_starts_at_the_end(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.write(10)
    api.rotate()
    api.write(10)
    api.append(b"begun before we started, ")
    tailer = make_tailer(api.path, start_at="tail")
    await tailer.open()
    assert await tailer.read_batch(MiB) is None
    api.append(b"ended after\n")
    new = api.write(2)
    assert await drain(tailer) == [b"begun before we started, ended after", *new]
    api.rotate()
    newer = api.write(1)
    assert await drain(tailer) == newer  # the backups that existed at start stay unread


async def test_tail_mid_line_longer_than_a_read(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.append(b"old\n" + b"q" * 5000)
    tailer = make_tailer(api.path, start_at="tail", read_size=1024)
    await tailer.open()
    api.append(b"q\nnew\n")
    assert await drain(tailer) == [b"new"]  # no fragment of the line we joined in the middle


async def test_tail_with_missing_log_reads_it_from_its_head(tmp_path: Path, make_tailer: Callable[..., Tailer]) -> None:
    tailer = make_tailer(tmp_path / "later" / "audit.log", start_at="tail")
    await tailer.open()
    assert await tailer.read_batch(MiB) is None
    api = Apiserver(tmp_path / "later")
    written = api.write(3)
    assert await drain(tailer) == written


async def _read_some(
    api: Apiserver, make_tailer: Callable[..., Tailer], max_bytes: int
) -> tuple[list[bytes], Position]:
    tailer = make_tailer(api.path, read_size=512)
    await tailer.open()
    batch = await tailer.read_batch(max_bytes)
    assert batch is not None
    await tailer.close()
    checkpoint = api.dir / ".audit.log.pyforward-checkpoint"  # where the pipeline keeps it: beside the log
    save_checkpoint(checkpoint, batch.end)
    loaded = load_checkpoint(checkpoint)
    assert loaded == batch.end
    return batch.lines, loaded


@pytest.mark.parametrize("rotations", [0, 1, 2, 3])
async def test_restart_after_rotations_while_stopped(
    api: Apiserver, make_tailer: Callable[..., Tailer], rotations: int
) -> None:
    written = api.write(40)
    got, checkpoint = await _read_some(api, make_tailer, 1000)
    written += api.write(5)
    for _ in range(rotations):
        api.rotate()
        written += api.write(7)
    tailer = make_tailer(api.path, start=checkpoint)
    await tailer.open()
    got += await drain(tailer)
    assert got == written  # every remaining line, exactly once
    assert tailer.stats.checkpoint_misses == 0


async def test_restart_resumes_inside_a_backup(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    written = api.write(40)
    api.rotate()
    written += api.write(40)
    got, checkpoint = await _read_some(api, make_tailer, 1000)  # stops inside the backup
    assert "audit-" in checkpoint.path
    api.rotate()
    written += api.write(3)
    tailer = make_tailer(api.path, start=checkpoint)
    await tailer.open()
    got += await drain(tailer)
    assert got == written


async def test_restart_resumes_inside_a_backup_gzipped_meanwhile(
    api: Apiserver, make_tailer: Callable[..., Tailer]
) -> None:
    written = api.write(100)
    got, checkpoint = await _read_some(api, make_tailer, 2000)
    Apiserver.compress(api.rotate())  # new inode: found by its decompressed fingerprint
    written += api.write(50)
    Apiserver.compress(api.rotate())  # never read: read decompressed
    written += api.write(5)
    tailer = make_tailer(api.path, start=checkpoint)
    await tailer.open()
    got += await drain(tailer)
    assert got == written
    assert tailer.stats.compressed_files_read == 2


async def test_restart_when_the_checkpointed_file_is_gone(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    api.write(40)
    _, checkpoint = await _read_some(api, make_tailer, 1000)
    api.rotate().unlink()  # rotated away and deleted while we were down: its rest is lost
    remaining = api.write(10)
    api.rotate()
    remaining += api.write(10)
    tailer = make_tailer(api.path, start=checkpoint)
    with caplog.at_level(logging.ERROR, "pyforward.tailer"):
        await tailer.open()
        assert await drain(tailer) == remaining  # from the head of the oldest remaining file
    assert tailer.stats.checkpoint_misses == 1
    [message] = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert f"offset {checkpoint.offset}" in message
    assert "oldest remaining file" in message


async def test_restart_does_not_resume_in_a_reused_inode(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.write(40)
    _, checkpoint = await _read_some(api, make_tailer, 1000)
    # The same inode with other content (what a reused inode looks like): the fingerprint tells them apart.
    with open(api.path, "r+b") as f:
        f.write(b"X" * 200)
    tailer = make_tailer(api.path, start=checkpoint)
    await tailer.open()
    got = await drain(tailer)
    assert got[0].startswith(b"X" * 200)
    assert tailer.stats.checkpoint_misses == 1


async def test_checkpoint_in_a_short_file_resumes(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.append(b"a\n")
    _, checkpoint = await _read_some(api, make_tailer, MiB)
    assert checkpoint.file.fp_len == 2
    api.append(b"b\n")
    api.rotate()
    api.append(b"c\n")
    tailer = make_tailer(api.path, start=checkpoint)
    await tailer.open()
    assert await drain(tailer) == [b"b", b"c"]


# --- truncation --------------------------------------------------------------------------------------------


async def test_truncation_is_detected_counted_and_read_from_zero(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    api.write(40)
    size = api.path.stat().st_size
    tailer = make_tailer(api.path, read_size=1024)
    await tailer.open()
    batch = await tailer.read_batch(500)
    assert batch is not None
    read_off = 1024  # one read of read_size; the file size was seen then
    os.truncate(api.path, 0)
    after = api.write(3)
    with caplog.at_level(logging.WARNING, "pyforward.tailer"):
        rest = await drain(tailer)
    lines_in_first_read = batch.lines + rest[: -len(after)]
    assert rest[-len(after) :] == after
    assert tailer.stats.truncations == 1
    partial = read_off - sum(len(x) + 1 for x in lines_in_first_read)
    assert tailer.stats.truncation_bytes_lost == size - read_off + partial
    losses = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(losses) == 1
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.ERROR]  # a loss: ERROR, once
    assert f"{tailer.stats.truncation_bytes_lost} bytes" in losses[0]
    assert "truncated" in losses[0]


async def test_rewrite_past_the_offset_is_detected_by_the_fingerprint(
    api: Apiserver, make_tailer: Callable[..., Tailer]
) -> None:
    api.write(5)
    tailer = make_tailer(api.path)
    await tailer.open()
    await drain(tailer)
    # Truncated and refilled beyond our offset before we looked: size alone cannot tell.
    other = Apiserver(api.dir.parent / "other")
    other.count = 1000
    new = other.write(20)
    with open(api.path, "r+b") as f:
        f.write(other.path.read_bytes())
    assert await drain(tailer) == new
    assert tailer.stats.truncations == 1
    assert tailer.stats.truncation_bytes_lost == 0


async def test_copy_truncate_continues_in_the_copy(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    written = api.write(40)
    tailer = make_tailer(api.path, read_size=1024)
    await tailer.open()
    batch = await tailer.read_batch(500)
    assert batch is not None
    got = list(batch.lines)
    written += api.write(5)
    shutil.copyfile(api.path, api.backup_name())  # logrotate copytruncate: copy, then truncate
    os.truncate(api.path, 0)
    written += api.write(4)
    with caplog.at_level(logging.WARNING, "pyforward.tailer"):
        got += await drain(tailer)
    assert got == written  # the lines not yet read came from the copy
    assert tailer.stats.truncations == 1
    assert tailer.stats.truncation_bytes_lost == 0
    assert any("copy-truncate" in r.getMessage() for r in caplog.records)


# --- waiting -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "polling"])
async def test_wait_returns_promptly_on_a_write(
    api: Apiserver, make_tailer: Callable[..., Tailer], use_inotify: bool
) -> None:
    tailer = make_tailer(api.path, use_inotify=use_inotify, poll_interval=0.05)
    await tailer.open()
    assert await tailer.read_batch(MiB) is None
    for _ in range(3):
        waiter = asyncio.create_task(tailer.wait(60))
        done, _ = await asyncio.wait({waiter}, timeout=0.3)
        assert not done, "wait() returned although nothing changed"
        written_at = time.monotonic()
        written = api.write(1)
        async with asyncio.timeout(3):  # far below the 60 s asked for: it returned because of the write
            await waiter
        assert time.monotonic() - written_at < 2
        assert await drain(tailer) == written
    if use_inotify:
        assert tailer._watcher.inotify is not None  # really used inotify, not the poller


async def test_wait_returns_on_timeout(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    tailer = make_tailer(api.path)
    await tailer.open()
    assert await tailer.read_batch(MiB) is None
    started = time.monotonic()
    await tailer.wait(0.2)
    assert 0.15 < time.monotonic() - started < 2


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "polling"])
async def test_rotation_is_noticed_by_wait(
    api: Apiserver, make_tailer: Callable[..., Tailer], use_inotify: bool
) -> None:
    tailer = make_tailer(api.path, use_inotify=use_inotify, poll_interval=0.05)
    await tailer.open()
    written = api.write(2)
    api.rotate()
    written += api.write(2)
    assert await read_lines(tailer, 4) == written


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "polling"])
async def test_directory_missing_then_created_deleted_and_recreated(
    tmp_path: Path, make_tailer: Callable[..., Tailer], use_inotify: bool
) -> None:
    directory = tmp_path / "auditlog"
    tailer = make_tailer(directory / "audit.log", use_inotify=use_inotify, poll_interval=0.05)
    await tailer.open()
    assert await tailer.read_batch(MiB) is None
    waiter = asyncio.create_task(read_lines(tailer, 3))
    api = Apiserver(directory)
    written = api.write(3)
    assert await waiter == written
    shutil.rmtree(directory)
    api = Apiserver(directory)
    api.count = 100
    written = api.write(2)
    assert await read_lines(tailer, 2) == written


async def test_symlinked_log(tmp_path: Path, make_tailer: Callable[..., Tailer]) -> None:
    api = Apiserver(tmp_path / "real")
    link_dir = tmp_path / "auditlog"
    link_dir.mkdir()
    link = link_dir / "audit.log"
    link.symlink_to(api.path)
    tailer = make_tailer(link)
    await tailer.open()
    written = api.write(3)
    assert await read_lines(tailer, 3) == written  # inotify watches the target's directory too
    api.rotate()  # rotated where the real file lives
    written = api.write(2)
    assert await read_lines(tailer, 2) == written
    other = Apiserver(tmp_path / "other")
    other.count = 50
    link.unlink()
    link.symlink_to(other.path)  # re-pointed: a new file
    written = other.write(2)
    assert await read_lines(tailer, 2) == written


CHILD = textwrap.dedent(
    """
    import asyncio, concurrent.futures.thread, logging, os, sys
    from pathlib import Path
    from pyforward.tail import Tailer

    if os.geteuid() == 0:  # root reads anything: become nobody after the imports
        os.setgid(65534)
        os.setuid(65534)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG %(levelname)s %(message)s")

    async def main():
        tailer = Tailer(Path(sys.argv[1]), start=None)
        await tailer.open()
        got = 0
        while got < 3:
            batch = await tailer.read_batch(1 << 20)
            if batch is None:
                await tailer.wait(None)
                continue
            for line in batch.lines:
                print("LINE", line.decode(), flush=True)
                got += 1
        print("ERRORS", tailer.stats.errors, flush=True)
        await tailer.close()

    asyncio.run(main())
    """
)


async def test_permission_denied_is_reported_once_and_retried_without_busy_loop() -> None:
    # A directory nobody (the child's user when we are root) can enter but whose log it cannot read.
    directory = Path(tempfile.mkdtemp(prefix="pyforward-perm-"))
    log_path = directory / "audit.log"
    try:
        directory.chmod(0o755)
        log_path.write_bytes(b"a\nb\nc\n")
        log_path.chmod(0o000)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(log_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert child.stdout is not None
        output: list[str] = []

        async def until(predicate: Callable[[str], bool]) -> None:
            while True:
                line = (await child.stdout.readline()).decode()  # type: ignore[union-attr]
                assert line, f"child ended: {output}"
                output.append(line.rstrip("\n"))
                if predicate(line):
                    return

        try:
            async with asyncio.timeout(20):
                await until(lambda line: "Permission denied" in line)
                # Observation window: a busy loop would retry (and count an error) thousands of times here.
                await asyncio.sleep(0.5)
                log_path.chmod(0o644)
                await until(lambda line: line.startswith("ERRORS"))
                await child.wait()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        [denied] = [x for x in output if "Permission denied" in x]
        assert str(log_path) in denied
        assert "permissions" in denied
        assert [x for x in output if x.startswith("LINE")] == ["LINE a", "LINE b", "LINE c"]
        errors = int(output[-1].split()[1])
        assert 1 <= errors <= 3
    finally:
        log_path.chmod(0o644)
        shutil.rmtree(directory)


async def test_read_batch_cancelled_mid_read_loses_nothing(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    """A caller may time read_batch out; what the thread read meanwhile is not lost (even from a .gz)."""
    written = api.write(2000, pad=200)
    Apiserver.compress(api.rotate())
    written += api.write(10)
    tailer = make_tailer(api.path, read_size=4096)
    await tailer.open()
    got: list[bytes] = []
    cancelled = 0
    async with asyncio.timeout(20):
        for attempt in range(100_000):
            task = asyncio.create_task(tailer.read_batch(8192))
            if attempt % 3:  # cancel two calls in three at some await (often a read in its thread)
                for _ in range(attempt % 7):
                    await asyncio.sleep(0)
                task.cancel()
            await asyncio.wait({task})
            if task.cancelled():
                cancelled += 1
                continue
            batch = task.result()
            if batch is None:
                break
            got.extend(batch.lines)
    assert cancelled > 10
    assert got == written


async def test_closed_tailer_refuses_calls(api: Apiserver) -> None:
    tailer = Tailer(api.path, start=None)
    await tailer.open()
    await tailer.close()
    with pytest.raises(RuntimeError):
        await tailer.read_batch(MiB)


def test_stats_object_is_shared(api: Apiserver) -> None:
    stats = TailerStats()
    assert Tailer(api.path, start=None, stats=stats).stats is stats
    with pytest.raises(ValueError):
        Tailer(api.path, start=None, start_at="middle")  # type: ignore[arg-type]
