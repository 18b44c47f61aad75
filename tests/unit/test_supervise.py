"""Supervisor (issue 12): a task's unexpected exception is logged at ERROR with its traceback, then the task is
restarted with a capped backoff, or `run` is told to end."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pyforward.supervise import Failure, Policy, Supervisor


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR]


async def test_restart_policy_logs_with_traceback_counts_and_restarts(caplog: pytest.LogCaptureFixture) -> None:
    restarted: list[str] = []
    supervisor = Supervisor(on_restart=restarted.append, backoff_initial=0.001, backoff_max=0.002)
    runs = 0
    third = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ValueError(f"bug number {runs}")
        third.set()
        await asyncio.Event().wait()  # then runs for ever

    with caplog.at_level(logging.ERROR, "pyforward.run"):
        task = supervisor.spawn("discovery", flaky, Policy.RESTART)
        await asyncio.wait_for(third.wait(), 10)
        await supervisor.close()
    assert task.cancelled()
    assert restarted == ["discovery", "discovery"]
    assert supervisor.restarts == {"discovery": 2}
    records = failures(caplog)
    assert [r.getMessage().split(";")[0] for r in records] == [
        "task discovery failed: ValueError: bug number 1",
        "task discovery failed: ValueError: bug number 2",
    ]
    assert all(r.exc_info is not None and r.exc_info[0] is ValueError for r in records)
    assert not supervisor.failed.done()


async def test_backoff_doubles_up_to_its_cap_and_a_healthy_run_resets_it() -> None:
    waited: list[float] = []

    async def sleep(delay: float) -> None:
        waited.append(delay)

    supervisor = Supervisor(backoff_initial=1.0, backoff_max=4.0, healthy_after=3600.0, sleep=sleep)
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        if runs == 6:
            return  # ends on its own: not restarted
        if runs == 5:
            supervisor.healthy_after = 0.0  # as if this run had lasted long: the backoff starts over
        raise RuntimeError("still broken")

    await asyncio.wait_for(supervisor.spawn("observe", broken, Policy.RESTART), 10)
    assert waited == [1.0, 2.0, 4.0, 4.0, 1.0]
    assert supervisor.restarts == {"observe": 5}


async def test_exit_policy_fails_run_with_the_first_failure(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor()

    async def sender() -> None:
        raise KeyError("chunk")

    with caplog.at_level(logging.ERROR, "pyforward.run"):
        supervisor.spawn("sender", sender, Policy.EXIT)
        failure = await asyncio.wait_for(supervisor.failed, 10)
    assert isinstance(failure, Failure)
    assert failure.task == "sender"
    assert isinstance(failure.error, KeyError)
    [record] = failures(caplog)
    assert record.getMessage().startswith("task sender failed: KeyError: 'chunk'; pyforward stops with exit code 1")
    assert record.exc_info is not None
    assert supervisor.restarts == {}


async def test_watched_task_failing_ends_run_and_a_cancelled_one_does_not(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor()
    gate = asyncio.Event()

    async def client() -> None:
        await gate.wait()
        raise RuntimeError("connection loop bug")

    async def idle() -> None:
        await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    cancelled = loop.create_task(idle())
    supervisor.watch("checkpoint", cancelled)
    failing = loop.create_task(client())
    supervisor.watch("client", failing)
    with caplog.at_level(logging.ERROR, "pyforward.run"):
        cancelled.cancel()  # its done callback runs first: were a cancellation a failure, it would be the failure
        gate.set()
        failure = await asyncio.wait_for(supervisor.failed, 10)
    assert failure.task == "client"
    [record] = failures(caplog)
    assert "connection loop bug" in record.getMessage()


async def test_cancellation_is_not_a_failure() -> None:
    supervisor = Supervisor()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = supervisor.spawn("tailer", forever, Policy.EXIT)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not supervisor.failed.done()
