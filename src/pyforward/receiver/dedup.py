"""Exactly once into `pyforward receive` (issue 22): per source, the end of what is written; a record that ends at or
before it was written already and is dropped (acked, not written, counted).

`pyforward run` re-sends after a crash what it read after its last checkpoint write, and a retry re-sends what was
not acked; each chunk says which file its records came from and the bytes each one covers (protocol/_ranges.py). So
for each source the receiver keeps ``written``, the end of the last record it wrote: a record whose range ends at or
before it is a re-send. A record that is not wholly before the mark is written (never lose: a range that straddles
the mark is written again rather than cut).

Writes go through the output's one writer, in order (output.py). Per source:

* ``submitted``: the end of what is queued for writing. A request decides against it (not only against ``written``),
  so that a re-send that arrives while the first copy is still being written waits for that write instead of being
  written twice; its ack waits for ``chain``, which resolves once every write queued for the source has been written
  and fails if any of them failed.
* A failed write (ENOSPC...) resets ``submitted`` to ``written`` and starts a new `generation` (the writer calls
  `failed` before the futures fail): a later write of the source that was queued before the failure and succeeds does
  not move ``written`` past the records that failed (they are re-sent, not acked, and must be written then). Until
  writes from their start have covered those records (``hole``), a write of later records (a sender that does not
  re-send in order) is written but moves nothing: re-sent, it is written again (a duplicate, never a loss).
* ``written`` moves, and the source's slot in the state file (markfile.py) is written, after the output's write and
  before the ack (output.py's writer does the three in that order).

Bounded: at most `max_sources` sources (the one idle the longest is forgotten to make room) and none idle longer than
`forget_after`. Forgetting a source can only make a duplicate (a re-send of it is written again), never a loss; a
source with writes in flight is never forgotten (those are bounded by the connections and their requests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pyforward.protocol import Request, SourceRanges
from pyforward.receiver.config import log
from pyforward.receiver.markfile import MarkFile, OutputLength, SavedMark, encode_slot

__all__ = ["Mark", "SourceMarks"]


@dataclass(slots=True, eq=False)
class _Source:
    source: str
    written: int  # end of what is written to the output (and saved)
    submitted: int  # end of what is queued for writing (>= written)
    seen: float  # wall-clock time of its last request (forgetting survives restarts)
    slot: int  # its slot in the state file (0: none, memory only)
    generation: int = 0  # bumped by a failed write: writes queued before it do not move `written`
    hole: tuple[int, int] | None = None  # the records of failed writes not written since: [start, end)
    chain: asyncio.Future[None] | None = None  # every write queued for it: done, or failed


#: What a queued write carries for the writer: the source, where its records begin and end, the generation queued in
#: (_BEYOND_HOLE: a write that must not move the mark).
Mark = tuple[_Source, int, int, int]
_BEYOND_HOLE = -1
#: A slot to write once the output write succeeded: slot, source, end, seen.
Planned = tuple[int, str, int, float]


class SourceMarks:
    """The receiver's per-source marks; `file` (None: memory only) keeps them across restarts."""

    def __init__(
        self, file: MarkFile | None, *, max_sources: int, forget_after: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._file = file
        self._max = max_sources
        self._forget_after = forget_after
        self._clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()  # least recently seen first
        self._free: list[int] = []  # slots of the state file not in use
        self._next_slot = 1
        self.dropped_records = 0
        self.dropped_bytes = 0
        self.forgotten = 0
        self.save_errors = 0

    @property
    def tracked(self) -> int:
        return len(self._sources)

    def load(self) -> None:
        """Read the state file (blocking, at start-up). Raises MarkFileError."""
        if self._file is None:
            return
        saved, free = self._file.load()
        best: dict[str, SavedMark] = {}
        for mark in saved:  # a source saved twice (forgotten, then back before its old slot was reused): the latest
            other = best.get(mark.source)
            if other is None or mark.end > other.end:
                if other is not None:
                    free.append(other.slot)
                best[mark.source] = mark
            else:
                free.append(mark.slot)
        horizon = self._clock() - self._forget_after
        kept = sorted((m for m in best.values() if m.seen >= horizon), key=lambda m: m.seen)[-self._max :]
        keep = {m.slot for m in kept}
        free.extend(m.slot for m in best.values() if m.slot not in keep)
        for mark in kept:
            self._sources[mark.source] = _Source(mark.source, mark.end, mark.end, mark.seen, mark.slot)
        self._next_slot = max([m.slot for m in saved] + free + [0]) + 1
        self._free = sorted(set(free), reverse=True)

    def submit(
        self, request: Request, ranges: SourceRanges, write: Callable[[Request, Mark | None], asyncio.Future[None]]
    ) -> tuple[asyncio.Future[None], int]:
        """Queue what of `request` is not written yet (through `write`); returns the future its ack waits for and the
        number of records queued."""
        src = self._source(ranges.source)
        if src.chain is not None and src.chain.done():  # (its callback may not have run yet)
            self._settled(src, src.chain)
        skip = ranges.ends_at_or_before(src.submitted)
        if skip:
            self.dropped_records += skip
            self.dropped_bytes += ranges.bytes_of(skip)
        chain = src.chain
        if skip == len(ranges.lengths):
            return (chain if chain is not None else _done()), 0
        part = request if not skip else dataclasses.replace(request, entries=request.entries[skip:])
        start = ranges.offset + ranges.bytes_of(skip) if skip else ranges.offset
        if src.hole is not None and start > src.hole[0]:
            future = write(part, (src, start, ranges.end, _BEYOND_HOLE))
        else:
            future = write(part, (src, start, ranges.end, src.generation))
            src.submitted = ranges.end
        if chain is not None:
            future = _both(chain, future)
        src.chain = future
        future.add_done_callback(lambda f: self._settled(src, f))
        return future, len(part.entries)

    def _settled(self, src: _Source, future: asyncio.Future[None]) -> None:
        if src.chain is not future:
            return  # a later write is chained on it and settles for both
        src.chain = None
        if future.cancelled() or future.exception() is not None:
            src.submitted = src.written  # (the writer's `failed` started a new generation already)

    def _source(self, source: str) -> _Source:
        now = self._clock()
        src = self._sources.get(source)
        if src is not None:
            src.seen = now
            self._sources.move_to_end(source)
            return src
        self._forget(now)
        slot = 0
        if self._file is not None:
            if self._free:
                slot = self._free.pop()
            else:
                slot, self._next_slot = self._next_slot, self._next_slot + 1
        src = self._sources[source] = _Source(source, 0, 0, now, slot)
        return src

    def _forget(self, now: float) -> None:
        """Make room for one more source: forget those idle longer than forget_after, and the idlest over the cap."""
        horizon = now - self._forget_after
        over = len(self._sources) + 1 - self._max
        for src in list(self._sources.values()):  # least recently seen first
            if src.seen >= horizon and over <= 0:
                break
            if src.chain is not None or src.submitted != src.written:
                continue  # writes in flight: kept (bounded by the connections and their requests)
            del self._sources[src.source]
            if src.slot:
                self._free.append(src.slot)  # overwritten by the next source's first save
            self.forgotten += 1
            over -= 1

    # -- the writer's side (output.py): before the output write, in its thread after it, then on the loop ------

    def plan(self, marks: list[Mark]) -> list[Planned]:
        """The slots to write once the output write of `marks` succeeded (on the loop, before it)."""
        if self._file is None:
            return []
        ends: dict[_Source, int] = {}
        for src, _, end, generation in marks:
            if generation == src.generation and src.slot:
                ends[src] = max(end, ends.get(src, src.written))
        return [(src.slot, src.source, end, src.seen) for src, end in ends.items()]

    def save(self, slots: list[Planned], output: OutputLength | None) -> bool:
        """Write the slots, each with the output's length after the batch (in the writer thread, after the output; the
        writer syncs the file with --sync). False if none was written or one failed: the writer records the length in
        the header then. A failure is logged and counted, not raised: the output is written, so the ack may go; the
        state on disk is behind, so a restart may duplicate, not lose."""
        if self._file is None or not slots:
            return False
        try:
            self._file.write([(slot, encode_slot(source, end, seen, output)) for slot, source, end, seen in slots])
        except OSError as exc:
            self.save_errors += 1
            log.error(
                "writing the exactly-once state %s failed (%s): written events of %d source(s) that a sender sends "
                "again after a restart of this receiver will be written twice",
                self._file.path,
                exc.strerror or exc,
                len(slots),
            )
            return False
        return True

    @staticmethod
    def failed(marks: list[Mark]) -> None:
        """The output write of `marks` failed (on the loop, before its futures fail): their records are a hole that
        later writes may not move the mark past, and a new generation for their sources, so that a write queued before
        now does not move it either."""
        for src, start, end, generation in marks:
            hole = src.hole
            src.hole = (start, end) if hole is None else (min(hole[0], start), max(hole[1], end))
            if generation == src.generation:
                src.generation += 1
                src.submitted = src.written

    @staticmethod
    def committed(marks: list[Mark]) -> None:
        """The output write of `marks` succeeded (on the loop, before the acks)."""
        for src, start, end, generation in marks:
            if generation != src.generation:
                continue
            hole = src.hole
            if hole is not None and start <= hole[0]:
                src.hole = None if end >= hole[1] else (end, hole[1])  # written from the hole's start to `end`
            if end > src.written:
                src.written = end

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _both(first: asyncio.Future[None], second: asyncio.Future[None]) -> asyncio.Future[None]:
    """Done when both are; failed if either failed (the first one's error first)."""
    both: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(_: asyncio.Future[None]) -> None:
        if both.done() or not (first.done() and second.done()):
            return
        errors = [
            OSError("the write was cancelled") if future.cancelled() else future.exception()
            for future in (first, second)
        ]  # (each one's exception is retrieved: no "never retrieved" warning)
        error = errors[0] or errors[1]
        if error is not None:
            both.set_exception(error)
        else:
            both.set_result(None)

    first.add_done_callback(settle)
    second.add_done_callback(settle)
    return both
