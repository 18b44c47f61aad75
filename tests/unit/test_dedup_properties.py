"""SourceMarks (receiver/dedup.py) against a model, with hypothesis: a sender that sends a file's records in order and
re-sends from any earlier point (a restart at its checkpoint, a retry), with any overlap, and writes that fail (the
sender re-sends what was not acked, in any order): every record of an acked request is in the output, and exactly once
when no write failed (a failed write may cost a duplicate, never a loss) (issue 22). The writer is simulated: a write
succeeds or fails as a whole, as output.py's batches do."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from pyforward.protocol import EventTime, Request, SourceRanges, parse_ranges, range_options
from pyforward.protocol._readers import Entry
from pyforward.protocol._types import Mode
from pyforward.receiver.dedup import Mark, SourceMarks

SOURCE = "7:7:0123456789abcdef"
LENGTH = 10

requests = st.lists(
    # how far back from the first record never sent it starts (a re-send), how many, does its write fail
    st.tuples(st.integers(0, 12), st.integers(1, 8), st.booleans()),
    min_size=1,
    max_size=25,
)


def _request(first: int, count: int) -> tuple[Request, SourceRanges]:
    entries = [Entry(EventTime(1), {"n": n}) for n in range(first, first + count)]
    options = range_options(SOURCE, first * LENGTH, [LENGTH] * count)
    ranges = parse_ranges(options, count)
    assert ranges is not None
    return Request("t", Mode.FORWARD, entries, options, b"c", 0), ranges


@settings(max_examples=300, deadline=None)
@given(sends=requests)
def test_every_acked_record_written_exactly_once(sends: list[tuple[int, int, bool]]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        marks = SourceMarks(None, max_sources=4, forget_after=1e9)
        output: list[int] = []
        failing = True

        def write(request: Request, mark: Mark | None) -> asyncio.Future[None]:
            future: asyncio.Future[None] = loop.create_future()
            assert mark is not None
            if failing:
                marks.failed([mark])
                future.set_exception(OSError("disk full"))
            else:
                output.extend(entry.record["n"] for entry in request.entries)
                marks.committed([mark])
                future.set_result(None)
            return future

        async def send(first: int, count: int) -> bool:
            request, ranges = _request(first, count)
            future, _ = marks.submit(request, ranges, write)
            try:
                await future
            except OSError:
                return False
            return True

        acked: set[int] = set()
        unacked: list[tuple[int, int]] = []
        unsent = 0  # the sender's next record never sent: it never skips ahead of it
        for back, count, fails in sends:
            first = max(0, unsent - back)
            unsent = max(unsent, first + count)
            failing = fails
            if await send(first, count):
                acked.update(range(first, first + count))
            else:
                unacked.append((first, count))
        failing = False
        for first, count in unacked:  # the sender retries what was not acked
            assert await send(first, count)
            acked.update(range(first, first + count))
        assert acked <= set(output), f"acked but never written: {sorted(acked - set(output))}"
        if not any(fails for _, _, fails in sends):  # a failed write may make duplicates, never a loss
            assert sorted(output) == sorted(set(output)), "a record was written twice"

    asyncio.run(scenario())


steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 12), st.integers(1, 8)),  # back from the first unsent, count
        st.tuples(st.just("flush"), st.booleans(), st.just(0)),  # the writer writes what is queued: fails or not
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(script=steps)
def test_pipelined_writes_and_failed_batches(script: list[tuple[str, object, int]]) -> None:
    """Requests queue behind writes in flight (several connections, a sender's window) and the writer writes them in
    batches that fail or succeed as a whole, as output.py does: nothing acked is lost; without a failed batch,
    nothing is written twice."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        marks = SourceMarks(None, max_sources=4, forget_after=1e9)
        output: list[int] = []
        queue: list[tuple[Request, Mark, asyncio.Future[None]]] = []
        failures = 0

        def write(request: Request, mark: Mark | None) -> asyncio.Future[None]:
            assert mark is not None
            future: asyncio.Future[None] = loop.create_future()
            queue.append((request, mark, future))
            return future

        async def flush(fail: bool) -> None:
            nonlocal failures
            batch = queue[:]
            del queue[:]
            if not batch:
                return
            if fail:
                failures += 1
                marks.failed([mark for _, mark, _ in batch])
                for _, _, future in batch:
                    future.set_exception(OSError("disk full"))
            else:
                for request, _, _ in batch:
                    output.extend(entry.record["n"] for entry in request.entries)
                marks.committed([mark for _, mark, _ in batch])
                for _, _, future in batch:
                    future.set_result(None)
            await asyncio.sleep(0)  # the done callbacks run, as they would before the writer's next batch

        sent: list[tuple[int, int, asyncio.Future[None]]] = []
        unsent = 0
        for step in script:
            if step[0] == "flush":
                await flush(bool(step[1]))
                continue
            _, back, count = step
            first = max(0, unsent - int(back))  # type: ignore[call-overload]
            unsent = max(unsent, first + count)
            request, ranges = _request(first, count)
            future, _ = marks.submit(request, ranges, write)
            sent.append((first, count, future))
        await flush(False)
        acked: set[int] = set()
        for first, count, future in sent:
            await asyncio.wait([future])
            if future.exception() is None:
                acked.update(range(first, first + count))
            else:  # the sender re-sends what was not acked (one at a time, the writer succeeding)
                request, ranges = _request(first, count)
                retry, _ = marks.submit(request, ranges, write)
                await flush(False)
                await retry
                acked.update(range(first, first + count))
        assert acked <= set(output), f"acked but never written: {sorted(acked - set(output))}"
        if not failures:
            assert sorted(output) == sorted(set(output)), "a record was written twice"

    asyncio.run(scenario())
