"""chunks.ByteBudget: the bound on source bytes in flight, and its on_wait hook (the ack hold ends there)."""

from __future__ import annotations

import asyncio

from pyforward.chunks import ByteBudget


async def test_on_wait_is_called_only_when_a_chunk_must_wait_for_room() -> None:
    waits: list[int] = []
    budget = ByteBudget(100, on_wait=lambda: waits.append(budget.used))
    await budget.acquire(60)
    await budget.acquire(40)  # fits exactly
    assert waits == []
    blocked = asyncio.ensure_future(budget.acquire(10))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert waits == [100]  # told before it waits
    budget.release(60)
    await asyncio.wait_for(blocked, 5)
    assert budget.used == 50


async def test_one_chunk_always_fits_when_nothing_is_in_flight() -> None:
    waits: list[int] = []
    budget = ByteBudget(100, on_wait=lambda: waits.append(budget.used))
    await budget.acquire(500)
    assert (budget.used, waits) == (500, [])
