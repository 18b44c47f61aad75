"""Discovery: follows the receiver Service and the client-certificate Secret (see the package's doc)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from pyforward.discovery.errors import APIStatus, Gone, Reconnect, describe, status_error, status_of, status_reason
from pyforward.discovery.kubeconfig import (
    CONFIG_POLL_INTERVAL,
    INCLUSTER_CA_FILE,
    ConfigError,
    NoConfig,
    config_fingerprint,
    describe_config_error,
    show_paths,
)
from pyforward.discovery.pacing import Backoff, RateLimitedLog, say
from pyforward.discovery.secret import write_files
from pyforward.discovery.service import Target, port_names
from pyforward.discovery.watch import (
    LIST_READ_TIMEOUT,
    MIN_HEALTHY_WATCH,
    WATCH_READ_SLACK,
    WATCH_TIMEOUT_RANGE,
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
        ns = settings.namespace
        self._service = Watched(
            kind="Service",
            name=settings.service_name,
            apply=self._apply_service,
            backoff=Backoff(settings.backoff_initial, settings.backoff_max),
            errors=RateLimitedLog(
                f"watching Service {ns}/{settings.service_name}", "keeping the last destination, retrying"
            ),
        )
        self._secret: Watched | None = None
        if settings.secret_name:
            self._secret = Watched(
                kind="Secret",
                name=settings.secret_name,
                apply=self._apply_secret,
                backoff=Backoff(settings.backoff_initial, settings.backoff_max),
                errors=RateLimitedLog(
                    f"watching Secret {ns}/{settings.secret_name}", "keeping the last certificates, retrying"
                ),
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
            paths = self._config_paths()
            fingerprint = config_fingerprint(paths)
            try:
                api = await self._make_client()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._config_errors.error(describe_config_error(exc))
                await self._wait_config_change(paths, fingerprint, backoff.next_delay())
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

    # --- configuration -------------------------------------------------------------------------------------
    def _config_paths(self) -> list[str]:
        if self.settings.kubeconfig is not None:
            return [str(self.settings.kubeconfig)]
        env = os.environ.get("KUBECONFIG", "")
        if env.strip():
            return [p for p in env.split(os.pathsep) if p]
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return [INCLUSTER_CA_FILE]
        return []

    async def _make_client(self) -> Any:
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        if self.settings.kubeconfig is not None or os.environ.get("KUBECONFIG", "").strip():
            path = str(self.settings.kubeconfig) if self.settings.kubeconfig else os.environ["KUBECONFIG"]
            if not any(os.path.isfile(p) for p in path.split(os.pathsep) if p):
                # Checked here: kubernetes_asyncio would only warn and then fail with "no configuration found".
                raise NoConfig(f"cannot load the kubeconfig: {path} does not exist")
            try:
                await config.load_kube_config(
                    config_file=path, client_configuration=configuration, persist_config=False
                )
            except Exception as exc:
                raise ConfigError(path, exc) from exc
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            raise NoConfig(
                "no Kubernetes configuration: PYFORWARD_KUBECONFIG is unset and this is not a pod "
                "(KUBERNETES_SERVICE_HOST is unset); set PYFORWARD_HOST to ship without discovery"
            )
        return client.ApiClient(configuration=configuration)

    async def _wait_config_change(self, paths: list[str], fingerprint: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(min(CONFIG_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
            if config_fingerprint(paths) != fingerprint:
                return

    async def _watch_config(self, paths: list[str], fingerprint: object) -> None:
        if not paths:
            return
        while True:
            await asyncio.sleep(CONFIG_POLL_INTERVAL)
            if config_fingerprint(paths) != fingerprint:
                raise Reconnect(f"Kubernetes configuration {show_paths(paths)} changed")

    async def _follow_all(self, api: Any, paths: list[str], fingerprint: object) -> None:
        from kubernetes_asyncio import client

        core = client.CoreV1Api(api)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow(core, self._service), name="discovery-service")
            if self._secret is not None:
                group.create_task(self._follow(core, self._secret), name="discovery-secret")
            group.create_task(self._watch_config(paths, fingerprint), name="discovery-config")

    # --- list + watch --------------------------------------------------------------------------------------
    async def _follow(self, core: Any, watched: Watched) -> None:
        """List, then watch from the list's resourceVersion; forever. Ends only when cancelled, or with
        Reconnect when the credentials are refused."""
        backoff = watched.backoff  # kept across reconnects: refused credentials must not make a fast loop
        watched.resource_version = None  # a new client (maybe another cluster): start with a list
        while True:
            try:
                if watched.resource_version is None:
                    found = await self._list(core, watched)
                    watched.errors.recovered()
                    if not found:
                        # A 404 on the list leaves nothing to watch from: look again after a while.
                        await backoff.sleep()
                        continue
                started = time.monotonic()
                delivered = await self._watch(core, watched)
                watched.errors.recovered()
                # The stream ended (server-side timeout): resume from the last resourceVersion, no list.
                if not delivered and time.monotonic() - started < MIN_HEALTHY_WATCH:
                    await backoff.sleep()
                else:
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                watched.resource_version = None  # converge by listing again
                status = status_of(exc)
                if isinstance(exc, Gone) or status == 410:
                    # The resourceVersion is older than the server's watch cache: list again, at once the first
                    # time, with backoff if it keeps happening.
                    where = f"{watched.kind} {self.settings.namespace}/{watched.name}"
                    say(logging.INFO, f"{where}: resourceVersion expired (410 Gone); listing again")
                    if backoff.attempt:
                        await backoff.sleep()
                    else:
                        backoff.attempt = 1
                    continue
                # Unreachable, 5xx, 401/403, a broken stream, a file we could not write: keep what we have.
                watched.errors.error(describe(exc))
                await backoff.sleep()
                if status == 401:
                    raise Reconnect("the API server refused the credentials (401)") from None

    async def _list(self, core: Any, watched: Watched) -> bool:
        """List the object by name and apply what was found. False on 404 (nothing to watch from)."""
        method = getattr(core, watched.method)
        response = await method(
            self.settings.namespace,
            field_selector=f"metadata.name={watched.name}",
            _preload_content=False,
            _request_timeout=(self.settings.connect_timeout, LIST_READ_TIMEOUT),
        )
        try:
            if response.status == 404:
                await self._apply(watched, None)
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
            if isinstance(item, dict) and (item.get("metadata") or {}).get("name") == watched.name:
                found = item
        await self._apply(watched, found)
        watched.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        return True

    async def _watch(self, core: Any, watched: Watched) -> bool:
        """One watch request from watched.resource_version. Returns whether any event arrived."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        kwargs: dict[str, Any] = {}
        if watched.resource_version:
            kwargs["resource_version"] = watched.resource_version
        method = getattr(core, watched.method)
        response = await method(
            self.settings.namespace,
            field_selector=f"metadata.name={watched.name}",
            # The literal "true", as client-go sends it (kubernetes_asyncio would send a Python bool as "True").
            watch="true",
            allow_watch_bookmarks="true",
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(self.settings.connect_timeout, timeout + WATCH_READ_SLACK),
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
                await self._event(watched, line)
        finally:
            response.close()

    async def _event(self, watched: Watched, line: bytes) -> None:
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
                watched.resource_version = str(version)
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("ignoring watch event of type %r", kind)
            return
        if meta.get("name") != watched.name:
            return  # the field selector should have filtered it; some servers do not
        await self._apply(watched, None if kind == "DELETED" else obj)
        if version:
            watched.resource_version = str(version)

    async def _apply(self, watched: Watched, obj: dict[str, Any] | None) -> None:
        if obj is not None:
            watched.missing_logged = False
        await watched.apply(obj)

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
        spec = obj.get("spec") or {}
        cluster_ip = spec.get("clusterIP")
        if not isinstance(cluster_ip, str) or not cluster_ip or cluster_ip == "None":
            self._warn_once(
                f"noip:{cluster_ip}",
                f"{where} has no ClusterIP (type {spec.get('type') or 'ClusterIP'}, clusterIP {cluster_ip!r}): "
                "cannot ship to it; waiting for a change",
            )
            self._set_target(None)
            return
        port = self._pick_port(where, spec.get("ports") or [])
        if port is None:
            self._set_target(None)
            return
        self._set_target(Target(cluster_ip, port))

    def _pick_port(self, where: str, ports: list[Any]) -> int | None:
        ports = [p for p in ports if isinstance(p, dict) and isinstance(p.get("port"), int)]
        if not ports:
            self._warn_once("noports", f"{where} has no ports: cannot ship to it; waiting for a change")
            return None
        wanted = self.settings.service_port_name
        chosen: dict[str, Any] | None = None
        if wanted:
            chosen = next((p for p in ports if p.get("name") == wanted), None)
            if chosen is None:
                chosen = ports[0]
                self._warn_once(
                    f"portname:{wanted}",
                    f"{where} has no port named {wanted!r} (ports: {port_names(ports)}); "
                    f"using the first, {chosen.get('name') or 'unnamed'} ({chosen['port']})",
                )
        else:
            chosen = ports[0]
            if len(ports) > 1:
                self._warn_once(
                    "severalports",
                    f"{where} has several ports ({port_names(ports)}) and PYFORWARD_SERVICE_PORT_NAME is unset; "
                    f"using the first, {chosen.get('name') or 'unnamed'} ({chosen['port']})",
                )
        port = chosen["port"]
        assert isinstance(port, int)
        if not 1 <= port <= 65535:
            self._warn_once(f"badport:{port}", f"{where} has an invalid port {port}: cannot ship to it")
            return None
        return port

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
        data = obj.get("data") or {}
        # Written in this order: CA first (a new server certificate may need it), then key and certificate.
        keys = (self.settings.secret_ca_key, self.settings.secret_key_key, self.settings.secret_cert_key)
        missing = [k for k in keys if not (isinstance(data, dict) and data.get(k))]
        if missing:
            present = sorted(data) if isinstance(data, dict) else []
            self._warn_once(
                f"secretkeys:{','.join(missing)}:{','.join(present)}",
                f"{where} lacks key(s) {', '.join(missing)} (it has: {', '.join(present) or 'none'}); "
                "set PYFORWARD_SECRET_CA_KEY/_CERT_KEY/_KEY_KEY to its key names; keeping the current files",
            )
            return
        decoded: dict[str, bytes] = {}
        for key in keys:
            try:
                decoded[key] = base64.b64decode(data[key], validate=True)
            except (binascii.Error, ValueError, TypeError):
                # Never show the value.
                self._warn_once(f"b64:{key}", f"{where} key {key} is not valid base64; keeping the current files")
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
