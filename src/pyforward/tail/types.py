"""The tailer's shared types: what it returns (LineBatch), what it counts (TailerStats), and how it reports a
problem once (Problems). Below tailer.py, start.py and rotate.py, which all use them (no import circle)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import repeat
from operator import add as _add

from pyforward.checkpoint import Position

__all__ = ["LineBatch", "Problems", "TailerStats"]

log = logging.getLogger("pyforward.tailer")

#: Rate limit for repeating an unchanged problem in the log (permission denied, directory missing, ...).
_PROBLEM_REPEAT = 300.0


@dataclass(slots=True)
class LineBatch:
    """Complete lines of one file, in order."""

    lines: list[bytes]  # without the trailing b"\n" (a b"\r" before it is kept as is)
    end: Position  # just after the last line: the checkpoint once this batch is acked
    size: int  # source bytes consumed: newlines and the dropped tails of long lines included
    truncated: list[tuple[int, int]]  # (index into lines, original length) of lines cut to max_line_bytes
    caught_up: bool = False  # the batch ended at the end of the live file: the next read_batch would return None
    source: str = ""  # the file's source id (Source.source_id: pyforward.source on the wire, issue 22)
    unterminated: bool = False  # the last line is the unterminated end of a complete file (no newline counted)

    def lengths(self) -> list[int]:
        """The source bytes of each line, newline included: a cut line counts its whole original length, an
        unterminated last line what it had (pyforward.lengths on the wire, issue 22). They end at `end.offset`."""
        lengths = list(map(_add, map(len, self.lines), repeat(1)))  # len + 1 each, without Python code per line
        for index, original in self.truncated:
            lengths[index] = original + 1
        if self.unterminated:
            lengths[-1] -= 1
        return lengths


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
    lost_files: int = 0  # files gone before they were read to their end (checkpoint misses included), each logged
    lost_bytes: int = 0  # their bytes not read, at the size last seen (compressed for a .gz): a lower bound
    errors: int = 0  # I/O errors (permission denied, EIO, ...), each retried


class Problems:
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

    def __contains__(self, key: str) -> bool:
        return key in self._active
