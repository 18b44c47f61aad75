"""The Tailer: composes scanning (scan.py), the open file (file.py), lines (lines.py), watching (watch.py), where to
start (start.py) and rotation and truncation (rotate.py) into "the next lines, in order, each once" (fluent-bit:
tail.c)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyforward.checkpoint import FileIdentity, Position
from pyforward.tail import scan
from pyforward.tail.file import (
    CorruptGzip,
    ReadResult,
    Source,
    _in_thread,
    content_match,
    open_source,
    read_gz,
    read_plain,
    seek,
)
from pyforward.tail.ledger import Ledger, View
from pyforward.tail.lines import LineAssembler
from pyforward.tail.looks import DirectoryLooks
from pyforward.tail.rotate import RotationDetection
from pyforward.tail.scan import DirectoryState, Sibling
from pyforward.tail.spooled import SpoolSide
from pyforward.tail.start import StartResolution
from pyforward.tail.types import LineBatch, Problems, TailerStats
from pyforward.tail.watch import DirectoryEvents, Watcher

__all__ = ["LineBatch", "Tailer", "TailerStats"]

log = logging.getLogger("pyforward.tailer")

#: Reads of at most this many bytes (a plain file caught up with its writer) are done on the event loop.
_INLINE_READ_BYTES = 256 << 10

#: The finished files remembered to never read one twice (a backup that reappears as `.gz`, ...).
_HISTORY = 64


# ---------------------------------------------------------------------------------------------------------
# The tailer


@dataclass(slots=True)
class _Batch:
    lines: list[bytes] = field(default_factory=list)
    truncated: list[tuple[int, int]] = field(default_factory=list)
    start: int | None = None  # line boundary in the batch's file where it starts
    end: Position | None = None
    caught_up: bool = False
    source: str = ""
    unterminated: bool = False


class Tailer(StartResolution, RotationDetection, DirectoryLooks, SpoolSide):
    """Lines of `path` and of its rotated backups, from `start` on, in order, each once.

    One consumer: do not call read_batch/wait concurrently.
    """

    def __init__(
        self,
        path: Path,
        *,
        start: Position | None,
        start_at: Literal["head", "tail"] = "head",
        max_line_bytes: int = 4 << 20,
        read_size: int = 1 << 20,
        poll_interval: float = 0.25,
        use_inotify: bool = True,
        stats: TailerStats | None = None,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 1 << 30,
        spool_min_free: int | None = None,
    ) -> None:
        if start_at not in ("head", "tail"):
            raise ValueError(f"start_at must be 'head' or 'tail', not {start_at!r}")
        if max_line_bytes < 1 or read_size < 1:
            raise ValueError("max_line_bytes and read_size must be positive")
        self._path = Path(path)
        self._start = start
        self._start_at = start_at
        self._read_size = read_size
        self.stats = stats if stats is not None else TailerStats()
        self._lines = LineAssembler(max_line_bytes)
        self._cur: Source | None = None
        self._buf = b""  # read from _cur but not yet cut into lines (when a batch filled up)
        self._buf_pos = 0
        self._line_off = 0  # in _cur: just after the last line returned
        self._last_position: Position | None = start
        self._watermark: str | None = None  # backups with this timestamp or older are done
        self._history: deque[FileIdentity] = deque(maxlen=_HISTORY)
        self._started = False
        self._tail = start is None and start_at == "tail"  # start at the end of what exists at the first look
        self._closed = False
        self._problems = Problems()
        self._unfinished: _Batch | None = None  # lines cut by a read_batch that was cancelled
        # Guards what backlog() and the loss ledger read from other threads (metrics): the file being read, the
        # watermark, the backups being opened. Taken for a few microseconds per file, never per line.
        self._lock = threading.RLock()
        self._opening: set[str] = set()
        self._ledger = Ledger(self._lost)
        self._listed: tuple[DirectoryState, int] | None = None  # directory state and time of the last listing
        self._use_inotify = use_inotify
        self._dir_events = DirectoryEvents(self._path, self._dir_changed)
        self._look: asyncio.Task[None] | None = None
        self._look_again = False
        self._watcher = Watcher(
            self._path, poll_interval=poll_interval, use_inotify=use_inotify, current=lambda: self._cur
        )
        self._init_spool(self._path, spool_dir, spool_max_bytes, spool_min_free)  # (tail/spooled.py, issue 21)

    # -- public API ---------------------------------------------------------------------------------------

    @property
    def position(self) -> Position | None:
        """Just after the last line returned (where a restart would resume once all of it is acked)."""
        if self._cur is not None:
            return self._position()
        return self._last_position

    async def open(self) -> None:
        """Find where to start (see the module doc). If nothing is there yet, read_batch retries."""
        self._check_open()
        await self._start_spool()
        try:
            await self._advance()
        except OSError as e:
            self._io_problem(e)

    async def read_batch(self, max_bytes: int) -> LineBatch | None:
        """The complete lines available now, up to about max_bytes of source (at least one line if there
        is one), or None when caught up. Never waits for the writer."""
        self._check_open()
        # Lines already cut when a caller cancels us (at any await below) are past our line boundary: keep
        # them for the next call, else they would never be shipped.
        batch, self._unfinished = self._unfinished or _Batch(), None
        self._filling = True
        try:
            await self._watcher.mark()
            await self._fill(batch, max_bytes)
        except OSError as e:  # keep what was cut already: its position is accounted for
            self._io_problem(e)
        except asyncio.CancelledError:
            if batch.lines:
                self._unfinished = batch
            raise
        else:
            if "io" in self._problems:  # (the message is built only then: this runs for every batch)
                self._problems.clear("io", f"reading {self._path} works again")
        finally:
            self._filling = False
        if not batch.lines:
            return None
        assert batch.end is not None
        assert batch.start is not None
        size = batch.end.offset - batch.start
        max_line = self._lines.max_line
        self.stats.lines += len(batch.lines)
        self.stats.bytes += size
        self.stats.truncated_lines += len(batch.truncated)
        if batch.truncated:
            self.stats.long_line_bytes_dropped += sum(n - max_line for _, n in batch.truncated)
        return LineBatch(
            lines=batch.lines, end=batch.end, size=size, truncated=batch.truncated, caught_up=batch.caught_up,
            source=batch.source, unterminated=batch.unterminated,
        )  # fmt: skip

    async def wait(self, timeout: float | None) -> None:
        """Return when the log may have changed (inotify, else polling every poll_interval) or on timeout.

        May return early without a change; the caller just calls read_batch again.
        """
        self._check_open()
        await self._watcher.wait(timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            if self._cur is not None:
                self._close_source(self._cur)
                self._cur = None
        self._watcher.close()
        self._dir_events.close()
        if self._look is not None:
            self._look.cancel()

    def backlog(self) -> tuple[int, int, int]:
        """(bytes, files, log files): what is not read yet, and what there is. Blocking (run it in a thread); may be
        called from any thread while the tailer runs.

        bytes: the rest of the file being read (compressed bytes for a .gz), every unread backup at its size on disk
        (compressed for a .gz: less than it holds), and the live log when it is not the file being read. files: those
        files, the one being read included. log files: the live log and the backups present. The directory is listed
        only if it changed since the last listing (else one stat per directory); a listing also finds the backups
        deleted before they were read (logged and counted: issue 12).
        """
        if self._closed:
            return 0, 0, 0
        state = scan.directory_state(self._path, self._spool_dir)
        listed = self._listed
        if listed is None or listed[0].key != state.key or state.racy(listed[1]):
            self._list()
        try:
            live: os.stat_result | None = os.stat(self._path)
        except OSError:
            live = None
        with self._lock:
            view = self._view()
            size, files = self._ledger.backlog(view)
            log_files = len(self._ledger.known)
            cur = self._cur
            if cur is not None and not cur.closed:
                files += 1
                with contextlib.suppress(OSError):
                    on_disk = os.fstat(cur.fd).st_size
                    # A .gz: what the decompressor has not consumed yet (its fd offset), in compressed bytes.
                    done = self._line_off if cur.gz is None else os.lseek(cur.fd, 0, os.SEEK_CUR)
                    size += max(0, on_disk - done)
            if live is not None:
                log_files += 1
                if cur is None or not cur.same_inode(live):
                    size += live.st_size
                    files += 1
        return size, files, log_files

    # -- reading ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"tailer for {self._path} is closed")

    def _position(self) -> Position:
        assert self._cur is not None
        src = self._cur
        return Position(
            file=src.identity(), offset=self._line_off, path=str(src.path), size=src.size if src.gz is None else 0
        )

    def _cut(self, batch: _Batch, budget: int) -> None:
        before = len(batch.lines)
        self._buf_pos, advanced = self._lines.take(self._buf, self._buf_pos, budget, batch.lines, batch.truncated)
        self._line_off += advanced
        if len(batch.lines) > before:
            batch.end = self._position()
            batch.source = self._cur.source_id() if self._cur is not None else ""
        if self._buf_pos >= len(self._buf):
            self._buf, self._buf_pos = b"", 0

    async def _fill(self, batch: _Batch, max_bytes: int) -> None:
        # The last read of a plain file reached the size its fstat gave: a second read would only find the end (the
        # watcher was marked before, so a later write still wakes the next wait). Saves a read per caught-up batch.
        at_end = False
        while True:
            src = self._cur
            if src is None:
                if batch.lines or not await self._advance():
                    return
                continue
            if src is self._dropped:  # released by the spool's guard (logged, counted): the lines cut first, then skip
                if batch.lines:
                    return
                self._skip_dropped()
                batch.start = None
                continue
            if batch.start is None:
                batch.start = self._line_off
            if batch.lines and self._line_off - batch.start >= max_bytes:
                return
            if self._buf:
                self._cut(batch, max_bytes - (self._line_off - batch.start))
                if self._buf or (batch.lines and self._line_off - batch.start >= max_bytes):
                    return  # batch full
                continue
            if at_end:
                at_end = False
                result = ReadResult(b"", size=src.size)
            else:
                result = await self._read(src)
            if result.truncated:
                if batch.lines:  # return these first, under the identity they were read with
                    return
                await self._truncated(src, result.size)
                batch.start = None
                continue
            if result.error is not None:
                self.stats.unreadable_files += 1
                log.error(
                    "cannot decompress %s beyond offset %d (%s): its remaining lines are lost; going on with "
                    "the next file",
                    src.path,
                    src.read_off,
                    result.error,
                )
            elif result.data:
                src.add_to_head(result.data, src.read_off)
                src.read_off += len(result.data)
                src.size = max(src.size, result.size)
                self._buf, self._buf_pos = result.data, 0
                at_end = src.gz is None and src.read_off >= result.size
                continue
            elif not src.complete:  # at the end of the live file: is it still the live file?
                # One stat on the loop answers the common case (no rotation); a thread only for the listing.
                if self._still_live(src):
                    batch.caught_up = True
                    return  # caught up
                moved, backup, ts = await asyncio.to_thread(self._moved_away, src)
                if not moved:
                    batch.caught_up = True
                    return  # caught up
                src.complete = True
                src.path = backup or src.path  # for messages and Position.path
                if ts is not None:
                    with self._lock:
                        src.ts = ts  # its backup: done once read (watermark), and not unread for the ledger
                self.stats.rotations += 1
                log.info("%s was rotated: reading %s to its end before the next file", self._path, src.path)
                continue  # drain: the writer closed it before renaming, so its end is final now
            # a complete file read to its end
            before = len(batch.lines)
            self._line_off += self._lines.flush(batch.lines, batch.truncated)
            if len(batch.lines) > before:
                batch.end = self._position()
                batch.source = src.source_id()
                batch.unterminated = True  # flush() returns only a line its file ended without a newline
            self._finish(src)
            if batch.lines:
                return  # a batch ends with its file: its end Position names one file
            batch.start = None

    async def _read(self, src: Source) -> ReadResult:
        # A read cancelled with its caller still completes in its thread; for a .gz the bytes are gone from
        # the decompressor then, so the next call takes that result instead of reading again.
        fut = src.inflight
        if fut is None and src.gz is None:
            # Caught up with the writer, a read is what was written during one latency budget (~80 KiB at 1,000
            # events/s), a moment ago (page cache): reading it on the loop costs tens of microseconds, a worker thread
            # round trip ~0.1 ms of CPU and two wakeups, per read, which made most of the cost at steady rates (issue
            # 11). A backlog is still read in a thread, 1 MiB at a time.
            live_head = None if src.complete else src.head  # (no copy: read here, nothing changes it meanwhile)
            try:
                size = os.fstat(src.fd).st_size
            except OSError:
                size = src.read_off + _INLINE_READ_BYTES + 1  # let the thread's read raise it as before
            if size - src.read_off <= _INLINE_READ_BYTES:
                return read_plain(src.fd, src.read_off, self._read_size, live_head, size)
        if fut is None:
            if src.gz is not None:
                fut = asyncio.ensure_future(asyncio.to_thread(read_gz, src.gz, self._read_size))
            else:
                head = None if src.complete else bytes(src.head)
                fut = asyncio.ensure_future(asyncio.to_thread(read_plain, src.fd, src.read_off, self._read_size, head))
            src.inflight = fut
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            raise
        except BaseException:
            src.inflight = None
            raise
        src.inflight = None
        return result

    def _finish(self, src: Source) -> None:
        """`src` was read to its end and will not grow: remember it, close it."""
        self._last_position = self._position()
        self._history.append(src.identity())
        with self._lock:
            if src.ts is not None:
                self._watermark = src.ts
            else:  # the live file, rotated: its backup, if the ledger found it, is done too
                ts = self._ledger.current_ts(src)
                if ts is not None and self._newer(ts):
                    self._watermark = ts
            self._close_source(src)
            self._cur = None
        self._lines.reset()
        self._buf, self._buf_pos = b"", 0

    def _close_source(self, src: Source) -> None:
        def close(_: object = None) -> None:
            with self._lock:  # backlog() may be fstat()ing its fd in another thread
                src.close()

        if src.inflight is not None and not src.inflight.done():
            src.inflight.add_done_callback(close)  # a thread still uses it
        else:
            close()

    # -- choosing the file --------------------------------------------------------------------------------

    def _newer(self, ts: str) -> bool:
        return self._watermark is None or ts > self._watermark

    def _list(self) -> list[Sibling]:
        """The backups (scan.list_siblings), also told to the loss ledger. Blocking: call in a thread."""
        state = scan.directory_state(self._path, self._spool_dir)
        began = time.time_ns()
        with self._lock:
            seq = self._ledger.begin()
        siblings = scan.list_siblings(self._path, self._spool_dir)
        with self._lock:
            self._ledger.apply(seq, siblings, self._view())
            if self._listed is None or began >= self._listed[1]:
                self._listed = (state, began)
        self._spool_take(siblings)
        return siblings

    def _view(self) -> View:
        stats = self.stats
        return View(
            watermark=self._watermark,
            cur=self._cur,
            started=self._started,
            opening=frozenset(self._opening),
            live=self._path,
            avg_line=stats.bytes / stats.lines if stats.lines else None,
        )

    def _lost(self, size: int) -> None:
        self.stats.lost_files += 1
        self.stats.lost_bytes += size

    def _already_read(self, src: Source) -> bool:
        head = bytes(src.head)
        for identity in self._history:
            if src.gz is None and (src.dev, src.ino) == (identity.dev, identity.ino):
                if identity.matches_head(head):
                    return True
            elif content_match(identity, head):
                return True
        return False

    async def _open(self, path: Path, ts: str | None, gz: bool) -> Source | None:
        """Open a file; None if it vanished (renamed or compressed meanwhile)."""
        try:
            return await _in_thread(open_source, path, ts, gz, release=Source.close)
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def _advance(self) -> bool:
        """Make the next file to read current. False if there is none (yet)."""
        if not self._started:
            if not await self._resolve_start():
                return False
            await self._begin_spool()
            self._watch_directory()
            if self._cur is not None:
                return True
        self._watch_directory()
        try:
            return await self._next_file()
        finally:
            with self._lock:
                self._opening.clear()

    async def _next_file(self) -> bool:
        # Rotation can happen while we look: a few rounds, then the next read_batch tries again.
        for _ in range(8):
            siblings = await asyncio.to_thread(self._list)
            vanished = False
            for sibling in siblings:
                if not self._newer(sibling.ts):
                    continue
                with self._lock:  # from now on its fd may be ours: not a loss if it is deleted (ledger)
                    self._opening.add(sibling.ts)
                try:
                    src = await self._open(sibling.path, sibling.ts, sibling.gz)
                except CorruptGzip as e:
                    self._unreadable(sibling.path, sibling.ts, e)
                    continue
                if src is None:
                    vanished = True
                    break
                if self._already_read(src):  # e.g. the file we just finished, now a backup
                    with self._lock:
                        self._watermark = sibling.ts
                    src.close()
                    continue
                if await self._set_current(src, 0):
                    return True
            if vanished:
                continue
            live = await self._open(self._path, None, False)
            if live is None:
                return False
            # Opened after the listing: a rotation in between left a backup we must read before this file.
            if await asyncio.to_thread(self._unread_backup_exists, live):
                live.close()
                continue
            if await self._set_current(live, 0):
                return True
        return False

    def _unread_backup_exists(self, live: Source) -> bool:
        """Is there a backup newer than the watermark other than `live` itself? Blocking."""
        for sibling in self._list():
            if not self._newer(sibling.ts):
                continue
            if sibling.gz:
                return True
            try:
                if not live.same_inode(os.stat(sibling.path)):
                    return True
            except FileNotFoundError:
                return True  # compressed meanwhile: look again
        return False

    def _unreadable(self, path: Path, ts: str | None, error: OSError) -> None:
        self.stats.unreadable_files += 1
        log.error("skipping %s: %s; its lines are lost", path, error.strerror)
        if ts is not None and self._newer(ts):
            with self._lock:
                self._watermark = ts

    async def _set_current(
        self, src: Source, read_off: int, *, line_off: int | None = None, keep_partial: bool = False
    ) -> bool:
        """Start reading `src` at read_off. False if it cannot be read (a corrupt .gz: logged, skipped)."""
        if read_off > 0 or src.gz is not None:
            try:
                reached = await asyncio.to_thread(seek, src, read_off)
                if reached < read_off and src.gz is not None:
                    await asyncio.to_thread(seek, src, 0)
            except CorruptGzip as e:
                src.close()
                self._unreadable(src.path, src.ts, e)
                return False
            except BaseException:
                src.close()
                raise
            if reached < read_off:
                self.stats.truncations += 1
                log.warning(
                    "%s has only %d bytes, less than the position %d to resume at: it was truncated; reading "
                    "it from the start",
                    src.describe(),
                    reached,
                    read_off,
                )
                read_off, line_off, keep_partial = 0, 0, False
        with self._lock:
            self._cur = src
        src.read_off = read_off
        self._line_off = read_off if line_off is None else line_off
        self._buf, self._buf_pos = b"", 0
        if not keep_partial:
            self._lines.reset()
        self.stats.files_opened += 1
        if src.gz is not None:
            self.stats.compressed_files_read += 1
        log.info("reading %s from offset %d", src.describe(), read_off)
        return True

    def _io_problem(self, e: OSError) -> None:
        self.stats.errors += 1
        what = e.filename if e.filename is not None else self._path
        hint = (
            " (check the file and directory permissions of the pyforward user)"
            if isinstance(e, PermissionError)
            else ""
        )
        self._problems.report("io", f"cannot read {what}: {e.strerror or e}{hint}; retrying")

