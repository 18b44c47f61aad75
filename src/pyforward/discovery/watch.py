"""One object followed by list + watch (see the package's doc): list by name, watch from the list's
resourceVersion, resume a watch that ended, list again on 410 Gone; API trouble is logged at a sane rate and retried
with backoff, never raised (a 401 raises Reconnect: fresh credentials need the configuration loaded again)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pyforward.discovery.errors import APIStatus, Gone, Reconnect, describe, status_error, status_of, status_reason
from pyforward.discovery.pacing import Backoff, RateLimitedLog, say

log = logging.getLogger("pyforward.discovery")

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
    """One object followed by list + watch: ``apply`` gets it each time it changes, None when it is gone."""

    kind: str  # "Service" or "Secret"
    name: str
    namespace: str
    connect_timeout: float
    apply: Callable[[dict[str, Any] | None], Awaitable[None]]
    errors: RateLimitedLog
    backoff: Backoff
    resource_version: str | None = None
    missing_logged: bool = False

    @property
    def method(self) -> str:
        return f"list_namespaced_{self.kind.lower()}"

    async def follow(self, core: Any) -> None:
        """List, then watch from the list's resourceVersion; forever. Ends only when cancelled, or with
        Reconnect when the credentials are refused."""
        backoff = self.backoff  # kept across reconnects: refused credentials must not make a fast loop
        self.resource_version = None  # a new client (maybe another cluster): start with a list
        while True:
            try:
                if self.resource_version is None:
                    found = await self._list(core)
                    self.errors.recovered()
                    if not found:
                        # A 404 on the list leaves nothing to watch from: look again after a while.
                        await backoff.sleep()
                        continue
                started = time.monotonic()
                delivered = await self._watch(core)
                self.errors.recovered()
                # The stream ended (server-side timeout): resume from the last resourceVersion, no list.
                if not delivered and time.monotonic() - started < MIN_HEALTHY_WATCH:
                    await backoff.sleep()
                else:
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.resource_version = None  # converge by listing again
                status = status_of(exc)
                if isinstance(exc, Gone) or status == 410:
                    # The resourceVersion is older than the server's watch cache: list again, at once the first
                    # time, with backoff if it keeps happening.
                    where = f"{self.kind} {self.namespace}/{self.name}"
                    say(logging.INFO, f"{where}: resourceVersion expired (410 Gone); listing again")
                    if backoff.attempt:
                        await backoff.sleep()
                    else:
                        backoff.attempt = 1
                    continue
                # Unreachable, 5xx, 401/403, a broken stream, a file we could not write: keep what we have.
                self.errors.error(describe(exc))
                await backoff.sleep()
                if status == 401:
                    raise Reconnect("the API server refused the credentials (401)") from None

    async def _list(self, core: Any) -> bool:
        """List the object by name and apply what was found. False on 404 (nothing to watch from)."""
        method = getattr(core, self.method)
        response = await method(
            self.namespace,
            field_selector=f"metadata.name={self.name}",
            _preload_content=False,
            _request_timeout=(self.connect_timeout, LIST_READ_TIMEOUT),
        )
        try:
            if response.status == 404:
                await self._apply(None)
                return False
            if response.status == 410:
                raise Gone()
            if response.status != 200:
                raise await status_error(response)
            body = json.loads(await response.read())
        finally:
            response.release()
        if not isinstance(body, dict):
            raise ValueError("list answer is not a JSON object")
        found = None
        for item in body.get("items") or []:
            # The field selector should make this the only item; check anyway (some servers ignore it).
            if isinstance(item, dict) and (item.get("metadata") or {}).get("name") == self.name:
                found = item
        await self._apply(found)
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        return True

    async def _watch(self, core: Any) -> bool:
        """One watch request from self.resource_version. Returns whether any event arrived."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        kwargs: dict[str, Any] = {}
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        method = getattr(core, self.method)
        response = await method(
            self.namespace,
            field_selector=f"metadata.name={self.name}",
            # The literal "true", as client-go sends it (kubernetes_asyncio would send a Python bool as "True").
            watch="true",
            allow_watch_bookmarks="true",
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(self.connect_timeout, timeout + WATCH_READ_SLACK),
            **kwargs,
        )
        delivered = False
        try:
            if response.status == 410:
                raise Gone()
            if response.status != 200:
                raise await status_error(response)
            while True:
                line = await response.content.readline()
                if not line:
                    return delivered
                if not line.strip():
                    continue
                delivered = True
                await self._event(line)
        finally:
            response.close()

    async def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            # Never quote the line: it could be a Secret.
            raise ValueError(f"unparsable watch event ({len(line)} bytes)") from None
        if not isinstance(event, dict):
            raise ValueError("watch event is not a JSON object")
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch event {kind!r} without an object")
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone()
            raise APIStatus(int(code) if isinstance(code, int) else 500, status_reason(obj))
        meta = obj.get("metadata") or {}
        version = meta.get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("ignoring watch event of type %r", kind)
            return
        if meta.get("name") != self.name:
            return  # the field selector should have filtered it; some servers do not
        await self._apply(None if kind == "DELETED" else obj)
        if version:
            self.resource_version = str(version)

    async def _apply(self, obj: dict[str, Any] | None) -> None:
        if obj is not None:
            self.missing_logged = False
        await self.apply(obj)
