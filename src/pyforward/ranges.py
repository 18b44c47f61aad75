"""The record ranges of the chunk being built: which file its records came from and the bytes each one covers (the
``pyforward.*`` options, protocol/_ranges.py; issue 22, exactly once into `pyforward receive`).

A chunk holds the records of one file (the pipeline closes the chunk being built when the file changes: at most one
extra chunk per rotation), so its ranges are a source id, the start offset of its first record and each record's
length. Built from what the tailer already knows (LineBatch.lengths): nothing per line is added to the read path.
"""

from __future__ import annotations

from typing import Any

from pyforward.protocol import range_options
from pyforward.tail import LineBatch

__all__ = ["ChunkRanges"]


class ChunkRanges:
    """Accumulates the ranges of the records added to the chunk being built; `take` hands them to the chunk."""

    __slots__ = ("_lengths", "_next", "_offset", "_source")

    def __init__(self) -> None:
        self._source = ""
        self._offset = 0
        self._lengths: list[int] = []
        self._next = 0  # where the next line of the current batch starts

    def other_file(self, batch: LineBatch) -> bool:
        """The chunk being built holds records of another file than `batch`'s: it must leave first."""
        return bool(self._lengths) and batch.source != self._source

    def start(self, batch: LineBatch) -> list[int]:
        """A batch comes: its lines' lengths (for `add`); they end where the batch ends."""
        lengths = batch.lengths()
        self._next = batch.end.offset - sum(lengths)
        return lengths

    def add(self, source: str, lengths: list[int]) -> None:
        """The next `lengths` lines of the batch went into the chunk."""
        if not self._lengths:
            self._source = source
            self._offset = self._next
        self._lengths.extend(lengths)
        self._next += sum(lengths)

    def take(self) -> dict[str, Any]:
        """The chunk's options; the next chunk starts empty."""
        options = range_options(self._source, self._offset, self._lengths)
        self._lengths = []
        return options
