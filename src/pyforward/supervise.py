"""The long-running tasks of `pyforward run`, supervised: none of them dies silently (issue 12).

An asyncio task that raises keeps its exception to itself until someone awaits it; a background task nobody awaits
just stops (discovery failing to import kubernetes_asyncio: "shipping ..." and then nothing, for ever). Here every
task is started through a Supervisor, and an unexpected exception is logged at ERROR with its traceback, then,
depending on the task (the table is in docs/architecture.md):

* RESTART: run it again after a capped exponential backoff, counted in ``pyforward_task_restarts_total{task}``.
  For tasks that rebuild their state when they start (discovery lists and watches again). The metrics HTTP server
  thread does the same for itself (metrics.py).
* EXIT: `pyforward run` stops with exit code 1 and the kubelet restarts the container. For tasks whose state may be
  inconsistent after a bug (the read loop, the chunk sender, the client, the checkpoint writer): a restart resumes
  at the checkpoint and sends at most ``max_inflight_bytes`` again, which is cheap and certainly correct.

Expected trouble (a refused connection, an API error, a failed write) is handled inside each task; what reaches the
supervisor is a bug or a broken environment.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["Failure", "Policy", "Supervisor"]

log = logging.getLogger("pyforward.run")


class Policy(enum.Enum):
    RESTART = "restart"
    EXIT = "exit"


@dataclass(frozen=True)
class Failure:
    task: str
    error: BaseException


class Supervisor:
    """Starts tasks, logs and handles their unexpected exceptions. Use from one event loop."""

    def __init__(
        self,
        *,
        on_restart: Callable[[str], None] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        healthy_after: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,  # injectable for tests
    ) -> None:
        self._sleep = sleep
        self._on_restart = on_restart
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after  # a run this long resets the backoff
        self.restarts: dict[str, int] = {}
        self._failed: asyncio.Future[Failure] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def failed(self) -> asyncio.Future[Failure]:
        """Done (with the first Failure) once a task with Policy.EXIT failed: `run` must end, non-zero."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        return self._failed

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], policy: Policy) -> asyncio.Task[None]:
        """Run `factory()` as a task named `name` under `policy`."""
        task = asyncio.get_running_loop().create_task(self.run(name, factory, policy), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, name: str, factory: Callable[[], Awaitable[None]], policy: Policy) -> None:
        """Await `factory()`; on an unexpected exception, log it and restart (with backoff) or fail."""
        loop = asyncio.get_running_loop()
        delay = self.backoff_initial
        while True:
            began = loop.time()
            try:
                await factory()
                return
            except Exception as exc:  # CancelledError is a BaseException: cancellation goes through
                if policy is Policy.EXIT:
                    self.fail(name, exc)
                    return
                if loop.time() - began >= self.healthy_after:
                    delay = self.backoff_initial
                log.error(
                    "task %s failed: %s; restarting it in %.1fs",
                    name,
                    _describe(exc),
                    delay,
                    exc_info=exc,
                    extra={"rate_key": f"task {name} failed", "task": name},
                )
                self.restarts[name] = self.restarts.get(name, 0) + 1
                if self._on_restart is not None:
                    self._on_restart(name)
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    def watch(self, name: str, task: asyncio.Task[None]) -> None:
        """A task started elsewhere (the client's, the checkpoint writer's) that must not fail: Policy.EXIT."""
        task.add_done_callback(lambda done: self._done(name, done))

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # (retrieving it also keeps asyncio from complaining it was never retrieved)
        if exc is not None:
            self.fail(name, exc)

    def fail(self, name: str, exc: BaseException) -> None:
        """Log that `name` failed and end `run` (the first failure wins)."""
        log.error(
            "task %s failed: %s; pyforward stops with exit code 1 so that the container is restarted (it resumes "
            "at the checkpoint)",
            name,
            _describe(exc),
            exc_info=exc,
            extra={"rate_key": f"task {name} failed", "task": name},
        )
        if not self.failed.done():
            self.failed.set_result(Failure(name, exc))

    async def close(self) -> None:
        """Cancel every task spawned and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
