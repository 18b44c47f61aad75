"""Where reading starts at open(): the checkpointed file and offset, or start_at (fluent-bit: tail_db.c, the
offset lookup at start).

At start, the checkpoint names a file by (dev, inode) and the fingerprint of its first bytes. It may be the live log,
a rotated backup (plain or gzipped since), or gone: lumberjack rotated it away and deleted it while pyforward was not
running (a loss: logged once at ERROR with its size, counted). lumberjack may rename, gzip and delete while we look,
so "gone" is said only once a listing shows nothing new (issue 12). Without a checkpoint, start_at="tail" starts at
the end of the live log and treats every backup there is as history.

A mixin of the Tailer: the code reads and sets the Tailer's state (watermark, current file) as the Tailer does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pyforward.checkpoint import FileIdentity, Position
from pyforward.tail import scan
from pyforward.tail.file import CorruptGzip, Source, content_match, tail_offset
from pyforward.tail.scan import Sibling

if TYPE_CHECKING:
    import threading

    from pyforward.tail.lines import LineAssembler
    from pyforward.tail.types import Problems, TailerStats

__all__ = ["StartResolution"]

log = logging.getLogger("pyforward.tailer")

#: Listings at start-up while the backups change under the look-up (issue 12: a rotation, or a gzip then delete, while
#: the candidates are opened made the checkpointed file look gone). Each round opens only names not seen before, so
#: a round is short; lumberjack would have to rotate this many times during the look-up to exhaust them.
_START_ROUNDS = 50


class StartResolution:
    """The Tailer's start-up resolution (see the module doc); Tailer inherits it and provides what it uses."""

    if TYPE_CHECKING:  # the Tailer's, which mypy checks against these
        _path: Path
        _start: Position | None
        _tail: bool
        _read_size: int
        _watermark: str | None
        _started: bool
        _lock: threading.RLock
        _lines: LineAssembler
        _problems: Problems
        stats: TailerStats

        def _list(self) -> list[Sibling]: ...
        def _lost(self, size: int) -> None: ...
        async def _open(self, path: Path, ts: str | None, gz: bool) -> Source | None: ...
        async def _set_current(
            self, src: Source, read_off: int, *, line_off: int | None = None, keep_partial: bool = False
        ) -> bool: ...

    async def _resolve_start(self) -> bool:
        """First look: where to begin. False while neither the log nor a backup exists."""
        siblings = await asyncio.to_thread(self._list)
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
            found = await self._find_checkpointed(self._start.file, siblings)
            if found is not None:
                src, newest_before = found
                with self._lock:
                    self._watermark = src.ts if src.ts is not None else newest_before
                    self._started = True
                await self._set_current(src, self._start.offset)
                return True  # (if that failed, _advance goes on with the next file)
            await self._checkpoint_lost(self._start)
        elif self._tail:
            live = await self._open(self._path, None, False)
            if live is not None:
                try:
                    offset, discard = await asyncio.to_thread(tail_offset, live, self._read_size)
                    # Every backup there is now is history, also one that a rotation made after the first listing
                    # (it is the file we opened, or older): "tail" must not read it (issue 12).
                    after = await asyncio.to_thread(self._list)
                except BaseException:
                    live.close()
                    raise
                with self._lock:
                    self._watermark = after[-1].ts if after else newest
                    self._started = True
                if await self._set_current(live, offset):
                    self._lines.discard = discard
                return True
            with self._lock:
                self._watermark = newest
        with self._lock:
            self._started = True
        return True

    async def _checkpoint_lost(self, start: Position) -> None:
        """The checkpointed file is really gone: say what was lost, count it."""
        self.stats.checkpoint_misses += 1
        unread = max(0, start.size - start.offset)
        self._lost(unread)
        remaining = await asyncio.to_thread(self._list)
        first = remaining[0].path if remaining else self._path
        size = (
            f"{start.size} bytes when last seen, so at least {unread} bytes unread"
            if start.size
            else "size when last seen unknown"
        )
        log.error(
            "the checkpoint names %s (device %d, inode %d, offset %d, %s), but neither %s nor a rotated backup of "
            "it is that file any more: it was rotated away and deleted while pyforward was not running. Its lines "
            "after offset %d, and those of any backup deleted with it, are lost; starting at the head of the oldest "
            "remaining file, %s. Keep pyforward's downtime shorter than the API server's log retention "
            "(--audit-log-maxbackup, --audit-log-maxsize)",
            start.path,
            start.file.dev,
            start.file.ino,
            start.offset,
            size,
            self._path,
            start.offset,
            first,
            extra={"rate_key": f"checkpoint lost {start.path}", "lost_file": start.path, "lost_bytes": unread},
        )

    async def _find_checkpointed(
        self, identity: FileIdentity, siblings: list[Sibling]
    ) -> tuple[Source, str | None] | None:
        """The file the checkpoint names, and the newest backup timestamp listed before it was opened (the watermark
        if it is the live file). By (dev, ino) and fingerprint, else (a .gz backup, a copy) by fingerprint alone,
        the oldest such backup (more duplicates rather than a skipped file).

        lumberjack renames, gzips and deletes while we look (opening 660 .gz backups takes ~130 ms): the file may be
        renamed after the listing (not in it), or a plain backup replaced by its .gz (written first, then the plain
        file deleted: the .gz was not in the listing). Calling it gone then re-shipped every backup (issue 12). So a
        plain backup gone when opened is followed to its .gz by name, and after each round the directory is listed
        again: names not looked at yet, or another live file, make another round that opens only those. The file is
        gone only when a listing shows nothing new.
        """
        by_content: tuple[Source, str | None] | None = None
        examined: set[Path] = set()
        live_seen: tuple[int, int] | None = None
        try:
            for _ in range(_START_ROUNDS):
                newest = siblings[-1].ts if siblings else None
                for sibling in siblings:
                    if sibling.path in examined:
                        continue
                    examined.add(sibling.path)
                    src = await self._open_candidate(sibling, examined)
                    if src is None:
                        continue
                    if _is_file(src, identity):
                        if by_content is not None:
                            by_content[0].close()
                        return src, newest
                    if by_content is None and content_match(identity, bytes(src.head)):
                        src.origin = (identity.dev, identity.ino)  # the same bytes: the same source (issue 22)
                        by_content = (src, newest)
                        continue
                    src.close()
                live = await asyncio.to_thread(_inode, self._path)
                if live is not None and live != live_seen:
                    src = await self._open(self._path, None, False)
                    if src is not None:
                        live = (src.dev, src.ino)
                        if _is_file(src, identity):
                            if by_content is not None:
                                by_content[0].close()
                            return src, newest
                        src.close()
                live_seen = live
                if by_content is not None:
                    return by_content
                again = await asyncio.to_thread(self._list)
                if all(s.path in examined for s in again) and await asyncio.to_thread(_inode, self._path) == live_seen:
                    return None  # nothing changed while we looked: it is really gone
                siblings = again
            return None
        except BaseException:  # EACCES etc.: retry the whole lookup later rather than call the file lost
            if by_content is not None:
                by_content[0].close()
            raise

    async def _open_candidate(self, sibling: Sibling, examined: set[Path]) -> Source | None:
        try:
            src = await self._open(sibling.path, sibling.ts, sibling.gz)
            if src is None and not sibling.gz:
                gz = scan.twin(sibling.path)  # gzipped (and the plain file deleted) since the listing
                examined.add(gz)
                src = await self._open(gz, sibling.ts, True)
        except CorruptGzip as e:
            log.error("cannot read %s while looking for the checkpointed file: %s", e.filename, e.strerror)
            return None
        return src


def _is_file(src: Source, identity: FileIdentity) -> bool:
    """`src` is the file `identity` names: same inode, same first bytes (a plain file; a .gz is a new inode)."""
    return (
        src.gz is None and (src.dev, src.ino) == (identity.dev, identity.ino) and identity.matches_head(bytes(src.head))
    )


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
