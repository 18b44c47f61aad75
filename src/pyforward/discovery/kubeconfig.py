"""The Kubernetes configuration discovery connects with: which files it comes from, and their fingerprint (a
changed kubeconfig rebuilds the client), and one line for a configuration that cannot be loaded."""

from __future__ import annotations

import os

from pyforward.discovery.errors import describe

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
