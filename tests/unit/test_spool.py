"""The spool (issue 21): hard links keep unshipped backups from lumberjack's retention, are removed once a saved
checkpoint has passed them, and a guard releases the oldest (a counted loss) over the budget or under the free-space
floor. Real files, real links, real Tailers; lumberjack's steps are done by hand (Apiserver) so that every race is
deterministic: the tailer's listing that links a backup is made where the test says (Tailer.backlog(), as the listing
an inotify name event makes)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyforward.checkpoint import FileIdentity, Position
from pyforward.tail import Tailer, scan
from pyforward.tail.spool import Spool
from tests.unit.test_tailer import Apiserver, drain

MiB = 1 << 20


@pytest.fixture
def spool_dir(api: Apiserver) -> Path:
    return api.dir / ".pyforward-spool"


@pytest.fixture
def make_tailer(make_tailer: Callable[..., Tailer], spool_dir: Path) -> Callable[..., Tailer]:
    """conftest's, polling (listings only where the test makes them), with the spool on."""
    return functools.partial(make_tailer, use_inotify=False, spool_dir=spool_dir)


def spooled(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.iterdir()) if spool_dir.exists() else []


async def look(tailer: Tailer) -> None:
    """A listing, as the one an inotify name event makes (and a /metrics scrape)."""
    await asyncio.to_thread(tailer.backlog)


def retention(api: Apiserver, keep: int) -> None:
    """lumberjack's retention: delete the oldest backups beyond `keep` (its names only)."""
    backups = sorted(p for p in api.dir.iterdir() if p.name.startswith("audit-"))
    for old in backups[: max(0, len(backups) - keep)]:
        old.unlink()


def live_position(api: Apiserver) -> Position:
    """A position in the live log (what a checkpoint saved once the tailer reads the live file names)."""
    st = os.stat(api.path)
    head = api.path.read_bytes()[:4096]
    return Position(FileIdentity.of(st.st_dev, st.st_ino, head), offset=len(head), path=str(api.path))


def test_listing_merges_the_spool_by_timestamp(api: Apiserver, spool_dir: Path) -> None:
    spool_dir.mkdir()
    api.write(3)
    gone = api.rotate()  # only in the spool now
    os.link(gone, spool_dir / gone.name)
    gone.unlink()
    api.write(3)
    gzipped = api.rotate()  # the spool keeps the plain inode, lumberjack has its .gz
    os.link(gzipped, spool_dir / gzipped.name)
    gz = Apiserver.compress(gzipped)
    api.write(3)
    both = api.rotate()  # still in the log directory too: its name there is read
    os.link(both, spool_dir / both.name)
    siblings = scan.list_siblings(api.path, spool_dir)
    assert [(s.path, s.gz) for s in siblings] == [
        (spool_dir / gone.name, False),
        (spool_dir / gzipped.name, False),
        (both, False),
    ]
    assert set(siblings[1].names) == {gz, spool_dir / gzipped.name}
    assert scan.list_siblings(api.path) == [
        scan.Sibling(gz, siblings[1].ts, True, (gz,)),
        scan.Sibling(both, siblings[2].ts, False, (both,)),
    ]


async def test_backups_deleted_by_retention_are_read_from_the_spool_and_unlinked_once_saved(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path
) -> None:
    lines = api.write(5)
    tailer = make_tailer(api.path)
    await tailer.open()
    first = await tailer.read_batch(1)  # one line: the tailer stays in the live file, far behind
    assert first is not None
    for _ in range(6):  # six rotations, lumberjack keeps one backup
        api.rotate()
        await look(tailer)
        lines += api.write(5)
        retention(api, keep=1)
    assert len(spooled(spool_dir)) == 6  # the first one is the file being read: linked once rotated too
    got = first.lines + await drain(tailer)
    assert got == lines
    assert tailer.stats.lost_files == 0
    # Read to the end is not done: only a saved checkpoint past a file removes its link.
    assert len(spooled(spool_dir)) == 6
    assert tailer.spool is not None
    assert tailer.spool.saved(live_position(api))
    await asyncio.to_thread(tailer.spool.prune)
    assert spooled(spool_dir) == []


async def test_a_checkpoint_in_a_backup_keeps_it_and_what_follows(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path
) -> None:
    api.write(5)
    tailer = make_tailer(api.path)
    await tailer.open()
    backups = []
    for _ in range(3):
        api.write(5)
        backups.append(api.rotate())
    await look(tailer)
    batches = []
    while (batch := await tailer.read_batch(1)) is not None:
        batches.append(batch)
    in_second = next(b.end for b in batches if b.end.path == str(backups[1]) and b.end.offset > 0)
    assert tailer.spool is not None
    assert tailer.spool.saved(in_second)  # the first backup (and the file before it) are passed
    await asyncio.to_thread(tailer.spool.prune)
    assert spooled(spool_dir) == sorted(b.name for b in backups[1:])


async def test_over_the_budget_the_oldest_file_not_read_yet_is_released_logged_and_counted(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.write(1)
    tailer = make_tailer(api.path, spool_max_bytes=6000)
    await tailer.open()
    assert await tailer.read_batch(MiB) is not None  # caught up in the live file
    backups = []
    for _ in range(4):
        api.write(20)  # 2,740 bytes each
        backups.append(api.rotate())
        await look(tailer)
    for backup in backups:  # the retention deletes all four: only the spool keeps them (~11 KB > 6,000)
        backup.unlink()
    with caplog.at_level(logging.INFO, logger="pyforward.tailer"):
        await look(tailer)
    # The files not read yet go first, oldest first (the first backup is the file being read: it goes last).
    assert spooled(spool_dir) == sorted([backups[0].name, backups[3].name])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert str(spool_dir / backups[1].name) in errors[0].getMessage()
    assert "(2740 bytes)" in errors[0].getMessage()
    assert "its 2740 unread bytes (about 20 lines)" in errors[0].getMessage()
    assert "PYFORWARD_SPOOL_MAX_BYTES" in errors[0].getMessage()
    assert tailer.spool is not None
    assert tailer.spool.released_files == 2
    got = await drain(tailer)
    assert len(got) == 40  # the rest of the file being read, and the newest backup
    await look(tailer)
    assert tailer.stats.lost_files == 0  # not counted a second time as the retention's


async def test_the_file_being_read_is_released_its_rest_skipped_and_its_fd_closed(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path
) -> None:
    api.write(40)
    tailer = make_tailer(api.path, spool_max_bytes=1000)
    await tailer.open()
    batch = await tailer.read_batch(1)
    assert batch is not None
    backup = api.rotate()
    api.write(5)
    await look(tailer)
    assert spooled(spool_dir) == [backup.name]
    fd = tailer._cur.fd if tailer._cur is not None else -1
    backup.unlink()  # retention: only the spool keeps it now, and it is over the budget
    await look(tailer)
    await asyncio.sleep(0)  # the loop runs the drop the guard scheduled
    assert tailer.spool is not None
    assert tailer.spool.released_files == 1
    assert tailer.spool.released_bytes == 39 * (len(batch.lines[0]) + 1)
    assert spooled(spool_dir) == []
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the space is free
    assert len(await drain(tailer)) == 5  # on with the live file


async def test_under_the_free_space_floor_files_only_the_spool_keeps_are_released(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.write(1)
    tailer = make_tailer(api.path, spool_min_free=1 << 62)  # a floor no file system reaches
    await tailer.open()
    assert await tailer.read_batch(MiB) is not None
    kept = []
    for _ in range(2):
        api.write(5)
        kept.append(api.rotate())
        await look(tailer)
    assert len(spooled(spool_dir)) == 2  # lumberjack still keeps them: they cost nothing, nothing released
    kept[0].unlink()
    with caplog.at_level(logging.ERROR, logger="pyforward.tailer"):
        await look(tailer)
    assert spooled(spool_dir) == [kept[1].name]
    assert "below the floor" in caplog.records[0].getMessage()


async def test_a_spool_left_by_an_earlier_run_is_adopted_and_what_the_checkpoint_passed_removed(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = api.write(5)
    first = make_tailer(api.path)
    await first.open()
    backups = []
    for _ in range(3):
        lines += api.write(5)
        backups.append(api.rotate())
        await look(first)
    batches = []
    while (batch := await first.read_batch(1)) is not None:
        batches.append(batch)
    checkpoint = next(b.end for b in batches if b.end.path == str(backups[1]))
    await first.close()  # as if killed: no checkpoint was saved, the spool stays as it is
    (spool_dir / "notes.txt").write_text("an operator's file\n")
    for backup in backups:
        backup.unlink()
    with caplog.at_level(logging.INFO, logger="pyforward.tailer"):
        second = make_tailer(api.path, start=checkpoint)
        await second.open()
        rest = await drain(second)
    assert rest == lines[11:]  # the second backup holds lines 10-14: resumed after its first line
    assert spooled(spool_dir) == sorted([backups[1].name, backups[2].name, "notes.txt"])
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"removed {spool_dir / backups[0].name} from the spool" in m for m in messages)
    assert [m for m in messages if "notes.txt" in m and "left alone" in m]
    assert second.stats.lost_files == 0


async def test_where_links_cannot_be_made_one_warning_and_the_spool_is_off(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir.write_text("not a directory\n")
    lines = api.write(5)
    with caplog.at_level(logging.WARNING, logger="pyforward.tailer"):
        tailer = make_tailer(api.path)
        await tailer.open()
        api.rotate()
        lines += api.write(5)
        await look(tailer)
        assert await drain(tailer) == lines
    [warning] = [r.getMessage() for r in caplog.records]
    assert "cannot be used" in warning
    assert "PYFORWARD_SPOOL_DIR" in warning
    assert tailer.spool is not None
    assert not tailer.spool.active


async def test_spool_max_bytes_0_turns_it_off(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path
) -> None:
    lines = api.write(5)
    tailer = make_tailer(api.path, spool_max_bytes=0)
    await tailer.open()
    api.rotate()
    await look(tailer)
    assert not spool_dir.exists()
    assert await drain(tailer) == lines


def test_a_link_an_earlier_run_made_is_taken_as_it_is(api: Apiserver, spool_dir: Path) -> None:
    """SIGKILL after link(2) and before the listing that would have seen it: EEXIST for the same inode."""
    api.write(5)
    backup = api.rotate()
    spool = Spool(api.path, spool_dir)
    spool.start()
    os.link(backup, spool_dir / backup.name)
    spool.begin(None)
    siblings = scan.list_siblings(api.path)  # (as listed before the link: the spool's name not in it)
    spool.take(siblings)
    status = spool.status()
    assert (status.files, status.bytes, status.linked_bytes) == (1, 0, backup.stat().st_size)
    assert status.active
    assert status.free is not None
    assert status.floor is not None


async def test_a_plain_file_the_api_server_keeps_as_gz_is_swapped_for_it_before_anything_is_lost(
    api: Apiserver, make_tailer: Callable[..., Tailer], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = api.write(1)
    tailer = make_tailer(api.path, spool_max_bytes=1000)
    await tailer.open()
    assert await tailer.read_batch(MiB) is not None
    backups = []
    for _ in range(2):
        lines += api.write(20)
        backups.append(api.rotate())
        await look(tailer)
    for backup in backups:  # lumberjack's mill: the .gz written, the plain file deleted (only the spool keeps it)
        Apiserver.compress(backup)
    with caplog.at_level(logging.INFO, logger="pyforward.tailer"):
        await look(tailer)
    # The first backup is the file being read (kept open); both swapped: the spool holds lumberjack's .gz now.
    assert spooled(spool_dir) == sorted(b.name + ".gz" for b in backups)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([r for r in caplog.records if "nothing is lost" in r.getMessage()]) == 2
    assert tailer.spool is not None
    assert tailer.spool.released_files == 0
    assert lines[1:] == await drain(tailer)
    assert tailer.spool.status().bytes == 0  # lumberjack still keeps them: they cost the spool nothing


def test_both_forms_left_by_a_swap_a_sigkill_cut_short_are_finished(api: Apiserver, spool_dir: Path) -> None:
    api.write(5)
    backup = api.rotate()
    spool_dir.mkdir()
    os.link(backup, spool_dir / backup.name)
    gz = Apiserver.compress(backup)
    os.link(gz, spool_dir / gz.name)  # linked; the plain file's unlink did not happen
    spool = Spool(api.path, spool_dir)
    spool.start()
    spool.take(scan.list_siblings(api.path, spool_dir))
    spool.begin(None)
    assert spooled(spool_dir) == [gz.name]


def test_a_checkpoint_in_the_live_log_passes_the_backups_only_if_the_log_is_still_that_file(
    api: Apiserver, spool_dir: Path
) -> None:
    """The live log is known by inode AND first bytes: an inode is reused once a file is deleted (a released backup's
    inode can be the next live log's), and a position in a file that is gone must not pass anything."""
    api.write(5)
    backup = api.rotate()
    api.write(5)
    spool = Spool(api.path, spool_dir)
    spool.start()
    spool.begin(None)
    spool.take(scan.list_siblings(api.path, spool_dir))
    assert spooled(spool_dir) == [backup.name]
    position = live_position(api)
    with open(api.path, "r+b") as f:  # same inode, other first bytes: not the file the position was taken in
        f.write(b"X")
    assert not spool.saved(position)
    with open(api.path, "r+b") as f:
        f.write(b"{")
    assert spool.saved(position)  # the same file again: the backup before it is passed
    spool.prune()
    assert spooled(spool_dir) == []
