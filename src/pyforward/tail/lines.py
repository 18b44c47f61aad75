"""Cutting read buffers into lines, with a bound on the one incomplete line (fluent-bit: tail_file.c's line
handling)."""

from __future__ import annotations

__all__ = ["LineAssembler"]


class LineAssembler:
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
