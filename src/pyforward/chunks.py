"""The chunk being built and the bound on what is in flight: the pipeline's memory (pipeline.py uses them; `send`
uses the budget too).

The file is the buffer: memory holds only the chunk being filled (`Building`) and the chunks in flight, whose source
bytes count against `ByteBudget` until a checkpoint covers them (docs/architecture.md, "The file is the buffer").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyforward.checkpoint import Position
from pyforward.protocol import Chunk, build_chunk
from pyforward.ranges import ChunkRanges

__all__ = ["COMPRESS_AHEAD", "INLINE_GZIP_BYTES", "Building", "ByteBudget", "build_compressed"]


class ByteBudget:
    """Bound on source bytes in flight (submitted, not yet acked). One chunk always fits when nothing is in flight."""

    def __init__(self, limit: int, on_wait: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.waiting = False  # a chunk waits for room
        self._on_wait = on_wait  # called before each wait for room
        self._changed = asyncio.Event()

    async def acquire(self, size: int) -> None:
        while self.used and self.used + size > self.limit:
            if self._on_wait is not None:
                self._on_wait()
            self._changed.clear()
            self.waiting = True
            try:
                await self._changed.wait()
            finally:
                self.waiting = False
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        self._changed.set()


@dataclass
class Building:
    """The chunk being filled: packed entries, source bytes, where it ends in the log."""

    entries: list[bytes]
    size: int = 0
    due: float = 0.0  # monotonic time by which it leaves (its first line waited the latency budget then)
    batched: bool = False  # its lines came while the writer was writing steadily (not after a quiet spell)
    end: Position | None = None
    ranges: ChunkRanges | None = None  # its records' pyforward.* options (None: record_ranges off)


#: Smaller chunks (source bytes) are compressed in the event loop: ISA-L gzip of 256 KiB takes ~0.3 ms, about what a
#: round trip through a worker thread costs here in CPU and wakeups, and at steady rates every chunk is smaller (a
#: latency budget at 1,000 events/s is ~80 KiB). Bulk chunks (1 MiB) overlap with parsing in the gzip thread.
INLINE_GZIP_BYTES = 256 << 10
#: Chunks compressing or waiting for the gzip thread: one being compressed while the next is being read.
COMPRESS_AHEAD = 2


def build_compressed(
    tag: str, blob: bytes, records: int, size: int, level: int, seq: int, extra: dict[str, Any] | None
) -> Chunk:
    return build_chunk(tag, blob, records, size=size, compress=True, level=level, position=seq, extra=extra)
