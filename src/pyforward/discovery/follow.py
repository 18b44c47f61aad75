"""Discovery: follows the receiver Service and the client-certificate Secret (see the package's doc)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pyforward.discovery.errors import Reconnect, describe
from pyforward.discovery.kubeconfig import (
    config_fingerprint,
    config_paths,
    describe_config_error,
    make_client,
    wait_config_change,
    watch_config,
)
from pyforward.discovery.pacing import Backoff, RateLimitedLog, say
from pyforward.discovery.secret import decode_secret, write_files
from pyforward.discovery.service import Target, service_target
from pyforward.discovery.watch import (
    Watched,
)
from pyforward.settings import Settings

log = logging.getLogger("pyforward.discovery")  # one logger for the package, as before the split


class Discovery:
    """Follows the receiver Service and the client-certificate Secret; reports changes through callbacks.

    ``on_target(Target)`` when the destination is first known or changes; ``on_target(None)`` when the
    Service is deleted. ``on_secret()`` after new Secret material was written to ``settings.tls_dir``.
    Callbacks run in the event loop and must not block.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        on_target: Callable[[Target | None], None],
        on_secret: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_target = on_target
        self._on_secret = on_secret
        self._target: Target | None = None
        self._secret_ready = False
        self._ready = asyncio.Event()
        self._warned: set[str] = set()
        self._config_errors = RateLimitedLog(
            "Kubernetes configuration", "keeping the last destination and certificates, retrying"
        )
        self._service = self._watched("Service", settings.service_name, self._apply_service, "destination")
        self._secret = (
            self._watched("Secret", settings.secret_name, self._apply_secret, "certificates")
            if settings.secret_name
            else None
        )

    def _watched(
        self, kind: str, name: str, apply: Callable[[dict[str, Any] | None], Awaitable[None]], kept: str
    ) -> Watched:
        settings = self.settings
        return Watched(
            kind=kind,
            name=name,
            namespace=settings.namespace,
            connect_timeout=settings.connect_timeout,
            apply=apply,
            backoff=Backoff(settings.backoff_initial, settings.backoff_max),
            errors=RateLimitedLog(f"watching {kind} {settings.namespace}/{name}", f"keeping the last {kept}, retrying"),
        )

    # --- public API ----------------------------------------------------------------------------------------
    @property
    def target(self) -> Target | None:
        return self._target

    @property
    def secret_ready(self) -> bool:
        """The CA, certificate and key from the Secret are in their files (written or already identical)."""
        return self._secret_ready

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the target is known and (when a Secret is configured) its files are written."""
        if self._ready.is_set():
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Follow the Service and the Secret until cancelled. API and configuration trouble never escapes."""
        # kubernetes_asyncio takes a second or two to import (every API group is generated code): do it in a
        # thread so that the event loop, which the pipeline shares, keeps tailing and serving meanwhile.
        await asyncio.to_thread(importlib.import_module, "kubernetes_asyncio.client")
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        while True:
            paths = config_paths(self.settings.kubeconfig)
            fingerprint = config_fingerprint(paths)
            try:
                api = await make_client(self.settings.kubeconfig)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._config_errors.error(describe_config_error(exc))
                await wait_config_change(paths, fingerprint, backoff.next_delay())
                continue
            self._config_errors.recovered()
            backoff.reset()
            try:
                await self._follow_all(api, paths, fingerprint)
            except* Reconnect as group:
                say(logging.INFO, f"{group.exceptions[0]}: reconnecting with the configuration loaded again")
            except* Exception as group:
                # A bug, not API trouble (that is handled per watch): say so loudly, start over after a pause.
                log.error("discovery failed: %s; starting over", describe(group.exceptions[0]), exc_info=group)
                await backoff.sleep()
            finally:
                with contextlib.suppress(Exception):
                    await api.close()

    async def _follow_all(self, api: Any, paths: list[str], fingerprint: object) -> None:
        from kubernetes_asyncio import client

        core = client.CoreV1Api(api)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._service.follow(core), name="discovery-service")
            if self._secret is not None:
                group.create_task(self._secret.follow(core), name="discovery-secret")
            group.create_task(watch_config(paths, fingerprint), name="discovery-config")

    # --- the Service ---------------------------------------------------------------------------------------
    async def _apply_service(self, obj: dict[str, Any] | None) -> None:
        where = f"Service {self.settings.namespace}/{self.settings.service_name}"
        if obj is None:
            if self._target is not None:
                say(logging.WARNING, f"{where} was deleted: shipping paused (the backlog stays in the log file)")
            elif not self._service.missing_logged:
                say(logging.WARNING, f"waiting for {where} (the receiver to ship to)")
            self._service.missing_logged = True
            self._set_target(None)
            return
        self._set_target(service_target(where, obj, self.settings.service_port_name, self._warn_once))

    def _set_target(self, target: Target | None) -> None:
        if target == self._target:
            return
        previous = self._target
        self._target = target
        if target is not None:
            was = f" (was {previous})" if previous else ""
            say(
                logging.INFO,
                f"destination: Service {self.settings.namespace}/{self.settings.service_name} at {target}{was}",
            )
        self._update_ready()
        try:
            self._on_target(target)
        except Exception:
            log.exception("on_target callback failed for %s", target)

    # --- the Secret ----------------------------------------------------------------------------------------
    async def _apply_secret(self, obj: dict[str, Any] | None) -> None:
        assert self._secret is not None
        where = f"Secret {self.settings.namespace}/{self.settings.secret_name}"
        if obj is None:
            if not self._secret.missing_logged:
                if self._secret_ready:
                    say(logging.WARNING, f"{where} is gone: keeping the certificates in {self.settings.tls_dir}")
                else:
                    say(logging.WARNING, f"waiting for {where} (TLS requires it)")
            self._secret.missing_logged = True
            return
        # Written in this order: CA first (a new server certificate may need it), then key and certificate.
        keys = (self.settings.secret_ca_key, self.settings.secret_key_key, self.settings.secret_cert_key)
        decoded = decode_secret(where, obj.get("data") or {}, keys, self._warn_once)
        if decoded is None:
            return
        changed = await write_files(self.settings.tls_dir, decoded)
        if changed:
            say(logging.INFO, f"wrote {', '.join(changed)} from {where} into {self.settings.tls_dir}")
        first = not self._secret_ready
        self._secret_ready = True
        self._update_ready()
        if first and not changed:
            say(logging.INFO, f"the files in {self.settings.tls_dir} already hold {where}")
        if changed and self._on_secret is not None:
            try:
                self._on_secret()
            except Exception:
                log.exception("on_secret callback failed")

    # --- helpers -------------------------------------------------------------------------------------------
    def _update_ready(self) -> None:
        ready = self._target is not None and (self._secret is None or self._secret_ready)
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            say(logging.WARNING, message)
