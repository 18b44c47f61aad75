"""The output: one JSON line per event, written and flushed by one writer task in a worker thread (group
commit) before any ack (see the package's doc)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import orjson

from pyforward.protocol import (
    EventTime,
    Request,
)
from pyforward.receiver.config import OutputFormat, log
from pyforward.receiver.markfile import MarkFile, OutputLength
from pyforward.receiver.recovery import cut_output
from pyforward.records import to_json_line

if TYPE_CHECKING:
    from pyforward.receiver.dedup import Mark, Planned, SourceMarks


class _Writer:
    """Serialises writes of all connections; each ``submit`` resolves once its bytes are written and flushed.

    Batches everything queued while the previous write was in the worker thread into one write (group commit).
    A file we open is written unbuffered with ``os.write`` (the batch is the buffer): if a write fails half-way
    (ENOSPC), the file is cut back to its last complete line, so the client's retry appends to a clean file.
    Standard output is a buffered binary stream: write + flush.

    With a state file (markfile.py, given to `recover`), each batch is: the output written, then the slots of the
    sources it advanced (`marks`, exactly once: dedup.py), each with the output's length (none: the header records
    it), then the marks moved and the futures resolved (the acks); `recover` cuts at start what lies beyond the
    length (recovery.py: why, and the crash bound). `sync`: fdatasync the output, then the state, per batch (power
    loss; off by default: docs/protocol.md).
    """

    def __init__(self, output: Path | None, marks: SourceMarks | None = None, *, sync: bool = False) -> None:
        self._marks = marks
        self._state: MarkFile | None = None  # set by `recover`
        self._sync = sync
        self._path = output
        self._fd: int | None = None
        self._stream: IO[bytes] | None = None
        self._regular = False
        self._identity = (0, 0)  # the output's (device, inode), recorded with its length
        if output is None:
            self._stream = sys.stdout.buffer
        else:
            try:
                self._fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(exc.errno, f"cannot open output {output}: {_reason(exc).lower()}") from None
            st = os.fstat(self._fd)
            self._regular = stat.S_ISREG(st.st_mode)
            self._identity = (st.st_dev, st.st_ino)
        self._queue: list[tuple[bytes, asyncio.Future[None], Mark | None]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def recover(self, state: MarkFile | None) -> int:
        """Cut what a killed receiver wrote but never acked, by the length `state` (loaded; None: memory only)
        recorded, and record it there from now on (recovery.py); before `start`, blocking. Returns the bytes cut;
        raises OutputError."""
        self._state = state
        if self._fd is None or self._path is None:
            return 0
        try:
            return cut_output(self._fd, self._path, state.outputs if state is not None else [])
        except OSError as exc:
            raise OutputError(exc.errno, f"cannot cut output {self._path}: {_reason(exc).lower()}") from None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pyforward-receiver-writer")

    def submit(self, data: bytes, mark: Mark | None = None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(OSError("the receiver is closing"))
            return future
        self._queue.append((data, future, mark))
        self._wakeup.set()
        return future

    def _write(self, data: bytes, slots: list[Planned]) -> None:
        end = self._write_output(data)
        state = self._state
        length = OutputLength(*self._identity, end + len(data)) if state is not None and end is not None else None
        # Every batch records the output's length, marks or not (a length left behind would make the next start cut
        # acked lines): in the slots it writes, else in the header (recovery.py). A failure fails the batch, no ack,
        # the output kept: a slot written may claim it (a duplicate at most).
        saved = self._marks.save(slots, length) if self._marks is not None else False
        if state is not None:
            if length is not None and not saved:
                state.write_output_length(length)
            if self._sync:
                state.sync()  # (a failure too: no ack for what a power loss could cut)

    def _write_output(self, data: bytes) -> int | None:
        """Write and flush `data`; returns the output's length before it (None: not a regular file)."""
        fd = self._fd
        if fd is None:
            assert self._stream is not None
            self._stream.write(data)
            self._stream.flush()
            return None
        end = os.fstat(fd).st_size if self._regular else None
        view = memoryview(data)
        try:
            while view:
                view = view[_os_write(fd, view) :]
        except OSError:
            if end is not None:  # so that the client's retry appends to a clean file
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
            raise
        if self._sync and self._regular:
            os.fdatasync(fd)
        return end

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if batch:
                data = batch[0][0] if len(batch) == 1 else b"".join(item[0] for item in batch)
                state = self._marks
                marks = [item[2] for item in batch if item[2] is not None] if state is not None else []
                slots = state.plan(marks) if state is not None and marks else []
                try:
                    await asyncio.to_thread(self._write, data, slots)
                except Exception as exc:  # an OSError in practice; anything else must not kill the writer
                    error = exc if isinstance(exc, OSError) else OSError(str(exc))
                    if state is not None and marks:
                        state.failed(marks)
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    if state is not None and marks:
                        state.committed(marks)
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_result(None)
            if self._closing and not self._queue:
                return

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            elif self._stream is not None:
                self._stream.flush()
        except OSError as exc:
            log.error("closing the output failed: %s", _reason(exc))


_os_write = os.write  # a seam for the partial-write test

_RFC3339_SECONDS: dict[int, str] = {}
_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def _rfc3339(seconds: int, nanoseconds: int) -> str:
    prefix = _RFC3339_SECONDS.get(seconds)
    if prefix is None:
        if len(_RFC3339_SECONDS) > 4096:
            _RFC3339_SECONDS.clear()
        prefix = _RFC3339_SECONDS[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{prefix}.{nanoseconds:09d}Z"


def _json_string(value: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # a lone surrogate (invalid UTF-8 from the peer): same repair as the records
        return to_json_line({"": value})[4:-2]


def render(request: Request, output_format: OutputFormat) -> bytes:
    """The output bytes of one request: one JSON line per entry."""
    entries = request.entries
    if output_format == "record":
        try:  # the common case in one pass, without a Python call per record
            return b"".join([_dumps(entry.record, option=_NEWLINE) for entry in entries])
        except TypeError:  # orjson's error: a lone surrogate, a non-str key... (records.py repairs those)
            return b"".join([to_json_line(entry.record) for entry in entries])
    head = b'{"tag":' + _json_string(request.tag) + b',"time":"'
    parts: list[bytes] = []
    for entry in entries:
        stamp: EventTime = entry.time
        parts.append(
            head
            + _rfc3339(stamp.seconds, stamp.nanoseconds).encode("ascii")
            + b'","record":'
            + to_json_line(entry.record)[:-1]
            + b"}\n"
        )
    return b"".join(parts)


class OutputError(OSError):
    """The output file cannot be opened (``str()`` is one line naming it)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
