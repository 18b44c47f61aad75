"""Tailer, issue 12: start-up that a concurrent rotation cannot fool, and every unread backup that disappears is
a loss that is logged once and counted (and nothing else is).

The races are made deterministic by doing lumberjack's step (rename, or gzip then delete) right after the tailer's
directory listing returns: the wrapped `scan.list_siblings` performs it once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyforward.auditgen import RotatingAuditLog
from pyforward.checkpoint import Position, load_checkpoint, save_checkpoint
from pyforward.tail import Tailer, scan
from tests.unit.test_tailer import Apiserver, drain, read_lines

MiB = 1 << 20


@pytest.fixture
def make_tailer(make_tailer: Callable[..., Tailer]) -> Callable[..., Tailer]:
    """conftest's, polling (use_inotify=False) unless a test asks for inotify."""
    return functools.partial(make_tailer, use_inotify=False)


def after_listing(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object], *, call: int = 1) -> list[int]:
    """Run `action` right after the `call`-th directory listing returns (once). Returns a list holding the number
    of listings made so far (to check the race was hit)."""
    real = scan.list_siblings
    calls = [0]

    def listing(path: Path, spool: Path | None = None) -> list[scan.Sibling]:
        result = real(path, spool)
        calls[0] += 1
        if calls[0] == call:
            action()
        return result

    monkeypatch.setattr(scan, "list_siblings", listing)
    return calls


async def checkpoint_after(
    api: Apiserver, make_tailer: Callable[..., Tailer], lines: int, **kwargs: Any
) -> tuple[list[bytes], Position]:
    """Read `lines` lines from the head (as a previous run), return them and the checkpoint saved after them."""
    tailer = make_tailer(api.path, **kwargs)
    await tailer.open()
    got: list[bytes] = []
    while len(got) < lines:
        batch = await tailer.read_batch(1)  # one line per batch: the checkpoint lands exactly after `lines`
        assert batch is not None
        got.extend(batch.lines)
        end = batch.end
    await tailer.close()
    path = api.dir / ".audit.log.pyforward-checkpoint"
    save_checkpoint(path, end)
    loaded = load_checkpoint(path)
    assert loaded is not None
    return got, loaded


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def history(api: Apiserver) -> list[bytes]:
    """Two old backups (one gzipped), read by an earlier run: a false "lost" would ship them again."""
    lines = api.write(10)
    Apiserver.compress(api.rotate())
    lines += api.write(10)
    api.rotate()
    return lines


# --- start-up racing lumberjack ---------------------------------------------------------------------------------


async def test_restart_racing_a_rotation_resumes_in_the_renamed_file(
    api: Apiserver,
    make_tailer: Callable[..., Tailer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = history(api)
    written = api.write(40)
    _, checkpoint = await checkpoint_after(api, make_tailer, len(old) + 25)
    assert checkpoint.path == str(api.path)
    assert checkpoint.size == api.path.stat().st_size
    written += api.write(5)
    tail: list[bytes] = []

    def rotate() -> None:  # the checkpointed live file becomes a backup the listing does not have
        api.rotate()
        tail.extend(api.write(7))

    calls = after_listing(monkeypatch, rotate)
    tailer = make_tailer(api.path, start=checkpoint)
    with caplog.at_level(logging.INFO, "pyforward.tailer"):
        await tailer.open()
        got = await drain(tailer)
    assert calls[0] >= 2  # the race happened, and was looked at again
    assert got == written[25:] + tail  # the rest of the checkpointed file, then the new one; no history
    assert tailer.stats.checkpoint_misses == 0
    assert tailer.stats.lost_files == 0
    assert errors(caplog) == []


async def test_restart_racing_a_gzip_then_delete_of_the_checkpointed_backup(
    api: Apiserver,
    make_tailer: Callable[..., Tailer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = history(api)
    written = api.write(40)
    backup = api.rotate()
    written += api.write(10)
    _, checkpoint = await checkpoint_after(api, make_tailer, len(old) + 15)
    assert checkpoint.path == str(backup)
    calls = after_listing(monkeypatch, lambda: Apiserver.compress(backup))  # .gz written, then the plain deleted
    tailer = make_tailer(api.path, start=checkpoint)
    with caplog.at_level(logging.INFO, "pyforward.tailer"):
        await tailer.open()
        got = await drain(tailer)
    assert calls[0] >= 1
    assert not backup.exists()
    assert got == written[15:]  # resumed in the .gz at the checkpoint's offset
    assert tailer.stats.compressed_files_read == 1
    assert tailer.stats.checkpoint_misses == 0
    assert tailer.stats.lost_files == 0
    assert errors(caplog) == []


async def test_restart_racing_a_rotation_with_start_at_tail_ships_no_history(
    api: Apiserver, make_tailer: Callable[..., Tailer], monkeypatch: pytest.MonkeyPatch
) -> None:
    history(api)
    api.write(30)
    after_listing(monkeypatch, lambda: (api.rotate(), api.write(3)))  # history, written before we started
    tailer = make_tailer(api.path, start_at="tail")
    await tailer.open()
    assert await drain(tailer) == []
    new = api.write(4)
    api.rotate()  # the file we read is rotated: the backups before it are history, whatever their names
    new += api.write(2)
    assert await read_lines(tailer, len(new)) == new
    assert await drain(tailer) == []


async def test_restart_when_the_checkpointed_file_is_really_gone_says_its_name_and_size(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    api.write(40)
    _, checkpoint = await checkpoint_after(api, make_tailer, 15)
    size = api.path.stat().st_size
    assert checkpoint.size == size
    api.rotate().unlink()  # rotated away and deleted while we were down
    remaining = api.write(10)
    tailer = make_tailer(api.path, start=checkpoint)
    with caplog.at_level(logging.ERROR, "pyforward.tailer"):
        await tailer.open()
        assert await drain(tailer) == remaining
    [message] = errors(caplog)
    assert str(api.path) in message
    assert f"{size} bytes when last seen" in message
    assert f"at least {size - checkpoint.offset} bytes unread" in message
    assert tailer.stats.checkpoint_misses == 1
    assert tailer.stats.lost_files == 1
    assert tailer.stats.lost_bytes == size - checkpoint.offset


async def test_start_up_among_many_gz_backups_racing_the_mill(
    api: Apiserver,
    make_tailer: Callable[..., Tailer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's setting: many gzipped backups make the look-up long; meanwhile lumberjack rotates, and its mill
    deletes the oldest backups and gzips the plain ones, the checkpointed one included."""
    for _ in range(60):
        api.write(5)
        Apiserver.compress(api.rotate())
    written = api.write(20)
    checkpointed = api.rotate()
    written += api.write(20)
    newest = api.rotate()
    written += api.write(5)
    _, checkpoint = await checkpoint_after(api, make_tailer, 60 * 5 + 8)
    assert checkpoint.path == str(checkpointed)
    tail: list[bytes] = []

    def mill() -> None:
        rotated = api.rotate()
        tail.extend(api.write(3))
        for old in sorted(api.dir.glob("audit-*.log.gz"))[:5]:
            old.unlink()
        for plain in (checkpointed, newest, rotated):
            Apiserver.compress(plain)

    after_listing(monkeypatch, mill)
    tailer = make_tailer(api.path, start=checkpoint)
    with caplog.at_level(logging.INFO, "pyforward.tailer"):
        await tailer.open()
        got = await drain(tailer)
    assert got == written[8:] + tail
    assert tailer.stats.checkpoint_misses == 0
    assert tailer.stats.lost_files == 0
    assert errors(caplog) == []


# --- losses while running -------------------------------------------------------------------------------------


def three_backups(api: Apiserver) -> tuple[list[bytes], list[Path]]:
    written: list[bytes] = []
    paths = []
    for _ in range(3):
        written += api.write(20)
        paths.append(api.rotate())
    written += api.write(5)
    return written, paths


async def test_unread_backup_deleted_while_behind_is_an_error_once_and_counted(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    written, (first, second, third) = three_backups(api)
    tailer = make_tailer(api.path, read_size=256)
    await tailer.open()
    batch = await tailer.read_batch(1)  # reading the oldest backup; the receiver is down: no further reads
    assert batch is not None
    assert batch.end.path == str(first)
    sizes = [p.stat().st_size for p in (first, second, third, api.path)]
    size, files, log_files = await asyncio.to_thread(tailer.backlog)
    assert (size, files, log_files) == (sum(sizes) - batch.end.offset, 4, 4)
    lost = second.stat().st_size
    second.unlink()  # lumberjack's retention ran out
    with caplog.at_level(logging.ERROR, "pyforward.tailer"):
        size, files, log_files = await asyncio.to_thread(tailer.backlog)  # a metrics update looks
        assert (size, files, log_files) == (sum(sizes) - lost - batch.end.offset, 3, 3)
        await asyncio.to_thread(tailer.backlog)
        got = list(batch.lines) + await drain(tailer)
    [message] = errors(caplog)
    assert str(second) in message
    assert f"{lost} bytes (about 20 lines)" in message
    assert "--audit-log-maxbackup" in message
    record = next(r for r in caplog.records if r.levelno >= logging.ERROR)
    assert record.lost_bytes == lost  # type: ignore[attr-defined]  # a field of the JSON log line
    assert tailer.stats.lost_files == 1
    assert tailer.stats.lost_bytes == lost
    assert got == written[:20] + written[40:]  # everything still on disk arrived


async def test_unread_backup_deleted_is_found_when_advancing(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    written, (_first, second, _) = three_backups(api)
    tailer = make_tailer(api.path, read_size=256)
    await tailer.open()
    batch = await tailer.read_batch(1)
    assert batch is not None
    lost = second.stat().st_size
    second.unlink()
    with caplog.at_level(logging.ERROR, "pyforward.tailer"):
        got = list(batch.lines) + await drain(tailer)  # the listing at the next file sees it gone
    assert got == written[:20] + written[40:]
    assert len(errors(caplog)) == 1
    assert (tailer.stats.lost_files, tailer.stats.lost_bytes) == (1, lost)


async def test_no_false_loss_for_gzip_then_delete_the_file_being_read_and_finished_files(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    written, (first, second, third) = three_backups(api)
    tailer = make_tailer(api.path, read_size=256)
    await tailer.open()
    batch = await tailer.read_batch(1)
    assert batch is not None
    got = list(batch.lines)
    with caplog.at_level(logging.INFO, "pyforward.tailer"):
        await asyncio.to_thread(tailer.backlog)
        gz = Apiserver.compress(second)  # unread, replaced by its .gz: not a loss
        first.unlink()  # the file being read (held open): not a loss
        await asyncio.to_thread(tailer.backlog)
        got += await read_lines(tailer, 40)  # the rest of first, and second from its .gz
        gz.unlink()  # read already
        await asyncio.to_thread(tailer.backlog)
        got += await drain(tailer)
    assert got == written
    assert errors(caplog) == []
    assert tailer.stats.lost_files == 0
    del third


@pytest.mark.parametrize("inotify", [False, True])
@pytest.mark.parametrize("looks", ["plain", "gz", "none"])
async def test_no_false_loss_when_the_live_file_being_read_is_rotated_gzipped_and_deleted(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture, looks: str, inotify: bool
) -> None:
    """The receiver is down while we are in the live file; lumberjack rotates it, gzips it and deletes it: we hold it
    open, so nothing is lost. Identified by inode while plain, by its decompressed head once gzipped, and taken to be
    the oldest unread backup when it was never seen (inotify knows its name only)."""
    tailer = make_tailer(api.path, read_size=256, use_inotify=inotify)
    await tailer.open()
    written = api.write(30)
    batch = await tailer.read_batch(1)
    assert batch is not None
    got = list(batch.lines)
    with caplog.at_level(logging.INFO, "pyforward.tailer"):
        await asyncio.to_thread(tailer.backlog)
        backup = api.rotate()
        written += api.write(5)
        if looks == "plain":
            await asyncio.to_thread(tailer.backlog)
        gz = Apiserver.compress(backup)
        if looks == "gz":
            await asyncio.to_thread(tailer.backlog)
        gz.unlink()
        _, files, _ = await asyncio.to_thread(tailer.backlog)
        got += await drain(tailer)
    assert got == written
    assert errors(caplog) == []
    assert tailer.stats.lost_files == 0
    assert files == 2  # the file being read and the new live file


async def test_losses_from_lumberjacks_mill_are_counted_exactly_when_looked_at_each_rotation(
    tmp_path: Path, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    """maxbackup=2 with gzip, the receiver down: the mill deletes backups we never read. Each one seen is an ERROR
    and counted at its size; everything still on disk is read."""
    path = tmp_path / "audit.log"
    writer = RotatingAuditLog(path, max_bytes=4000, max_backups=2, compress=True, mill=True)
    tailer = make_tailer(path, read_size=512)

    def event(prefix: bytes, i: int) -> bytes:
        return b'{"kind":"Event","auditID":"%s%07d","pad":"%s"}' % (prefix, i, b"y" * 60)

    try:
        writer.write_many([event(b"a", i) for i in range(100)])
        assert writer.settle(10)
        reading = writer.backups()[0]  # the oldest backup: the tailer starts there, then the receiver goes down
        await tailer.open()
        batch = await tailer.read_batch(1)
        assert batch is not None
        assert batch.end.path == str(reading)
        got = list(batch.lines)
        sizes: dict[str, int] = {}
        with caplog.at_level(logging.ERROR, "pyforward.tailer"):
            for n in range(8):
                writer.write_many([event(b"b%d-" % n, i) for i in range(30)])  # < max_bytes: one rotation at most
                assert writer.settle(10)
                for p in writer.backups():
                    sizes[p.name] = p.stat().st_size
                await asyncio.to_thread(tailer.backlog)  # a metrics update
            on_disk = {p.name for p in writer.backups()}
            got += await drain(tailer)
        assert writer.mill_errors == []
    finally:
        writer.close()
    lost = sorted(name for name in sizes if name not in on_disk and name != reading.name)
    messages = errors(caplog)
    assert len(lost) >= 3
    assert [name for m in messages for name in lost if name in m] == lost  # one ERROR per file, in order
    assert tailer.stats.lost_files == len(lost) == len(messages)
    assert tailer.stats.lost_bytes == sum(sizes[name] for name in lost)
    assert len(set(got)) == len(got)
    assert got[-1] == event(b"b7-", 29)  # the rest arrived


async def test_backlog_counts_every_unread_backup_and_lists_only_when_the_directory_changed(
    api: Apiserver, make_tailer: Callable[..., Tailer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, backups = three_backups(api)
    gz = Apiserver.compress(backups[2])
    tailer = make_tailer(api.path)
    calls = after_listing(monkeypatch, lambda: None)
    await tailer.open()
    listings = calls[0]
    size, files, log_files = await asyncio.to_thread(tailer.backlog)
    expected = sum(p.stat().st_size for p in (*backups[:2], gz, api.path))  # the .gz at its size on disk
    assert (size, files, log_files) == (expected, 4, 4)
    os.utime(api.dir, ns=(1, 1))  # an old directory mtime: the last listing is not "racy" any more
    await asyncio.to_thread(tailer.backlog)
    listings = calls[0]
    for _ in range(3):
        await asyncio.to_thread(tailer.backlog)
    assert calls[0] == listings  # unchanged directory: no listing
    api.rotate()
    await asyncio.to_thread(tailer.backlog)
    assert calls[0] == listings + 1


# --- with inotify: a look at each rotation, not only at each metrics update -------------------------------------


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait (on the event loop, which must process the directory events) until `predicate()` is true."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_with_inotify_each_rotation_is_looked_at_and_every_deleted_backup_counted_with_its_size(
    tmp_path: Path, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    writer = RotatingAuditLog(path, max_bytes=4000, max_backups=2, compress=True, mill=True)
    tailer = make_tailer(path, read_size=512, use_inotify=True)

    def event(prefix: bytes, i: int) -> bytes:
        return b'{"kind":"Event","auditID":"%s%07d","pad":"%s"}' % (prefix, i, b"y" * 60)

    def looked_since(before: int) -> Callable[[], bool]:
        # A listing begun after `before` was taken into account (white box: the ledger's listing numbers).
        return lambda: tailer._ledger._applied > before

    try:
        writer.write_many([event(b"a", i) for i in range(100)])
        assert writer.settle(10)
        reading = writer.backups()[0]
        await tailer.open()
        batch = await tailer.read_batch(1)
        assert batch is not None
        assert batch.end.path == str(reading)
        sizes: dict[str, int] = {}
        with caplog.at_level(logging.ERROR, "pyforward.tailer"):
            for n in range(8):
                rotations, i = writer.rotations, 0
                while writer.rotations == rotations:  # exactly one rotation
                    writer.write(event(b"b%d-" % n, i))
                    i += 1
                assert writer.settle(10)
                for p in writer.backups():
                    sizes[p.name] = p.stat().st_size
                await until(looked_since(tailer._ledger._seq))  # the events made a look, begun after the mill
            on_disk = {p.name for p in writer.backups()}
    finally:
        writer.close()
    lost = sorted(name for name in sizes if name not in on_disk and name != reading.name)
    assert len(lost) >= 5
    assert [name for m in errors(caplog) for name in lost if name in m] == lost
    assert tailer.stats.lost_files == len(lost)
    assert tailer.stats.lost_bytes == sum(sizes[name] for name in lost)


async def test_with_inotify_a_backup_gone_before_any_look_is_a_loss_of_unknown_size(
    api: Apiserver, make_tailer: Callable[..., Tailer], caplog: pytest.LogCaptureFixture
) -> None:
    written, (first, _, _) = three_backups(api)
    tailer = make_tailer(api.path, read_size=256, use_inotify=True)
    await tailer.open()
    batch = await tailer.read_batch(1)
    assert batch is not None
    assert batch.end.path == str(first)
    with caplog.at_level(logging.ERROR, "pyforward.tailer"):
        # Created and deleted with no chance for the tailer to look in between (no await): only its name is known.
        quick = api.rotate()  # with the 5 lines written into the live file by three_backups()
        lost = written[-5:]
        written += api.write(7)
        Apiserver.compress(quick).unlink()
        written += api.write(3)
        await until(lambda: tailer.stats.lost_files == 1)
        got = list(batch.lines) + await drain(tailer)
    [message] = errors(caplog)
    assert quick.name in message  # (as .log.gz: the name it had last)
    assert "how many is unknown" in message
    assert tailer.stats.lost_bytes == 0  # a lower bound: never seen, no size
    assert got == [line for line in written if line not in lost]
