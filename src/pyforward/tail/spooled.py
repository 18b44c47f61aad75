"""The Tailer's side of the spool (tail/spool.py, issue 21): where reading stands, for the guard; the file being read
skipped and closed when the guard releases it; a written checkpoint passed on to the spool; what the start position has
passed.

A mixin of the Tailer: the code reads and sets the Tailer's state (the file being read, the watermark) as the Tailer
does.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pyforward.checkpoint import Position
from pyforward.tail.scan import Sibling
from pyforward.tail.spool import Released, Spool

if TYPE_CHECKING:
    import threading

    from pyforward.tail.file import Source
    from pyforward.tail.ledger import Ledger
    from pyforward.tail.lines import LineAssembler
    from pyforward.tail.types import TailerStats

__all__ = ["SpoolSide"]

log = logging.getLogger("pyforward.tailer")


class SpoolSide:
    """The Tailer's hooks for its spool; Tailer inherits it and provides what it uses."""

    spool: Spool | None
    _spool_dir: Path | None
    _dropped: Source | None
    _filling: bool
    _loop: asyncio.AbstractEventLoop | None

    def _init_spool(self, path: Path, spool_dir: Path | None, max_bytes: int, min_free: int | None) -> None:
        """Hard links that keep unshipped backups from the API server's retention. None: no spool at all (spool_dir not
        given); with max_bytes=0 an earlier run's spool is still read and emptied."""
        self.spool = None
        if spool_dir is not None:
            self.spool = Spool(path, spool_dir, max_bytes=max_bytes, min_free=min_free, unread=self._spool_released,
                               reading=self._spool_reading)  # fmt: skip
        self._spool_dir = spool_dir
        self._dropped = None  # released by the spool's guard while being read: skip the rest of it
        self._filling = False  # a read_batch is running (it skips a dropped file itself)
        self._loop = None

    def _spool_take(self, siblings: list[Sibling]) -> None:
        """A listing (in its thread, outside the Tailer's lock: the guard asks _spool_released, which takes it)."""
        if self.spool is not None:
            self.spool.take(siblings)

    def _spool_appeared(self, siblings: list[Sibling]) -> None:
        if self.spool is not None:  # (on the loop, outside the Tailer's lock, as in _spool_take)
            self.spool.appeared(siblings)

    async def _begin_spool(self) -> None:
        if self.spool is not None:  # link what the start position has not passed, adopt an earlier run's spool
            await asyncio.to_thread(self.spool.begin, self._start_mark())

    async def _start_spool(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.spool is not None:
            await asyncio.to_thread(self.spool.start)  # (makes its directory, tries a hard link)

    if TYPE_CHECKING:  # the Tailer's, which mypy checks against these
        stats: TailerStats
        _cur: Source | None
        _watermark: str | None
        _lock: threading.RLock
        _ledger: Ledger
        _lines: LineAssembler
        _line_off: int
        _buf: bytes
        _buf_pos: int
        _closed: bool

        def _newer(self, ts: str) -> bool: ...
        def _finish(self, src: Source) -> None: ...

    def saved(self, position: Position) -> None:
        """A checkpoint naming `position` was written (not only attempted): the spool removes the links it has passed
        (in a thread, only when there are any). Call from the event loop."""
        spool = self.spool
        if spool is not None and spool.saved(position):
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(spool.prune), name="spool-prune")
            task.add_done_callback(_log_failure)

    def _start_mark(self) -> tuple[str, int] | None:
        """What the start position has passed: the backups before the checkpointed one, or up to the watermark."""
        cur = self._cur
        if cur is not None and cur.ts is not None:
            return cur.ts, 0
        return (self._watermark, 1) if self._watermark is not None else None

    def _spool_reading(self, ts: str, dev: int, ino: int) -> int:
        """For the spool's guard (in its thread): 0 not read yet, 1 being read, 2 read to its end."""
        with self._lock:
            cur = self._cur
            if cur is not None and not cur.closed and ((cur.dev, cur.ino) == (dev, ino) or cur.ts == ts):
                return 1
            return 0 if self._newer(ts) else 2

    def _spool_released(self, released: Released) -> tuple[int, float | None]:
        """The spool's guard let `released` go (in its thread): how much of it was not read yet (a loss); if it is the
        file being read, its rest is skipped and its fd closed (an open fd would keep the space)."""
        with self._lock:
            self._ledger.released(released.ts)  # reported by the spool: not a loss of the retention as well
            stats = self.stats
            avg_line = stats.bytes / stats.lines if stats.lines else None
            cur = self._cur
            if cur is not None and not cur.closed and (cur.dev, cur.ino) == (released.dev, released.ino):
                unread = max(0, released.size - self._line_off)  # (decompressed bytes for a .gz: offsets are)
                if cur.ts is None:
                    cur.ts = released.ts
                self._dropped = cur
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._drop_now)
                return unread, avg_line
            if not self._newer(released.ts):
                return 0, avg_line  # read to its end: its lines are in flight
            return released.size, avg_line

    def _drop_now(self) -> None:
        """On the loop: skip the dropped file now unless a read_batch is running (it does it itself)."""
        if self._dropped is not None and self._dropped is self._cur and not self._filling and not self._closed:
            self._skip_dropped()

    def _skip_dropped(self) -> None:
        """Close the dropped file: its rest is lost (the spool logged and counted it); on to the next file."""
        src = self._dropped
        assert src is not None
        self._dropped = None
        log.info("skipping the rest of %s: the spool released it", src.path)
        self._lines.reset()
        self._buf, self._buf_pos = b"", 0
        self._finish(src)


def _log_failure(task: asyncio.Task[None]) -> None:
    # A short task (one per file the checkpoint passes): not supervised, but never silent (issue 12).
    if not task.cancelled() and task.exception() is not None:
        log.error("removing passed files from the spool failed", exc_info=task.exception())

