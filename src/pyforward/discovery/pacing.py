"""Error pacing of discovery: repeated API errors logged at a sane rate, retries with capped backoff (see the
package's doc: API trouble never changes what we ship to, it is logged and retried)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

#: Logs a warning once per key (Discovery._warn_once): an object that stays wrong is not reported at every event.
WarnOnce = Callable[[str, str], None]

log = logging.getLogger("pyforward.discovery")  # one logger for the package, as before the split

# Repeated errors of one kind are logged at most this often (the first one always), with a count.
ERROR_LOG_INTERVAL = 60.0


class RateLimitedLog:
    """First error at once, then at most one line per ERROR_LOG_INTERVAL with a count; one line on recovery."""

    def __init__(self, what: str, consequence: str) -> None:
        self.what = what
        self.consequence = consequence
        self.count = 0
        self.unreported = 0
        self.last_logged = 0.0
        self.first = 0.0

    def error(self, message: str) -> None:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.first = now
            self.last_logged = now
            say(logging.WARNING, f"{self.what}: {message}; {self.consequence}")
            return
        self.unreported += 1
        if now - self.last_logged >= ERROR_LOG_INTERVAL:
            say(
                logging.WARNING,
                f"{self.what}: {message}; {self.unreported} error(s) in the last {now - self.last_logged:.0f}s "
                f"({self.count} since {now - self.first:.0f}s ago); {self.consequence}",
            )
            self.last_logged = now
            self.unreported = 0

    def recovered(self) -> None:
        if self.count:
            elapsed = time.monotonic() - self.first
            say(logging.INFO, f"{self.what}: working again after {self.count} error(s) in {elapsed:.0f}s")
        self.count = 0
        self.unreported = 0


class Backoff:
    """Capped exponential backoff with jitter (half the delay fixed, half random)."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * float(2**self.attempt))
        self.attempt = min(self.attempt + 1, 62)
        return delay / 2 + random.uniform(0, delay / 2)

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self.attempt = 0


def say(level: int, text: str) -> None:
    # The text is the message template on purpose: pyforward's log handler holds back repeats of a template
    # (logs.RateLimitFilter), and two different destinations or Secrets must never count as repeats.
    log.log(level, text)
