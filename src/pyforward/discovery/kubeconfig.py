"""The Kubernetes configuration and the API client discovery connects with: which files the configuration comes
from and their fingerprint (a changed kubeconfig rebuilds the client: watch_config), the client made from them, and
one line for a configuration that cannot be loaded."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from pyforward.discovery.errors import Reconnect, describe

# How often the kubeconfig file is stat()ed for changes (cheap: one stat per path).
CONFIG_POLL_INTERVAL = 1.0
# Where the in-cluster config keeps its CA; watched for changes like a kubeconfig.
INCLUSTER_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


class NoConfig(Exception):
    """No usable configuration: no kubeconfig file, and not in a pod."""


class ConfigError(Exception):
    """The kubeconfig could not be loaded."""

    def __init__(self, path: str, cause: Exception) -> None:
        super().__init__(path)
        self.path = path
        self.cause = cause


def describe_config_error(exc: BaseException) -> str:
    if isinstance(exc, NoConfig):
        return str(exc)
    if isinstance(exc, ConfigError):
        return f"cannot load the kubeconfig {exc.path}: {describe_config_cause(exc.cause)}"
    return f"cannot load the in-cluster configuration: {describe_config_cause(exc)}"


def describe_config_cause(exc: BaseException) -> str:
    if type(exc).__module__.startswith("yaml"):
        # str() of a YAML error quotes the file around the problem: that can be a token or a key.
        mark = getattr(exc, "problem_mark", None)
        line, column = getattr(mark, "line", None), getattr(mark, "column", None)
        where = f" at line {line + 1}, column {column + 1}" if isinstance(line, int) and isinstance(column, int) else ""
        return f"invalid YAML{where}: {getattr(exc, 'problem', None) or type(exc).__name__}"
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or 'a file'} does not exist"
    return describe(exc)


def config_fingerprint(paths: list[str]) -> tuple[tuple[str, int, int, int, int] | tuple[str], ...]:
    out: list[tuple[str, int, int, int, int] | tuple[str]] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks: a Secret/ConfigMap mount swaps ..data atomically
        except OSError:
            out.append((path,))
        else:
            out.append((path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def show_paths(paths: list[str]) -> str:
    return ", ".join(paths) if paths else "(in-cluster)"


def config_paths(kubeconfig: Path | None) -> list[str]:
    """The files the configuration comes from, watched for changes: the kubeconfig(s), or the in-cluster CA."""
    if kubeconfig is not None:
        return [str(kubeconfig)]
    env = os.environ.get("KUBECONFIG", "")
    if env.strip():
        return [p for p in env.split(os.pathsep) if p]
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return [INCLUSTER_CA_FILE]
    return []


async def make_client(kubeconfig: Path | None) -> Any:
    """A kubernetes_asyncio ApiClient from the kubeconfig (setting, then KUBECONFIG) or the in-cluster config."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    if kubeconfig is not None or os.environ.get("KUBECONFIG", "").strip():
        path = str(kubeconfig) if kubeconfig else os.environ["KUBECONFIG"]
        if not any(os.path.isfile(p) for p in path.split(os.pathsep) if p):
            # Checked here: kubernetes_asyncio would only warn and then fail with "no configuration found".
            raise NoConfig(f"cannot load the kubeconfig: {path} does not exist")
        try:
            await config.load_kube_config(config_file=path, client_configuration=configuration, persist_config=False)
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


async def wait_config_change(paths: list[str], fingerprint: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(min(CONFIG_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
        if config_fingerprint(paths) != fingerprint:
            return


async def watch_config(paths: list[str], fingerprint: object) -> None:
    if not paths:
        return
    while True:
        await asyncio.sleep(CONFIG_POLL_INTERVAL)
        if config_fingerprint(paths) != fingerprint:
            raise Reconnect(f"Kubernetes configuration {show_paths(paths)} changed")
