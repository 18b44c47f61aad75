"""Has the file being read been rotated away, or truncated under us? (fluent-bit: tail_file.c,
flb_tail_file_is_rotated.)

Rotation: at the end of the live file, one stat of the log path says whether it still names the file being read
(the common case). If not, a listing finds the backup it has become: by inode, or, gzipped meanwhile by lumberjack's
mill, by its decompressed head. It is then read to its end under that name, and its timestamp moves the watermark once
done. A missing log path is a rotation only if the file is a backup now (between lumberjack's rename and create the
writer may still append).

Truncation: a read (file.read_plain) found the live file shorter than our offset, or its first bytes changed
(truncate, rewrite, copy-truncate). After copy-truncate (logrotate) the rest is read from the copy, found by its
content; otherwise the bytes not read are lost (logged, counted) and the file is read again from its start.

A mixin of the Tailer: the code reads and sets the Tailer's state (current offsets, watermark) as the Tailer does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pyforward.checkpoint import FileIdentity
from pyforward.tail.file import Source, _in_thread, content_match, open_source
from pyforward.tail.ledger import gz_starts_with
from pyforward.tail.scan import Sibling

if TYPE_CHECKING:
    import threading

    from pyforward.tail.ledger import Ledger
    from pyforward.tail.lines import LineAssembler
    from pyforward.tail.types import TailerStats

__all__ = ["RotationDetection"]

log = logging.getLogger("pyforward.tailer")


class RotationDetection:
    """The Tailer's rotation and truncation handling (see the module doc); Tailer inherits it and provides what it
    uses."""

    if TYPE_CHECKING:  # the Tailer's, which mypy checks against these
        _path: Path
        _watermark: str | None
        _lock: threading.RLock
        _ledger: Ledger
        _lines: LineAssembler
        _line_off: int
        _buf: bytes
        _buf_pos: int
        stats: TailerStats

        def _list(self) -> list[Sibling]: ...
        def _newer(self, ts: str) -> bool: ...
        def _close_source(self, src: Source) -> None: ...
        async def _set_current(
            self, src: Source, read_off: int, *, line_off: int | None = None, keep_partial: bool = False
        ) -> bool: ...

    def _still_live(self, src: Source) -> bool:
        """Does the log path still name `src`? (False: look closer, in _moved_away.)"""
        try:
            return src.same_inode(os.stat(self._path))
        except OSError:
            return False

    def _moved_away(self, src: Source) -> tuple[bool, Path | None, str | None]:
        """Does the log path no longer name `src`? And the backup it is now (name, timestamp), if found. Blocking."""
        try:
            if src.same_inode(os.stat(self._path)):
                return False, None, None  # the common case: one stat
            missing = False
        except (FileNotFoundError, NotADirectoryError):
            missing = True
        backup, ts = self._backup_of(src, self._list())
        if missing:
            # Between lumberjack's rename and create, or the directory is gone. Rotated only if our inode is
            # a backup now; otherwise keep it: the writer may still append (even to a deleted file, which we
            # can still read), and a recreated log will be a different file.
            return backup is not None, backup, ts
        return True, backup, ts

    def _backup_of(self, src: Source, siblings: list[Sibling]) -> tuple[Path | None, str | None]:
        """The backup `src` (opened as the live log) has become: by inode, or, gzipped meanwhile by lumberjack's
        mill, by its decompressed head. Blocking (may open one .gz)."""
        with self._lock:
            for ts, seen in self._ledger.known.items():  # stat()ed by the listing just made
                if not seen.gz and (seen.dev, seen.ino) == (src.dev, src.ino):
                    return seen.path, ts
            watermark = self._watermark
        # The live file is read only once no unread backup is left, and lumberjack names backups by rotation time:
        # so ours is the oldest backup newer than the watermark, if it was not deleted already.
        for sibling in siblings:
            if watermark is not None and sibling.ts <= watermark:
                continue
            if sibling.gz and gz_starts_with(sibling.path, src):
                return sibling.path, sibling.ts
            break
        return None, None

    async def _truncated(self, src: Source, size: int) -> None:
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
        # A loss is an ERROR, once, with its size (counted: pyforward_truncation_lost_bytes_total); a truncation that
        # came after we had read everything loses nothing.
        log.log(
            logging.ERROR if lost else logging.WARNING,
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

    async def _find_copy(self, identity: FileIdentity) -> Source | None:
        for sibling in await asyncio.to_thread(self._list):
            if not self._newer(sibling.ts):
                continue
            try:
                cand = await _in_thread(open_source, sibling.path, sibling.ts, sibling.gz, release=Source.close)
            except OSError:
                continue
            if content_match(identity, bytes(cand.head)) and (cand.dev, cand.ino) != (identity.dev, identity.ino):
                return cand
            cand.close()
        return None
