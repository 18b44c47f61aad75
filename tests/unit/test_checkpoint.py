"""Checkpoint file, ack tracking and the background writer: real files, real permission failures."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pyforward.checkpoint import (
    FINGERPRINT_BYTES,
    RECORD_BYTES,
    AckTracker,
    CheckpointError,
    CheckpointFile,
    CheckpointWriter,
    FileIdentity,
    Position,
    load_checkpoint,
    save_checkpoint,
)


def pos(offset: int, ino: int = 7, head: bytes = b"first line\n") -> Position:
    return Position(file=FileIdentity.of(64769, ino, head), offset=offset, path="/auditlog/audit.log")


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# --- FileIdentity ------------------------------------------------------------------------------------------


def test_identity_matches_its_head_and_longer_heads_only() -> None:
    head = os.urandom(FINGERPRINT_BYTES + 100)
    full = FileIdentity.of(1, 2, head)
    assert full.fp_len == FINGERPRINT_BYTES
    assert full.fp_hash == hashlib.sha256(head[:FINGERPRINT_BYTES]).hexdigest()
    assert full.matches_head(head)
    assert full.matches_head(head[:FINGERPRINT_BYTES])
    assert not full.matches_head(head[: FINGERPRINT_BYTES - 1])  # shorter than the fingerprint
    assert not full.matches_head(bytes([head[0] ^ 0xFF]) + head[1:])  # (b"X" + ... matched 1 time in 256)
    short = FileIdentity.of(1, 2, head[:10])
    assert short.fp_len == 10
    assert short.matches_head(head)  # the file grew since: still the same file
    assert not short.matches_head(head[:9])


# --- the file ----------------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / ".audit.log.pyforward-checkpoint"
    position = pos(12345)
    save_checkpoint(path, position)
    assert load_checkpoint(path) == position
    assert json.loads(path.read_bytes())["version"] == 1
    newer = pos(99999, ino=8)
    save_checkpoint(path, newer)
    assert load_checkpoint(path) == newer
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind


def test_no_checkpoint_file_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "absent") is None


def _valid() -> dict[str, object]:
    return {
        "version": 1,
        "file": {"dev": 1, "ino": 2, "fp_len": 3, "fp_hash": hashlib.sha256(b"abc").hexdigest()},
        "offset": 4,
        "path": "/auditlog/audit.log",
    }


def _with(change: Callable[[dict[str, object]], object]) -> bytes:
    doc = _valid()
    change(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\x00\x17\xffgarbage", "not JSON"),
        (json.dumps(_valid()).encode()[:40], "not JSON"),  # cut short (a write that was not atomic)
        (b"", "empty"),
        (b"\n", "empty"),
        (b"[1, 2]", "version"),
        (_with(lambda d: d.update(version=2)), "version 2"),
        (_with(lambda d: d.pop("version")), "version None"),
        (_with(lambda d: d.pop("offset")), "offset"),
        (_with(lambda d: d.update(offset=-1)), "offset is negative"),
        (_with(lambda d: d.update(offset=True)), "offset"),
        (_with(lambda d: d.update(offset="12")), "offset"),
        (_with(lambda d: d.update(file=None)), "file"),
        (_with(lambda d: d["file"].update(fp_hash="zz")), "fp_hash"),  # type: ignore[attr-defined]
        (_with(lambda d: d["file"].update(fp_len=FINGERPRINT_BYTES + 1)), "fp_len"),  # type: ignore[attr-defined]
        (_with(lambda d: d["file"].pop("ino")), "ino"),  # type: ignore[attr-defined]
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "checkpoint"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert says in message
    assert "delete it to start per PYFORWARD_START_AT" in message  # what the operator can do


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    path.mkdir()  # read() fails with EISDIR
    with pytest.raises(CheckpointError, match=r"cannot be read .*: fix its permissions, or delete it"):
        load_checkpoint(path)


SAVE_AS_NOBODY = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from pyforward.checkpoint import FileIdentity, Position, save_checkpoint

    os.setgid(65534)
    os.setuid(65534)
    try:
        save_checkpoint(Path(sys.argv[1]), Position(FileIdentity.of(1, 2, b"x"), 3, "p"))
    except OSError as e:
        print("OSError", e.errno)
    else:
        print("saved")
    """
)


def test_save_into_read_only_dir_raises_and_keeps_the_last_good_file(tmp_path: Path) -> None:
    good = pos(100)
    if os.geteuid() != 0:
        directory = tmp_path / "ro"
        directory.mkdir()
        path = directory / "checkpoint"
        save_checkpoint(path, good)
        directory.chmod(0o555)
        try:
            with pytest.raises(OSError):
                save_checkpoint(path, pos(200))
        finally:
            directory.chmod(0o755)
        assert load_checkpoint(path) == good
        assert [p.name for p in directory.iterdir()] == ["checkpoint"]
        return
    # root writes anywhere: try as nobody in a child process, in a directory nobody may enter but not write.
    directory = Path(tempfile.mkdtemp(prefix="pyforward-ro-"))
    try:
        directory.chmod(0o755)
        path = directory / "checkpoint"
        save_checkpoint(path, good)
        out = subprocess.run(
            [sys.executable, "-c", SAVE_AS_NOBODY, str(path)], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        assert out.split() == ["OSError", "13"]
        assert load_checkpoint(path) == good
        assert [p.name for p in directory.iterdir()] == ["checkpoint"]
    finally:
        shutil.rmtree(directory)


def test_save_into_missing_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "gone" / "checkpoint", pos(1))


# --- CheckpointFile: saved in place ------------------------------------------------------------------------


def test_checkpoint_file_saves_in_place_one_padded_json_document(tmp_path: Path) -> None:
    """The first save creates the file (atomically), the later ones overwrite its one record in place: same inode,
    one sector, and still a single JSON document (any pyforward, older ones too, reads it)."""
    path = tmp_path / "checkpoint"
    file = CheckpointFile(path)
    file.save(pos(1))
    inode = path.stat().st_ino
    for n in range(2, 20):
        file.save(pos(n))
    assert path.stat().st_ino == inode
    raw = path.read_bytes()
    assert len(raw) == RECORD_BYTES
    assert raw.endswith(b"\n")
    assert json.loads(raw)["offset"] == 19
    assert load_checkpoint(path) == pos(19)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    file.close()


def test_checkpoint_file_recreates_a_file_deleted_or_replaced_under_it(tmp_path: Path) -> None:
    """Somebody deleted the checkpoint, or put another file in its place: the next save writes the path again, not
    the file it had open (which nobody would read)."""
    path = tmp_path / "checkpoint"
    file = CheckpointFile(path)
    file.save(pos(1))
    path.unlink()
    file.save(pos(2))
    assert load_checkpoint(path) == pos(2)
    save_checkpoint(path, pos(3, ino=9))  # replaced: another inode (an older pyforward's format, unpadded)
    file.save(pos(4))
    assert load_checkpoint(path) == pos(4)
    assert len(path.read_bytes()) == RECORD_BYTES
    inode = path.stat().st_ino
    file.save(pos(5))
    assert path.stat().st_ino == inode  # in place again
    file.close()


def test_checkpoint_file_too_long_for_a_sector_is_replaced_whole(tmp_path: Path) -> None:
    """A record that does not fit one sector (a long log path) is saved by replacing the file, never in place."""
    path = tmp_path / "checkpoint"
    file = CheckpointFile(path)
    file.save(pos(1))
    long = Position(file=pos(2).file, offset=2, path="/auditlog/" + "d" * 600 + "/audit.log")
    inode = path.stat().st_ino
    file.save(long)
    assert load_checkpoint(path) == long
    assert path.stat().st_ino != inode
    file.save(pos(3))
    assert load_checkpoint(path) == pos(3)
    file.close()


SAVE_UNTIL_KILLED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pyforward.checkpoint import CheckpointFile, FileIdentity, Position

    file = CheckpointFile(Path(sys.argv[1]))
    identity = FileIdentity.of(1, 2, b"first line\\n")
    n = 0
    while True:
        n += 1
        file.save(Position(identity, n, "/auditlog/audit.log"))
        sys.stdout.write(f"{n}\\n")
        sys.stdout.flush()
    """
)


def test_checkpoint_file_killed_mid_save_leaves_a_whole_record(tmp_path: Path) -> None:
    """SIGKILL at any moment of in-place saves: the file holds a whole record, at least the last save that returned
    (a save that emptied the file before writing it, or wrote it in pieces, would leave one that does not load)."""
    path = tmp_path / "checkpoint"
    for kill in range(8):
        child = subprocess.Popen([sys.executable, "-c", SAVE_UNTIL_KILLED, str(path)], stdout=subprocess.PIPE)
        assert child.stdout is not None
        last = 0
        for _ in range(5 + 7 * kill):  # a different moment each time
            last = int(child.stdout.readline())
        child.kill()
        child.wait()
        saved = load_checkpoint(path)
        assert saved is not None
        assert saved.offset >= last, f"kill {kill}: offset {saved.offset}, but save {last} had returned"
        child.stdout.close()


# --- AckTracker --------------------------------------------------------------------------------------------


def test_acks_in_order_advance_each_time() -> None:
    tracker = AckTracker()
    seqs = [tracker.register(pos(n)) for n in (10, 20, 30)]
    assert tracker.pending == 3
    assert [tracker.ack(s) for s in seqs] == [pos(10), pos(20), pos(30)]
    assert tracker.pending == 0
    assert tracker.high_water == pos(30)


def test_out_of_order_acks_advance_only_over_contiguous_ranges() -> None:
    tracker = AckTracker()
    s = [tracker.register(pos(n * 10)) for n in range(1, 7)]
    assert tracker.ack(s[2]) is None  # 0 and 1 still unacked: a crash now must resend them
    assert tracker.ack(s[1]) is None
    assert tracker.high_water is None
    assert tracker.pending == 4
    assert tracker.ack(s[0]) == pos(30)  # 0, 1, 2 contiguous now
    assert tracker.ack(s[5]) is None
    assert tracker.ack(s[3]) == pos(40)
    assert tracker.pending == 1
    late = tracker.register(pos(70))
    assert tracker.ack(late) is None
    assert tracker.ack(s[4]) == pos(70)
    assert tracker.pending == 0


def test_repeated_and_unknown_acks() -> None:
    tracker = AckTracker()
    a = tracker.register(pos(1))
    b = tracker.register(pos(2))
    assert tracker.ack(b) is None
    assert tracker.ack(b) is None  # again, still waiting for a
    assert tracker.ack(a) == pos(2)
    assert tracker.ack(a) is None  # long done
    with pytest.raises(ValueError, match="never registered"):
        tracker.ack(5)


# --- CheckpointWriter --------------------------------------------------------------------------------------


async def test_writer_coalesces_and_writes_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    writer = CheckpointWriter(path)
    for n in range(1, 501):
        writer.update(pos(n))
    await writer.flush()
    assert load_checkpoint(path) == pos(500)
    assert writer.last_written == pos(500)
    assert 1 <= writer.writes < 100  # not one fsync'ed write per update
    writer.update(pos(501))
    await writer.close()
    assert load_checkpoint(path) == pos(501)
    with pytest.raises(RuntimeError):
        writer.update(pos(502))


async def test_writer_failure_is_logged_once_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / "checkpoint"
    writer = CheckpointWriter(path, retry_delay=0.05)
    writer.update(pos(1))
    await writer.flush()
    # The directory turns into something a temp file cannot be created in (as a read-only or full disk would).
    directory.rename(tmp_path / "moved")
    directory.write_bytes(b"")
    with caplog.at_level(logging.WARNING, "pyforward.checkpoint"):
        for n in range(2, 12):
            writer.update(pos(n))
            await writer.flush()
        assert writer.failures >= 10
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # rate-limited
        assert str(path) in errors[0].getMessage()
        assert "keeping the last good one" in errors[0].getMessage()
        assert load_checkpoint(tmp_path / "moved" / "checkpoint") == pos(1)  # the last good file, untouched
        # Repaired while no new update comes: the retry writes the newest position by itself.
        directory.unlink()
        (tmp_path / "moved").rename(directory)
        await until(lambda: writer.last_written == pos(11))
    assert load_checkpoint(path) == pos(11)
    assert any("written again" in r.getMessage() for r in caplog.records)
    await writer.close()


async def test_writer_close_makes_a_last_attempt(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    path = directory / "checkpoint"
    writer = CheckpointWriter(path, retry_delay=3600)
    writer.update(pos(1))
    await writer.flush()
    assert writer.failures == 1  # no directory yet
    directory.mkdir()
    await writer.close()  # the retry is an hour away; close tries once more
    assert load_checkpoint(path) == pos(1)


async def test_writer_waits_the_interval_unless_urgent(tmp_path: Path) -> None:
    """At most one write per interval (issue 11: a save per chunk was a large share of the CPU at steady rates);
    an urgent update (the in-flight budget runs short), flush and close write at once."""
    path = tmp_path / "checkpoint"
    writer = CheckpointWriter(path, interval=3600)
    writer.update(pos(1))  # no write before: at once
    await until(lambda: writer.writes == 1)
    writer.update(pos(2))  # within the interval: waits (an hour here)
    assert writer.waiting
    writer.update(pos(3), urgent=True)
    await until(lambda: writer.writes == 2)
    assert load_checkpoint(path) == pos(3)  # the newest position, once
    writer.update(pos(4))
    await writer.flush()
    assert writer.writes == 3
    assert load_checkpoint(path) == pos(4)
    writer.update(pos(5))
    await writer.close()
    assert load_checkpoint(path) == pos(5)
