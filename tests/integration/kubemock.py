"""A Kubernetes API server for tests: kmock's KubernetesEmulator behind a real HTTP server on 127.0.0.1,
with helpers to create, patch and delete the receiver Service and the client-certificate Secret, and to
write a kubeconfig pointing at it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.test_utils
import aiohttp.web_runner
import aiohttp.web_server
import kmock
import pytest

from tests.conftest import CertFiles

NS = "audit"
SERVICE = "audittailer"
SECRET = "audittailer-client"
KEYS = ("ca.crt", "tls.crt", "tls.key")
SERVICES = kmock.resource("v1/services")
SECRETS = kmock.resource("v1/secrets")
DEADLINE = 5.0


# --- helpers -------------------------------------------------------------------------------------------------
async def eventually(predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    """Poll a predicate until it holds; fail after the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def service(
    ip: str = "10.0.0.10", *ports: tuple[str | None, int], name: str = SERVICE, rv: str | None = None
) -> dict[str, Any]:
    port_list = [{"port": p, **({"name": n} if n else {})} for n, p in (ports or ((None, 24224),))]
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"clusterIP": ip, "ports": port_list}}


def secret_data(files: CertFiles) -> dict[str, str]:
    blobs = {"ca.crt": files.ca, "tls.crt": files.client_cert, "tls.key": files.client_key}
    return {key: base64.b64encode(path.read_bytes()).decode() for key, path in blobs.items()}


def secret(files: CertFiles, name: str = SECRET) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "data": secret_data(files),
    }


class QuickStopServer(aiohttp.test_utils.RawTestServer):
    """aiohttp waits up to 60 s for open handlers on shutdown; a watch stream never finishes by itself."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web_runner.ServerRunner:
        server = aiohttp.web_server.Server(self._handler, loop=self._loop, debug=debug, **kwargs)
        return aiohttp.web_runner.ServerRunner(server, debug=debug, shutdown_timeout=0.1, **kwargs)


@dataclass
class Cluster:
    """One emulated API server: kmock's KubernetesEmulator behind a real HTTP server on 127.0.0.1."""

    api: kmock.KubernetesEmulator
    server: kmock.Server | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = kmock.Server(self.api, port=self.port or None, server_cls=QuickStopServer)
        await self.server.__aenter__()
        self.port = self.server.port

    async def stop(self) -> None:
        """Stop listening and drop every connection (open watch streams end at once)."""
        if self.server is not None:
            await self.server.__aexit__(None, None, None)
            self.server = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.api.request(method, path, json=body)
        async with response:
            assert response.status < 300, f"{method} {path}: {response.status} {await response.text()}"
            return await response.json()

    async def create(self, obj: dict[str, Any]) -> None:
        plural = "services" if obj["kind"] == "Service" else "secrets"
        await self._call("POST", f"/api/v1/namespaces/{NS}/{plural}", obj)

    async def patch(self, plural: str, name: str, changes: dict[str, Any]) -> None:
        await self._call("PATCH", f"/api/v1/namespaces/{NS}/{plural}/{name}", changes)

    async def delete(self, plural: str, name: str) -> None:
        await self._call("DELETE", f"/api/v1/namespaces/{NS}/{plural}/{name}")

    def requests(self, action: kmock.action, resource: kmock.resource) -> list[kmock.Request]:
        return list(self.api[action, resource])

    def write_kubeconfig(self, path: Path, *, token_file: Path | None = None) -> None:
        """A kubeconfig for this server, replaced atomically (a new inode, as a Secret mount update does)."""
        user = {"tokenFile": str(token_file)} if token_file else {"token": "not-a-real-token"}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "shoot", "cluster": {"server": self.url}}],
            "users": [{"name": "forwarder", "user": user}],
            "contexts": [{"name": "shoot", "context": {"cluster": "shoot", "user": "forwarder"}}],
            "current-context": "shoot",
        }
        tmp = path.with_name(path.name + ".new")
        tmp.write_text(json.dumps(config))  # JSON is YAML
        os.replace(tmp, path)


@contextlib.asynccontextmanager
async def emulated_cluster(*, declare: bool = True) -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as api:
        if declare:
            # A real API server lists an empty collection; kmock answers 404 for resources it never saw.
            api.resources["v1/services"] = kmock.ResourceInfo()
            api.resources["v1/secrets"] = kmock.ResourceInfo()
        cluster = Cluster(api)
        await cluster.start()
        try:
            yield cluster
        finally:
            await cluster.stop()
