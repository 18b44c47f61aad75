"""One object followed by list + watch (see the package's doc)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pyforward.discovery.pacing import Backoff, RateLimitedLog

# Server-side watch timeout, spread so that many replicas do not reconnect in step (client-go does the same:
# a random value between 5 and 10 minutes).
WATCH_TIMEOUT_RANGE = (300, 600)
# Client-side read timeout beyond the server-side timeout: detects a dead connection (no RST ever comes).
WATCH_READ_SLACK = 60.0
# Timeout for one list request (connect timeout is settings.connect_timeout).
LIST_READ_TIMEOUT = 30.0
# A watch that ends sooner than this without delivering anything counts as a failure (backoff), so that a
# server that closes every stream at once is not hammered.
MIN_HEALTHY_WATCH = 1.0


@dataclass
class Watched:
    """One object followed by list + watch."""

    kind: str  # "Service" or "Secret"
    name: str
    apply: Callable[[dict[str, Any] | None], Awaitable[None]]
    errors: RateLimitedLog
    backoff: Backoff
    resource_version: str | None = None
    missing_logged: bool = False

    @property
    def method(self) -> str:
        return f"list_namespaced_{self.kind.lower()}"
