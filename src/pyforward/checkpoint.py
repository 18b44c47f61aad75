"""Where reading stands, and how that survives a restart.

The checkpoint is the only state pyforward keeps besides the log files themselves ("the log file is the
buffer"). It names a file by device, inode and a fingerprint of its first bytes, plus an offset, and it is
advanced only to the end of the last contiguous range of chunks the receiver has acked. fluent-bit saves its
offset when lines are *read* (fluent-bit #5912: output down + hard kill = lines lost) and keeps it in a DB on
the container's root fs; both are what this module exists to avoid.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pyforward.atomic import fsync_directory, replace_file

__all__ = [
    "FINGERPRINT_BYTES",
    "AckTracker",
    "CheckpointError",
    "CheckpointFile",
    "CheckpointWriter",
    "FileIdentity",
    "Position",
    "fingerprint",
    "load_checkpoint",
    "not_writable",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

#: How many leading bytes of a file identify it (with dev and inode). One audit event is 0.6-1 KB, so
#: 4 KiB covers several events with unique auditIDs and timestamps: two different files never share it.
FINGERPRINT_BYTES = 4096

CHECKPOINT_VERSION = 1

_RESTART_HINT = "delete it to start per PYFORWARD_START_AT (head|tail), or restore it from a backup"


def fingerprint(head: bytes) -> str:
    """Hex digest of `head` (the caller passes exactly the bytes to fingerprint)."""
    return hashlib.sha256(head).hexdigest()


def not_writable(path: Path) -> str | None:
    """Why a checkpoint could not be written at ``path`` now (e.g. ``Permission denied``), or None if it can.

    Found the way :func:`save_checkpoint` writes: a temp file is created in the same directory and removed at
    once. Asking ``os.access`` instead would miss read-only mounts under some runtimes, ACLs and LSMs.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(tmp)
    return None


@dataclass(frozen=True)
class FileIdentity:
    """A file, recognisable again after renames, restarts and inode reuse.

    (dev, ino) alone is not enough: inodes are reused once a file is deleted (a restart after a deleted
    backup could resume in an unrelated file), and a gzipped or copied backup has a new inode but the same
    content. Hence the fingerprint of the first `fp_len` bytes (fp_len < FINGERPRINT_BYTES when the file was
    shorter than that when the identity was taken).
    """

    dev: int
    ino: int
    fp_len: int
    fp_hash: str

    @classmethod
    def of(cls, dev: int, ino: int, head: bytes) -> FileIdentity:
        """Identity of a file whose first bytes are `head` (only the first FINGERPRINT_BYTES are used)."""
        head = head[:FINGERPRINT_BYTES]
        return cls(dev=dev, ino=ino, fp_len=len(head), fp_hash=fingerprint(head))

    def matches_head(self, head: bytes) -> bool:
        """True if `head` (the first bytes of a candidate file) starts with the fingerprinted bytes.

        An identity with fp_len 0 (taken of an empty file) matches every head; callers that match on the
        fingerprint alone must require more (see tail/file.py).
        """
        return len(head) >= self.fp_len and fingerprint(head[: self.fp_len]) == self.fp_hash


@dataclass(frozen=True)
class Position:
    """A point in the stream of lines: `offset` bytes into `file` (into the decompressed data for a .gz)."""

    file: FileIdentity
    offset: int
    path: str  # only for messages: the name the file had when it was read
    # Only for messages and loss accounting: the file's size in bytes when the position was taken (0: unknown, e.g.
    # a .gz, whose offsets are into the decompressed data). If the file is gone at the next start, what was lost
    # is at least size - offset (issue 12: "with the name and size last seen"). Not part of equality.
    size: int = field(default=0, compare=False)


class CheckpointError(Exception):
    """The checkpoint file exists but cannot be used. The message says what is wrong and what to do."""


def _position_to_json(position: Position) -> dict[str, Any]:
    f = position.file
    return {
        "version": CHECKPOINT_VERSION,
        "file": {"dev": f.dev, "ino": f.ino, "fp_len": f.fp_len, "fp_hash": f.fp_hash},
        "offset": position.offset,
        "path": position.path,
        "size": position.size,
        "written_at": time.time(),  # for operators only
    }


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    # bool is an int subclass; a checkpoint saying "offset": true is garbage, not offset 1.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {where}{key} is missing or not a {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"field {where}{key} is negative")
    return value


def _position_from_json(doc: Any) -> Position:
    if not isinstance(doc, dict):
        raise ValueError("it is not a JSON object")
    raw_file = doc.get("file")
    if not isinstance(raw_file, dict):
        raise ValueError("field file is missing or not an object")
    fp_len = _field(raw_file, "fp_len", int, "file.")
    if fp_len > FINGERPRINT_BYTES:
        raise ValueError(f"field file.fp_len is above {FINGERPRINT_BYTES}")
    fp_hash = _field(raw_file, "fp_hash", str, "file.")
    if len(fp_hash) != 64 or any(c not in "0123456789abcdef" for c in fp_hash):
        raise ValueError("field file.fp_hash is not a sha256 hex digest")
    identity = FileIdentity(
        dev=_field(raw_file, "dev", int, "file."),
        ino=_field(raw_file, "ino", int, "file."),
        fp_len=fp_len,
        fp_hash=fp_hash,
    )
    # "size" came later (still version 1): optional, 0 (unknown) when absent.
    size = _field(doc, "size", int, "") if "size" in doc else 0
    return Position(file=identity, offset=_field(doc, "offset", int, ""), path=_field(doc, "path", str, ""), size=size)


def load_checkpoint(path: Path) -> Position | None:
    """The saved position, or None if there is no checkpoint file yet.

    Raises CheckpointError for a file that exists but cannot be trusted: guessing would either lose lines
    (start at the tail) or duplicate a whole backlog (start at the head), so the operator decides.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({e.strerror or e}): fix its permissions, or {_RESTART_HINT}"
        ) from e
    if not raw.strip():
        raise CheckpointError(f"checkpoint {path} is empty (truncated): {_RESTART_HINT}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt (not JSON): {_RESTART_HINT}") from e
    version = doc.get("version") if isinstance(doc, dict) else None
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {version!r}, this pyforward reads version {CHECKPOINT_VERSION}: "
            f"run a pyforward that wrote it, or {_RESTART_HINT}"
        )
    try:
        return _position_from_json(doc)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is invalid ({e}): {_RESTART_HINT}") from e


def _encode(position: Position) -> bytes:
    # orjson: a tenth of the json module's CPU here (~0.14 ms a save, run cold every checkpoint_interval: issue 11).
    return orjson.dumps(_position_to_json(position), option=orjson.OPT_APPEND_NEWLINE)


def save_checkpoint(path: Path, position: Position) -> None:
    """Replace the checkpoint atomically: a crash at any point leaves either the old or the new file.

    Write a temp file in the same directory (rename is atomic only within a file system), fsync it, rename it
    over the old one, fsync the directory (else the rename itself may not survive a power loss).
    Raises OSError (read-only dir, disk full); the previous checkpoint file is then untouched.
    """
    replace_file(path, _encode(position))
    fsync_directory(path.parent)


#: A checkpoint record padded to this size is overwritten in place (CheckpointFile): one disk sector, which a disk
#: writes whole or not at all on a power loss (PostgreSQL's pg_control is updated in place and kept under 512 bytes on
#: the same ground). A longer record (a log path of several hundred bytes) is saved by replacing the file instead.
RECORD_BYTES = 512


class CheckpointFile:
    """The checkpoint file of `pyforward run`, saved in place once it exists.

    A save by replacing the file (:func:`save_checkpoint`: create a temp file, write, fsync, rename, fsync the
    directory) cost ~1 ms of CPU and two journal commits; at steady rates a save every `checkpoint_interval` was the
    largest single part of the sidecar's CPU after the chunks themselves (issue 11, bench/README.md). So the first
    save creates the file that way with the record padded to RECORD_BYTES (spaces, then a newline: the file is still
    one JSON document, which any pyforward reads), and the later saves overwrite that sector in place: one pwrite
    and one fdatasync on a file kept open, ~0.3 ms. Before each, one stat checks that the path still names that file:
    if someone deleted or replaced it, the save creates it again as before, rather than write to a file nobody
    will read. Blocking: call from one thread at a time (CheckpointWriter runs one save at a time).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None  # the file, open for in-place saves
        self._inode: tuple[int, int] | None = None  # its (st_dev, st_ino)

    def save(self, position: Position) -> None:
        """Write `position` durably. Raises OSError (the previous checkpoint is then still a whole record)."""
        data = _encode(position)
        fits = len(data) <= RECORD_BYTES
        if fits:
            data = data[:-1].ljust(RECORD_BYTES - 1) + b"\n"
            if self._fd is not None and self._still_ours():
                try:
                    if os.pwrite(self._fd, data, 0) != RECORD_BYTES:
                        raise OSError(errno.EIO, "short write")
                    os.fdatasync(self._fd)
                except OSError:
                    self.close()  # the next save (the writer's retry) replaces the file
                    raise
                return
        self.close()
        replace_file(self.path, data)
        fsync_directory(self.path.parent)
        if fits:  # the next saves go in place (if it cannot be opened, they replace the file again)
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
                st = os.fstat(fd)
                self._fd, self._inode = fd, (st.st_dev, st.st_ino)

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode and st.st_size == RECORD_BYTES

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._inode = None


class AckTracker:
    """Turns out-of-order acks into a checkpoint that only ever covers acked lines.

    Chunks are registered in send order with the Position just after their last line. Acks may arrive in
    any order (several connections, retries); the checkpoint may only move to the end of the last chunk of
    the contiguous acked prefix, else a crash would skip an unacked chunk sent earlier.
    """

    def __init__(self) -> None:
        self._next_seq = 0
        self._base = 0  # lowest sequence number not yet folded into the high-water mark
        self._positions: dict[int, Position] = {}
        self._acked: set[int] = set()
        self._high_water: Position | None = None

    def register(self, position: Position) -> int:
        """Record a chunk ending at `position`; call in send order. Returns its sequence number."""
        seq = self._next_seq
        self._next_seq += 1
        self._positions[seq] = position
        return seq

    def ack(self, seq: int) -> Position | None:
        """Mark `seq` acked. Returns the new high-water Position if it advanced, else None.

        A repeated ack is ignored (None); an ack for a number never registered is a bug (ValueError).
        """
        if seq >= self._next_seq or seq < 0:
            raise ValueError(f"ack for sequence number {seq}, which was never registered")
        if seq < self._base or seq in self._acked:
            return None
        self._acked.add(seq)
        advanced: Position | None = None
        while self._base in self._acked:
            self._acked.remove(self._base)
            advanced = self._positions.pop(self._base)
            self._base += 1
        if advanced is not None:
            self._high_water = advanced
        return advanced

    @property
    def pending(self) -> int:
        """Registered chunks whose ack has not arrived yet."""
        return self._next_seq - self._base - len(self._acked)

    @property
    def acked_below(self) -> int:
        """Every sequence number below this is acked (the contiguous prefix)."""
        return self._base

    @property
    def high_water(self) -> Position | None:
        """End of the contiguous acked prefix (None before the first one)."""
        return self._high_water


class CheckpointWriter:
    """Writes checkpoint updates in the background, newest first, one at a time, at most one per `interval`.

    Acks can arrive thousands of times a second; each save costs an fdatasync (CheckpointFile) and a thread round
    trip. Only the newest position matters, so updates are coalesced: one write now and then carries the newest
    position. At steady rates a write per chunk was a large share of the sidecar's CPU (issue 11), hence `interval`
    (2 s by default, PYFORWARD_CHECKPOINT_INTERVAL): what a crash can make us send again grows by what was acked in
    that time, and the pipeline bounds it anyway (its in-flight budget is freed only by a settled write; when that
    budget runs short it asks for an `urgent` write, which skips the wait). `flush` and `close` write at once.

    A failed write (read-only dir, disk full) is logged (at most once per `error_log_interval`), the last good file
    stays, shipping goes on, and the write is retried after `retry_delay` unless a newer update comes first: a stale
    checkpoint only means duplicates after a restart, never loss.
    """

    def __init__(
        self,
        path: Path,
        *,
        interval: float = 0.0,
        error_log_interval: float = 60.0,
        retry_delay: float = 5.0,
        on_settled: Callable[[Position], None] | None = None,
        on_task: Callable[[asyncio.Task[None]], None] | None = None,
    ) -> None:
        self.path = path
        self._file = CheckpointFile(path)
        # Called with each background write task as it starts: `pyforward run` supervises them (an unexpected
        # exception, anything but the OSError handled here, must end the process, not vanish with the task).
        self._on_task = on_task
        # Called after each write attempt (written or failed) with the position it tried: the pipeline frees
        # the in-flight budget of what the checkpoint now covers, so a crash re-sends at most that budget.
        self._on_settled = on_settled
        self._interval = interval
        self._error_log_interval = error_log_interval
        self._retry_delay = retry_delay
        self._pending: Position | None = None
        self._urgent = False
        self._wake = asyncio.Event()
        self._next_write = float("-inf")  # loop time before which a non-urgent write waits
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._unwritten: Position | None = None  # last position whose write failed
        self._closed = False
        self.last_written: Position | None = None
        self.writes = 0
        self.failures = 0
        self._failing_since: int | None = None  # failure count when the current failing streak started
        self._last_error_log = float("-inf")
        self._suppressed = 0

    def update(self, position: Position, *, urgent: bool = False) -> None:
        """Schedule `position` to be written (replacing any not yet written). Call from the event loop.

        Written within `interval` of the previous write, or as soon as the running write is done if `urgent`."""
        if self._closed:
            raise RuntimeError(f"checkpoint writer for {self.path} is closed")
        self._pending = position
        if urgent:
            self._urgent = True
            self._wake.set()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="checkpoint-writer")
            if self._on_task is not None:
                self._on_task(self._task)

    @property
    def waiting(self) -> bool:
        """An update is waiting for its write (the interval has not passed yet)."""
        return self._pending is not None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending is not None:
            delay = self._next_write - loop.time()
            if delay > 0 and not self._urgent:  # no timer at all while nothing is pending (idle costs nothing)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            position, self._pending = self._pending, None
            self._urgent = False
            self._next_write = loop.time() + self._interval
            try:
                # One thread round trip for the whole save (CheckpointFile: in place, or a new file): through aiofiles
                # each step is its own round trip, seven a save, which measured ~0.3 % of a core at one save a second
                # (docs/architecture.md).
                await asyncio.to_thread(self._file.save, position)
            except OSError as e:
                self._failed(position, e)
            else:
                self._succeeded(position)
            if self._on_settled is not None:
                self._on_settled(position)

    def _succeeded(self, position: Position) -> None:
        self.writes += 1
        self.last_written = position
        self._unwritten = None
        if self._failing_since is not None:
            log.warning(
                "checkpoint %s written again after %d failed attempts",
                self.path,
                self.failures - self._failing_since,
            )
            self._failing_since = None
            self._suppressed = 0

    def _failed(self, position: Position, error: OSError) -> None:
        self.failures += 1
        if self._failing_since is None:
            self._failing_since = self.failures - 1
        now = time.monotonic()
        if now - self._last_error_log >= self._error_log_interval:
            more = f" ({self._suppressed} more failures not logged)" if self._suppressed else ""
            log.error(
                "cannot write checkpoint %s (%s): keeping the last good one, a restart now would re-send "
                "lines acked since; will retry%s",
                self.path,
                error.strerror or error,
                more,
            )
            self._last_error_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        self._unwritten = position
        if self._pending is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(self._retry_delay, self._retry_write, position)

    def _retry_write(self, position: Position) -> None:
        self._retry = None
        if self._pending is None and not self._closed:
            self.update(position)

    async def flush(self) -> None:
        """Write now what is pending; return once every update made so far has been written or has failed."""
        while self._task is not None and not self._task.done():
            if self._pending is not None:
                self._urgent = True
                self._wake.set()
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Flush (with one last attempt for a write that failed), then refuse further updates."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
            if self._pending is None and self._unwritten is not None:
                self.update(self._unwritten)
        await self.flush()
        self._closed = True
        self._file.close()
