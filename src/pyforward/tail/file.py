"""One open file being read: its identity, reading plain and gzip backups (fluent-bit: tail_file.c)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hashlib
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from pyforward.checkpoint import FINGERPRINT_BYTES, FileIdentity

__all__ = [
    "CorruptGzip",
    "ReadResult",
    "Source",
    "content_match",
    "open_source",
    "read_gz",
    "read_plain",
    "seek",
    "tail_offset",
]

_T = TypeVar("_T")


def content_match(identity: FileIdentity, head: bytes) -> bool:
    """Match on content alone (a .gz backup or a copy has a new inode).

    Audit events share their first ~80 bytes ('{"kind":"Event","apiVersion":...'), so a short fingerprint
    could match a different file: require it to cover a whole line (unique auditID) or the full 4 KiB.
    """
    if identity.fp_len == 0 or not identity.matches_head(head):
        return False
    return identity.fp_len == FINGERPRINT_BYTES or b"\n" in head[: identity.fp_len]


class CorruptGzip(OSError):
    pass


class Source:
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
        self.inflight: asyncio.Future[ReadResult] | None = None  # read started by a cancelled call
        self._identity: FileIdentity | None = None
        # (dev, ino) of the file this one is a copy of: set when start-up matched a .gz (or a copy) to the checkpointed
        # file by content, so that its records keep that file's source id (docs/protocol.md, notes position.md item 3).
        self.origin: tuple[int, int] | None = None
        self._source_id: str | None = None
        self.closed = False

    def identity(self) -> FileIdentity:
        if self._identity is None or self._identity.fp_len != len(self.head):
            self._identity = FileIdentity.of(self.dev, self.ino, bytes(self.head))
        return self._identity

    def source_id(self) -> str:
        """The file's id on the wire (``pyforward.source``, issue 22): ``"<dev>:<ino>:<h>"``, h the first 16 hex digits
        of the sha256 of its first line with its newline (of its first FINGERPRINT_BYTES if that line is longer). It
        names the file for its whole life: a rename keeps dev and ino, a restart reads the same first line, and a
        truncate-and-rewrite or a reused inode gives another first line, so another source. Computed once: a line of
        the file is shipped only once complete, so the first line is complete (in `head`) by then."""
        cached = self._source_id
        if cached is not None:
            return cached
        head = bytes(self.head)
        newline = head.find(b"\n")
        complete = newline >= 0 or len(head) >= FINGERPRINT_BYTES
        first = head[: newline + 1] if newline >= 0 else head
        dev, ino = self.origin if self.origin is not None else (self.dev, self.ino)
        source = f"{dev}:{ino}:{hashlib.sha256(first).hexdigest()[:16]}"
        if complete:
            self._source_id = source
        return source

    def reset_head(self) -> None:
        self.head = bytearray()
        self._identity = None
        self._source_id = None  # truncated or rewritten: another first line, another source

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


def open_source(path: Path, ts: str | None, gz: bool) -> Source:
    """Open `path` and read its head (decompressed for .gz). Blocking: run in a thread."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    raw: IO[bytes] | None = None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if not gz:
            return Source(path, fd, st, os.pread(fd, FINGERPRINT_BYTES, 0), None, None, ts)
        raw = os.fdopen(fd, "rb")
        archive = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            head = archive.read(FINGERPRINT_BYTES)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorruptGzip(errno.EIO, f"cannot decompress: {e}", str(path)) from e
        return Source(path, fd, st, head, archive, raw, ts)
    except BaseException:
        if raw is not None:
            raw.close()
        else:
            os.close(fd)
        raise


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


@dataclass(slots=True)
class ReadResult:
    data: bytes
    truncated: bool = False
    size: int = 0
    error: str | None = None  # a .gz that cannot be decompressed further


def read_plain(
    fd: int, offset: int, n: int, head: bytes | bytearray | None, size: int | None = None
) -> ReadResult:
    """Read up to n bytes at offset (`size`: the file's size if the caller has just taken it). With `head` (a file
    still written to), make sure the file was not truncated or rewritten: its size must not be below offset, and after
    a read it must still start with the bytes we read from it earlier (copy-truncate may refill past our offset before
    we look: #9580, #4839). One look after the read is enough for both (a rewrite that comes later is seen by the next
    read); three syscalls a read, which matters at steady rates (issue 11)."""
    if size is None:
        size = os.fstat(fd).st_size
    if size < offset:
        if head is not None:
            return ReadResult(b"", truncated=True, size=size)
        data = b""
    else:
        # At most what the file holds: os.pread allocates all `n` bytes before it shrinks the result to what was
        # read, and a caught-up tailer reads a few KiB at a time. A 1 MiB allocation shrunk in place left a hole in
        # glibc's heap at every read, and RSS grew over hours (issue 11 item 5, bench/README.md "soak").
        data = os.pread(fd, min(n, size - offset), offset) if size > offset else b""
    if head and data and os.pread(fd, len(head), 0) != head:
        return ReadResult(b"", truncated=True, size=size)
    return ReadResult(data, size=max(size, offset + len(data)))


def read_gz(archive: gzip.GzipFile, n: int) -> ReadResult:
    try:
        return ReadResult(archive.read(n))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        return ReadResult(b"", error=str(e))


def seek(src: Source, offset: int) -> int:
    """Go to offset (decompressing up to it for .gz); returns the offset reached (less at end of file)."""
    if src.gz is not None:
        try:
            return src.gz.seek(offset)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorruptGzip(errno.EIO, f"cannot decompress: {e}", str(src.path)) from e
    return min(offset, os.fstat(src.fd).st_size)


def tail_offset(src: Source, window: int) -> tuple[int, bool]:
    """Where start_at="tail" begins: after the last complete line. (offset, discard until next newline)."""
    size = os.fstat(src.fd).st_size
    start = max(0, size - window)
    nl = os.pread(src.fd, size - start, start).rfind(b"\n")
    if nl >= 0:
        return start + nl + 1, False
    if start == 0:
        return 0, False  # the file is one incomplete line: it is new
    return size, True  # mid-line in a line longer than the window: skip to its end
