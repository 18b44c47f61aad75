"""Read every line of a log that kube-apiserver rotates by rename, across restarts, in order, once.

Pull-based: the shipper asks for a batch when it has room for one (`read_batch`), and waits (`wait`) when
the tailer is caught up. The file is the buffer: nothing is read ahead beyond one `read_size` chunk plus
one partial line of at most `max_line_bytes`, whatever the backlog (fluent-bit #3988, #8908: in_tail
memory grows until OOMKilled).

Rotation (lumberjack, used by kube-apiserver): close `audit.log`, rename it to
`audit-2026-11-26T12-00-00.000.log`, optionally gzip that to `...log.gz` (new inode, then the plain file is
deleted), create a new `audit.log`, delete backups beyond a count. Hence:

* A rotated file stays open (fd) until read to its end, even if it is deleted meanwhile; fluent-bit instead
  closes it after Rotate_Wait whatever is left (#2110, #1108: lines lost when files rotate quickly).
* Files are read strictly in order: the current one to its end, then every rotated sibling newer than it
  (oldest first), then the live file, also when rotations outpace the reader or happened while pyforward
  was down (fluent-bit #1330 re-reads such a file; audit-forwarder never read rotated files at all).
* A file is recognised by (dev, inode) plus a fingerprint of its first bytes (inodes are reused); a `.gz`
  backup by the fingerprint of its decompressed head alone. Offsets in a `.gz` are into the decompressed
  data, so a checkpoint taken in `audit-X.log` stays valid once that becomes `audit-X.log.gz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import logging
import os
import re
import stat
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pyforward.checkpoint import FINGERPRINT_BYTES, FileIdentity, Position

try:  # Linux only (a dependency only there); elsewhere wait() polls
    import asyncinotify

    _HAVE_INOTIFY = True
except ImportError:  # pragma: no cover
    _HAVE_INOTIFY = False

__all__ = ["LineBatch", "Tailer", "TailerStats"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: lumberjack's backup time format "2006-01-02T15-04-05.000" (UTC unless LocalTime is set).
#: Fixed width, so the lexicographic order of the names is their chronological order.
_TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d{1,9})?"

#: wait() returns at least this often even without any event: inotify can miss changes (queue overflow,
#: a directory replaced under the watch) and errors such as EACCES are retried only when wait() returns.
_SAFETY_WAKEUP = 5.0

#: Rate limit for repeating an unchanged problem in the log (permission denied, directory missing, ...).
_PROBLEM_REPEAT = 300.0

#: The finished files remembered to never read one twice (a backup that reappears as `.gz`, ...).
_HISTORY = 64


@dataclass(slots=True)
class LineBatch:
    """Complete lines of one file, in order."""

    lines: list[bytes]  # without the trailing b"\n" (a b"\r" before it is kept as is)
    end: Position  # just after the last line: the checkpoint once this batch is acked
    size: int  # source bytes consumed: newlines and the dropped tails of long lines included
    truncated: list[tuple[int, int]]  # (index into lines, original length) of lines cut to max_line_bytes
    caught_up: bool = False  # the batch ended at the end of the live file: the next read_batch would return None


@dataclass
class TailerStats:
    lines: int = 0  # lines returned
    bytes: int = 0  # source bytes of the lines returned (LineBatch.size summed)
    truncated_lines: int = 0  # lines longer than max_line_bytes, returned cut
    long_line_bytes_dropped: int = 0  # bytes cut off those lines
    truncations: int = 0  # a file shrank or its head changed under us (copy-truncate, truncate, rewrite)
    truncation_bytes_lost: int = 0  # bytes known to have been in such a file but never read
    rotations: int = 0  # the live file was seen renamed away
    files_opened: int = 0  # files read from (live, rotated, compressed)
    compressed_files_read: int = 0  # .gz backups read (decompressed)
    unreadable_files: int = 0  # backups skipped because they could not be decompressed
    checkpoint_misses: int = 0  # the checkpointed file was gone at start (lines lost, logged)
    errors: int = 0  # I/O errors (permission denied, EIO, ...), each retried


# ---------------------------------------------------------------------------------------------------------
# Lines


class _LineAssembler:
    """Cuts buffers into lines; holds at most `max_line` bytes of the one incomplete line.

    A line longer than `max_line` keeps its first `max_line` bytes; the rest is only counted up to its
    newline, so a 64 MB line costs `max_line` bytes of memory. fluent-bit either stops reading the file at
    such a line or skips it silently (Skip_Long_Lines, #3488 saves a wrong offset doing so); we return it
    cut and say so (LineBatch.truncated).

    The incomplete last line is never returned while its file may grow, and positions stay at its start,
    so a restart reads it again from the file (fluent-bit #11265 loses such a buffered line on restart).
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._keep = bytearray()  # first bytes of the incomplete line
        self._len = 0  # its length so far, dropped bytes included
        self.discard = False  # the incomplete line is not ours (tail start mid-line): drop it

    @property
    def pending(self) -> int:
        """Bytes of the incomplete line consumed so far."""
        return self._len

    def reset(self) -> None:
        self._keep = bytearray()
        self._len = 0
        self.discard = False

    def _absorb(self, buf: bytes, start: int, end: int) -> None:
        room = self.max_line - len(self._keep)
        if room > 0 and not self.discard:
            self._keep += buf[start : min(end, start + room)]
        self._len += end - start

    def _complete(self, lines: list[bytes], truncated: list[tuple[int, int]], newline: bool) -> int:
        length = self._len
        if not self.discard:
            if length > self.max_line:
                truncated.append((len(lines), length))
            lines.append(bytes(self._keep))
        self.reset()
        return length + 1 if newline else length

    def take(
        self, buf: bytes, pos: int, budget: int, lines: list[bytes], truncated: list[tuple[int, int]]
    ) -> tuple[int, int]:
        """Append the complete lines of buf[pos:] to `lines` while `budget` (source bytes) lasts.

        At least one line is taken when `lines` is empty. A tail without newline goes into the incomplete
        line. Returns (new pos, bytes by which the line boundary advanced); buf[new pos:] was not consumed.
        """
        end = len(buf)
        advanced = 0
        while pos < end:
            if budget <= 0 and lines:
                break
            if self._len or self.discard:  # finish the line started in an earlier buffer
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    self._absorb(buf, pos, end)
                    return end, advanced
                self._absorb(buf, pos, nl)
                used = self._complete(lines, truncated, newline=True)
                advanced += used
                budget -= used
                pos = nl + 1
                continue
            q = buf.rfind(b"\n", pos, min(end, pos + max(budget, 0)))
            if q < 0:  # no complete line fits in the budget
                q = buf.find(b"\n", pos)
                if q < 0:
                    self._absorb(buf, pos, end)
                    return end, advanced
                if lines:
                    break
            pieces = buf[pos:q].split(b"\n")
            if q - pos > self.max_line:  # only then can a piece be too long
                for i, piece in enumerate(pieces):
                    if len(piece) > self.max_line:
                        truncated.append((len(lines) + i, len(piece)))
                        pieces[i] = piece[: self.max_line]
            lines.extend(pieces)
            used = q + 1 - pos
            advanced += used
            budget -= used
            pos = q + 1
        return pos, advanced

    def flush(self, lines: list[bytes], truncated: list[tuple[int, int]]) -> int:
        """End of a file that will not grow: its unterminated last line is a line (lumberjack never leaves
        one, but nothing may be lost). Returns the bytes it covered."""
        if self._len == 0:
            self.reset()
            return 0
        return self._complete(lines, truncated, newline=False)


# ---------------------------------------------------------------------------------------------------------
# Files


def _go_ext(name: str) -> tuple[str, str]:
    """(prefix, ext) as lumberjack splits a name: Go's filepath.Ext, the suffix from the last dot."""
    dot = name.rfind(".")
    return (name, "") if dot < 0 else (name[:dot], name[dot:])


def _sibling_pattern(name: str) -> re.Pattern[str]:
    prefix, ext = _go_ext(name)
    return re.compile(rf"{re.escape(prefix)}-(?P<ts>{_TIMESTAMP}){re.escape(ext)}(?P<gz>\.gz)?")


@dataclass(frozen=True, slots=True)
class _Sibling:
    path: Path
    ts: str
    gz: bool


def _content_match(identity: FileIdentity, head: bytes) -> bool:
    """Match on content alone (a .gz backup or a copy has a new inode).

    Audit events share their first ~80 bytes ('{"kind":"Event","apiVersion":...'), so a short fingerprint
    could match a different file: require it to cover a whole line (unique auditID) or the full 4 KiB.
    """
    if identity.fp_len == 0 or not identity.matches_head(head):
        return False
    return identity.fp_len == FINGERPRINT_BYTES or b"\n" in head[: identity.fp_len]


class _CorruptGzip(OSError):
    pass


class _Source:
    """An open file being read: the live log, a rotated backup, or a decompressed .gz backup."""

    def __init__(
        self, path: Path, fd: int, st: os.stat_result, head: bytes, gz: gzip.GzipFile | None,
        raw: IO[bytes] | None, ts: str | None,
    ) -> None:  # fmt: skip
        self.path = path
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.size = st.st_size  # last size seen (plain files)
        self.head = bytearray(head[:FINGERPRINT_BYTES])  # first bytes of the file, as far as known
        self.gz = gz
        self.raw = raw  # the file object under gz
        self.ts = ts  # backup timestamp, None for the live file
        self.complete = ts is not None  # no more bytes will be written (a rotated backup)
        self.read_off = 0  # next byte to read (decompressed offset for .gz)
        self.inflight: asyncio.Future[_ReadResult] | None = None  # read started by a cancelled call
        self._identity: FileIdentity | None = None
        self.closed = False

    def identity(self) -> FileIdentity:
        if self._identity is None or self._identity.fp_len != len(self.head):
            self._identity = FileIdentity.of(self.dev, self.ino, bytes(self.head))
        return self._identity

    def reset_head(self) -> None:
        self.head = bytearray()
        self._identity = None

    def add_to_head(self, data: bytes, offset: int) -> None:
        """Keep the first FINGERPRINT_BYTES as they are read: positions get a fingerprint for free."""
        have = len(self.head)
        if have < FINGERPRINT_BYTES and offset <= have < offset + len(data):
            self.head += data[have - offset : FINGERPRINT_BYTES - offset]

    def same_inode(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.gz is not None and self.raw is not None:
            with contextlib.suppress(Exception):
                self.gz.close()
            with contextlib.suppress(OSError):
                self.raw.close()
        else:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def describe(self) -> str:
        return f"{self.path}{' (compressed)' if self.gz is not None else ''}"


def _open_source(path: Path, ts: str | None, gz: bool) -> _Source:
    """Open `path` and read its head (decompressed for .gz). Blocking: run in a thread."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    raw: IO[bytes] | None = None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if not gz:
            return _Source(path, fd, st, os.pread(fd, FINGERPRINT_BYTES, 0), None, None, ts)
        raw = os.fdopen(fd, "rb")
        archive = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            head = archive.read(FINGERPRINT_BYTES)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _CorruptGzip(errno.EIO, f"cannot decompress: {e}", str(path)) from e
        return _Source(path, fd, st, head, archive, raw, ts)
    except BaseException:
        if raw is not None:
            raw.close()
        else:
            os.close(fd)
        raise


@dataclass(slots=True)
class _ReadResult:
    data: bytes
    truncated: bool = False
    size: int = 0
    error: str | None = None  # a .gz that cannot be decompressed further


def _read_plain(fd: int, offset: int, n: int, head: bytes | None) -> _ReadResult:
    """Read up to n bytes at offset. With `head` (a file still written to), first and last make sure the
    file was not truncated or rewritten: its size must not be below offset and it must still start with the
    bytes we read from it earlier (copy-truncate may refill past our offset before we look: #9580, #4839)."""

    def changed(size: int) -> bool:
        return size < offset or (bool(head) and os.pread(fd, len(head or b""), 0) != head)

    size = os.fstat(fd).st_size
    if head is not None and changed(size):
        return _ReadResult(b"", truncated=True, size=size)
    data = os.pread(fd, n, offset) if size > offset else b""
    if head is not None and data and changed(os.fstat(fd).st_size):
        return _ReadResult(b"", truncated=True, size=size)
    return _ReadResult(data, size=max(size, offset + len(data)))


def _read_gz(archive: gzip.GzipFile, n: int) -> _ReadResult:
    try:
        return _ReadResult(archive.read(n))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        return _ReadResult(b"", error=str(e))


def _seek(src: _Source, offset: int) -> int:
    """Go to offset (decompressing up to it for .gz); returns the offset reached (less at end of file)."""
    if src.gz is not None:
        try:
            return src.gz.seek(offset)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _CorruptGzip(errno.EIO, f"cannot decompress: {e}", str(src.path)) from e
    return min(offset, os.fstat(src.fd).st_size)


def _tail_offset(src: _Source, window: int) -> tuple[int, bool]:
    """Where start_at="tail" begins: after the last complete line. (offset, discard until next newline)."""
    size = os.fstat(src.fd).st_size
    start = max(0, size - window)
    nl = os.pread(src.fd, size - start, start).rfind(b"\n")
    if nl >= 0:
        return start + nl + 1, False
    if start == 0:
        return 0, False  # the file is one incomplete line: it is new
    return size, True  # mid-line in a line longer than the window: skip to its end


def _stat_key(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError as e:
        return e.errno
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


async def _in_thread(fn: Callable[..., _T], *args: Any, release: Callable[[_T], None] | None = None) -> _T:
    """asyncio.to_thread that does not leak what `fn` returns if the caller is cancelled meanwhile."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if release is not None:
            rel = release

            def done(f: asyncio.Future[_T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    rel(f.result())

            fut.add_done_callback(done)
        raise


class _Problems:
    """One log line per problem, repeated only if it changes or after a long while; a line when it ends."""

    def __init__(self) -> None:
        self._active: dict[str, tuple[str, float]] = {}

    def report(self, key: str, message: str, level: int = logging.ERROR) -> None:
        now = time.monotonic()
        previous = self._active.get(key)
        if previous is None or previous[0] != message or now - previous[1] >= _PROBLEM_REPEAT:
            log.log(level, message)
            self._active[key] = (message, now)

    def clear(self, key: str, message: str | None = None) -> None:
        if self._active.pop(key, None) is not None and message:
            log.info(message)


# ---------------------------------------------------------------------------------------------------------
# The tailer


@dataclass(slots=True)
class _Batch:
    lines: list[bytes] = field(default_factory=list)
    truncated: list[tuple[int, int]] = field(default_factory=list)
    start: int | None = None  # line boundary in the batch's file where it starts
    end: Position | None = None
    caught_up: bool = False


class Tailer:
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
    ) -> None:
        if start_at not in ("head", "tail"):
            raise ValueError(f"start_at must be 'head' or 'tail', not {start_at!r}")
        if max_line_bytes < 1 or read_size < 1:
            raise ValueError("max_line_bytes and read_size must be positive")
        self._path = Path(path)
        self._start = start
        self._start_at = start_at
        self._read_size = read_size
        self._poll_interval = poll_interval
        self._use_inotify = use_inotify
        self.stats = stats if stats is not None else TailerStats()
        self._lines = _LineAssembler(max_line_bytes)
        self._cur: _Source | None = None
        self._buf = b""  # read from _cur but not yet cut into lines (when a batch filled up)
        self._buf_pos = 0
        self._line_off = 0  # in _cur: just after the last line returned
        self._last_position: Position | None = start
        self._watermark: str | None = None  # backups with this timestamp or older are done
        self._history: deque[FileIdentity] = deque(maxlen=_HISTORY)
        self._started = False
        self._tail = start is None and start_at == "tail"  # start at the end of what exists at the first look
        self._closed = False
        self._problems = _Problems()
        self._baseline: object = None  # _signature() when the last read_batch began (polling)
        # The last wait() polled. (If the next one falls back to polling, its stale baseline makes it return at
        # once: one spurious wakeup, after which read_batch takes baselines again.)
        self._polled = True
        self._unfinished: _Batch | None = None  # lines cut by a read_batch that was cancelled
        self._inotify: asyncinotify.Inotify | None = None
        self._watched: dict[Path, tuple[int, int]] = {}  # dir -> (dev, ino) watched

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
        try:
            if self._polled:  # only polling needs the baseline: with inotify, one thread round trip less per read
                self._baseline = await asyncio.to_thread(self._signature)
            await self._fill(batch, max_bytes)
        except OSError as e:  # keep what was cut already: its position is accounted for
            self._io_problem(e)
        except asyncio.CancelledError:
            if batch.lines:
                self._unfinished = batch
            raise
        else:
            self._problems.clear("io", f"reading {self._path} works again")
        if not batch.lines:
            return None
        assert batch.end is not None
        assert batch.start is not None
        size = batch.end.offset - batch.start
        max_line = self._lines.max_line
        self.stats.lines += len(batch.lines)
        self.stats.bytes += size
        self.stats.truncated_lines += len(batch.truncated)
        self.stats.long_line_bytes_dropped += sum(n - max_line for _, n in batch.truncated)
        return LineBatch(
            lines=batch.lines, end=batch.end, size=size, truncated=batch.truncated, caught_up=batch.caught_up
        )

    async def wait(self, timeout: float | None) -> None:
        """Return when the log may have changed (inotify, else polling every poll_interval) or on timeout.

        May return early without a change; the caller just calls read_batch again.
        """
        self._check_open()
        limit = _SAFETY_WAKEUP if timeout is None else min(max(timeout, 0.0), _SAFETY_WAKEUP)
        inotify = self._ensure_inotify()
        self._polled = inotify is None
        if inotify is not None:
            await self._wait_inotify(inotify, limit)
        else:
            await self._wait_poll(limit)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cur is not None:
            self._close_source(self._cur)
            self._cur = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    # -- reading ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"tailer for {self._path} is closed")

    def _position(self) -> Position:
        assert self._cur is not None
        return Position(file=self._cur.identity(), offset=self._line_off, path=str(self._cur.path))

    def _cut(self, batch: _Batch, budget: int) -> None:
        before = len(batch.lines)
        self._buf_pos, advanced = self._lines.take(self._buf, self._buf_pos, budget, batch.lines, batch.truncated)
        self._line_off += advanced
        if len(batch.lines) > before:
            batch.end = self._position()
        if self._buf_pos >= len(self._buf):
            self._buf, self._buf_pos = b"", 0

    async def _fill(self, batch: _Batch, max_bytes: int) -> None:
        while True:
            src = self._cur
            if src is None:
                if batch.lines or not await self._advance():
                    return
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
                continue
            elif not src.complete:  # at the end of the live file: is it still the live file?
                moved, backup = await asyncio.to_thread(self._moved_away, src)
                if not moved:
                    batch.caught_up = True
                    return  # caught up
                src.complete = True
                src.path = backup or src.path  # for messages and Position.path
                self.stats.rotations += 1
                log.info("%s was rotated: reading %s to its end before the next file", self._path, src.path)
                continue  # drain: the writer closed it before renaming, so its end is final now
            # a complete file read to its end
            before = len(batch.lines)
            self._line_off += self._lines.flush(batch.lines, batch.truncated)
            if len(batch.lines) > before:
                batch.end = self._position()
            self._finish(src)
            if batch.lines:
                return  # a batch ends with its file: its end Position names one file
            batch.start = None

    async def _read(self, src: _Source) -> _ReadResult:
        # A read cancelled with its caller still completes in its thread; for a .gz the bytes are gone from
        # the decompressor then, so the next call takes that result instead of reading again.
        fut = src.inflight
        if fut is None:
            if src.gz is not None:
                fut = asyncio.ensure_future(asyncio.to_thread(_read_gz, src.gz, self._read_size))
            else:
                head = None if src.complete else bytes(src.head)
                fut = asyncio.ensure_future(asyncio.to_thread(_read_plain, src.fd, src.read_off, self._read_size, head))
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

    def _moved_away(self, src: _Source) -> tuple[bool, Path | None]:
        """Does the log path no longer name `src`? And the backup name it has now, if any. Blocking."""
        try:
            if src.same_inode(os.stat(self._path)):
                return False, None  # the common case: one stat
            missing = False
        except (FileNotFoundError, NotADirectoryError):
            missing = True
        backup = None
        for sibling in self._siblings():
            if not sibling.gz:
                with contextlib.suppress(OSError):
                    if src.same_inode(os.stat(sibling.path)):
                        backup = sibling.path
        if missing:
            # Between lumberjack's rename and create, or the directory is gone. Rotated only if our inode is
            # a backup now; otherwise keep it: the writer may still append (even to a deleted file, which we
            # can still read), and a recreated log will be a different file.
            return backup is not None, backup
        return True, backup

    async def _truncated(self, src: _Source, size: int) -> None:
        """The live file shrank below our offset or its first bytes changed."""
        old = src.identity()
        unread = max(0, src.size - src.read_off)
        partial = self._lines.pending
        # copy-truncate (logrotate): the copy, made before the truncate, holds what we had not read yet.
        copy = await self._find_copy(old)
        self.stats.truncations += 1
        if copy is not None:
            log.warning(
                "%s was truncated (copy-truncate): reading the rest from its copy %s at offset %d, then %s "
                "from the start",
                self._path,
                copy.path,
                src.read_off,
                self._path,
            )
            if await self._set_current(copy, src.read_off, line_off=self._line_off, keep_partial=True):
                self._close_source(src)  # (if cancelled before this, src stays current: detected again)
                return
        lost = unread + partial
        self.stats.truncation_bytes_lost += lost
        log.warning(
            "%s was truncated or rewritten (now %d bytes, we had read %d): %d bytes that had not been shipped "
            "are lost; reading it again from the start",
            src.path,
            size,
            src.read_off,
            lost,
        )
        self._lines.reset()
        self._buf, self._buf_pos = b"", 0
        src.reset_head()
        src.read_off = 0
        src.size = size
        self._line_off = 0

    async def _find_copy(self, identity: FileIdentity) -> _Source | None:
        for sibling in await asyncio.to_thread(self._siblings):
            if not self._newer(sibling.ts):
                continue
            try:
                cand = await _in_thread(_open_source, sibling.path, sibling.ts, sibling.gz, release=_Source.close)
            except OSError:
                continue
            if _content_match(identity, bytes(cand.head)) and (cand.dev, cand.ino) != (identity.dev, identity.ino):
                return cand
            cand.close()
        return None

    def _finish(self, src: _Source) -> None:
        """`src` was read to its end and will not grow: remember it, close it."""
        self._last_position = self._position()
        self._history.append(src.identity())
        if src.ts is not None:
            self._watermark = src.ts
        self._close_source(src)
        self._cur = None
        self._lines.reset()
        self._buf, self._buf_pos = b"", 0

    def _close_source(self, src: _Source) -> None:
        if src.inflight is not None and not src.inflight.done():
            src.inflight.add_done_callback(lambda _: src.close())  # a thread still uses it
        else:
            src.close()

    # -- choosing the file --------------------------------------------------------------------------------

    def _newer(self, ts: str) -> bool:
        return self._watermark is None or ts > self._watermark

    def _specs(self) -> list[tuple[Path, re.Pattern[str]]]:
        """Where backups are: next to the configured path, and next to its target if it is a symlink."""
        specs = [(self._path.parent, _sibling_pattern(self._path.name))]
        real = Path(os.path.realpath(self._path))
        if real.parent != Path(os.path.realpath(self._path.parent)):
            specs.append((real.parent, _sibling_pattern(real.name)))
        elif real.name != self._path.name:
            specs.append((self._path.parent, _sibling_pattern(real.name)))
        return specs

    def _siblings(self) -> list[_Sibling]:
        """Rotated backups, oldest first; a plain file wins over a .gz of the same time (lumberjack removes
        the plain file only once the .gz is complete). Blocking."""
        found: dict[tuple[str, str], _Sibling] = {}
        for directory, pattern in self._specs():
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            real_dir = os.path.realpath(directory)
            for entry in entries:
                m = pattern.fullmatch(entry.name)
                if m is None:
                    continue
                key = (real_dir, m["ts"])
                sibling = _Sibling(Path(entry.path), m["ts"], m["gz"] is not None)
                if key not in found or found[key].gz:
                    found[key] = sibling
        return sorted(found.values(), key=lambda s: (s.ts, str(s.path)))

    def _already_read(self, src: _Source) -> bool:
        head = bytes(src.head)
        for identity in self._history:
            if src.gz is None and (src.dev, src.ino) == (identity.dev, identity.ino):
                if identity.matches_head(head):
                    return True
            elif _content_match(identity, head):
                return True
        return False

    async def _open(self, path: Path, ts: str | None, gz: bool) -> _Source | None:
        """Open a file; None if it vanished (renamed or compressed meanwhile)."""
        try:
            return await _in_thread(_open_source, path, ts, gz, release=_Source.close)
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def _advance(self) -> bool:
        """Make the next file to read current. False if there is none (yet)."""
        if not self._started:
            if not await self._resolve_start():
                return False
            if self._cur is not None:
                return True
        # Rotation can happen while we look: a few rounds, then the next read_batch tries again.
        for _ in range(8):
            siblings = await asyncio.to_thread(self._siblings)
            vanished = False
            for sibling in siblings:
                if not self._newer(sibling.ts):
                    continue
                try:
                    src = await self._open(sibling.path, sibling.ts, sibling.gz)
                except _CorruptGzip as e:
                    self._unreadable(sibling.path, sibling.ts, e)
                    continue
                if src is None:
                    vanished = True
                    break
                if self._already_read(src):  # e.g. the file we just finished, now a backup
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

    def _unread_backup_exists(self, live: _Source) -> bool:
        """Is there a backup newer than the watermark other than `live` itself? Blocking."""
        for sibling in self._siblings():
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
            self._watermark = ts

    async def _set_current(
        self, src: _Source, read_off: int, *, line_off: int | None = None, keep_partial: bool = False
    ) -> bool:
        """Start reading `src` at read_off. False if it cannot be read (a corrupt .gz: logged, skipped)."""
        if read_off > 0 or src.gz is not None:
            try:
                reached = await asyncio.to_thread(_seek, src, read_off)
                if reached < read_off and src.gz is not None:
                    await asyncio.to_thread(_seek, src, 0)
            except _CorruptGzip as e:
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

    async def _resolve_start(self) -> bool:
        """First look: where to begin. False while neither the log nor a backup exists."""
        siblings = await asyncio.to_thread(self._siblings)
        live_exists = await asyncio.to_thread(os.path.exists, self._path)
        if not siblings and not live_exists:
            # Not there yet (volume not mounted, apiserver not started): nothing to resume from or lose,
            # and for start_at="tail" whatever appears later is new.
            self._tail = False
            self._problems.report("missing", f"waiting for {self._path} to appear", logging.INFO)
            return False
        self._problems.clear("missing")
        newest = siblings[-1].ts if siblings else None
        if self._start is not None:
            src = await self._find_checkpointed(self._start.file, siblings)
            if src is not None:
                self._watermark = src.ts if src.ts is not None else newest
                self._started = True
                await self._set_current(src, self._start.offset)
                return True  # (if that failed, _advance goes on with the next file)
            self.stats.checkpoint_misses += 1
            first = siblings[0].path if siblings else self._path
            log.error(
                "the checkpoint names %s (device %d, inode %d, offset %d), but neither %s nor a rotated backup "
                "of it is that file any more: it was rotated away and deleted while pyforward was not running. "
                "Its lines after offset %d, and those of any backup deleted with it, are lost; starting at the "
                "head of the oldest remaining file, %s",
                self._start.path,
                self._start.file.dev,
                self._start.file.ino,
                self._start.offset,
                self._path,
                self._start.offset,
                first,
            )
        elif self._tail:
            self._watermark = newest
            live = await self._open(self._path, None, False)
            if live is not None:
                try:
                    offset, discard = await asyncio.to_thread(_tail_offset, live, self._read_size)
                except BaseException:
                    live.close()
                    raise
                self._started = True
                if await self._set_current(live, offset):
                    self._lines.discard = discard
                return True
        self._started = True
        return True

    async def _find_checkpointed(self, identity: FileIdentity, siblings: list[_Sibling]) -> _Source | None:
        """The file the checkpoint names: by (dev, ino) and fingerprint, else (a .gz backup, a copy) by
        fingerprint alone, the oldest such backup (more duplicates rather than a skipped file)."""
        by_content: _Source | None = None
        candidates: list[tuple[Path, str | None, bool]] = [(s.path, s.ts, s.gz) for s in siblings]
        candidates.append((self._path, None, False))
        for path, ts, gz in candidates:
            try:
                src = await self._open(path, ts, gz)
            except _CorruptGzip as e:
                log.error("cannot read %s while looking for the checkpointed file: %s", path, e.strerror)
                continue
            except BaseException:  # EACCES etc.: retry the whole lookup later rather than call the file lost
                if by_content is not None:
                    by_content.close()
                raise
            if src is None:
                continue
            head = bytes(src.head)
            if not gz and (src.dev, src.ino) == (identity.dev, identity.ino) and identity.matches_head(head):
                if by_content is not None:
                    by_content.close()
                return src
            if by_content is None and ts is not None and _content_match(identity, head):
                by_content = src
                continue
            src.close()
        return by_content

    def _io_problem(self, e: OSError) -> None:
        self.stats.errors += 1
        what = e.filename if e.filename is not None else self._path
        hint = (
            " (check the file and directory permissions of the pyforward user)"
            if isinstance(e, PermissionError)
            else ""
        )
        self._problems.report("io", f"cannot read {what}: {e.strerror or e}{hint}; retrying")

    # -- waiting ------------------------------------------------------------------------------------------

    def _signature(self) -> object:
        """What polling compares: the log, its directories, the size of the open file. Blocking."""
        parts: list[object] = [_stat_key(self._path), _stat_key(self._path.parent)]
        real_parent = Path(os.path.realpath(self._path)).parent
        if real_parent != self._path.parent:
            parts.append(_stat_key(real_parent))
        src = self._cur
        if src is not None and src.gz is None and not src.closed:
            try:
                parts.append(os.fstat(src.fd).st_size)
            except OSError as e:
                parts.append(e.errno)
        return tuple(parts)

    async def _wait_poll(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if await asyncio.to_thread(self._signature) != self._baseline:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(self._poll_interval, remaining))

    def _watch_dirs(self) -> list[Path]:
        dirs = [self._path.parent]
        real_parent = Path(os.path.realpath(self._path)).parent
        if real_parent != Path(os.path.realpath(self._path.parent)):
            dirs.append(real_parent)
        return dirs

    def _ensure_inotify(self) -> asyncinotify.Inotify | None:
        """An inotify watching the log's directories, or None to poll (disabled, unavailable, a dir is
        missing: inotify cannot watch for a directory to appear)."""
        if not self._use_inotify:
            return None
        if self._inotify is None:
            if not _HAVE_INOTIFY:
                log.info("inotify is not available here: polling %s every %ss", self._path, self._poll_interval)
                self._use_inotify = False
                return None
            try:
                self._inotify = asyncinotify.Inotify(sync_timeout=0)
            except OSError as e:  # EMFILE: fs.inotify.max_user_instances reached
                log.warning(
                    "cannot use inotify (%s): polling %s every %ss", e.strerror, self._path, self._poll_interval
                )
                self._use_inotify = False
                return None
        Mask = asyncinotify.Mask
        mask = (
            Mask.CREATE | Mask.MODIFY | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.ATTRIB
            | Mask.CLOSE_WRITE | Mask.DELETE_SELF | Mask.MOVE_SELF
        )  # fmt: skip
        complete = True
        for directory in self._watch_dirs():
            try:
                st = os.stat(directory)
                key = (st.st_dev, st.st_ino)
                if self._watched.get(directory) != key:  # new, or deleted and recreated
                    self._inotify.add_watch(directory, mask)
                    self._watched[directory] = key
            except OSError:
                self._watched.pop(directory, None)
                complete = False
        return self._inotify if complete else None

    def _relevant(self, event: asyncinotify.Event) -> bool:
        Mask = asyncinotify.Mask
        if Mask.IGNORED in event.mask:  # the watched directory is gone: re-watch once it is back
            if event.watch is not None:
                self._watched.pop(event.watch.path, None)
            return True
        if event.name is None:
            return True  # about the directory itself, or queue overflow
        name = str(event.name)
        real = Path(os.path.realpath(self._path)).name
        if name in (self._path.name, real):
            return True
        return any(pattern.fullmatch(name) for _, pattern in self._specs())

    async def _wait_inotify(self, inotify: asyncinotify.Inotify, limit: float) -> None:
        # Events queued while we were reading make this return at once: that can be one spurious wakeup,
        # never a missed one (they are drained below, after which any change makes a new event).
        try:
            async with asyncio.timeout(limit):
                while not self._relevant(await inotify.get()):
                    pass
        except TimeoutError:
            return
        while (event := inotify.sync_get()) is not None:
            self._relevant(event)
