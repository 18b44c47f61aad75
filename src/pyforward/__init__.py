"""pyforward: ship every Kubernetes audit event over the Fluentd Forward protocol.

Data flows one way: file -> lines -> records -> chunks -> wire -> ack -> checkpoint.
"""

from __future__ import annotations

#: The version when pyforward runs from a source tree that was never installed (PYTHONPATH=src): the same as
#: pyproject.toml's fallback_version, for a build without git.
UNKNOWN_VERSION = "0.0.0+unknown"


def __getattr__(name: str) -> str:
    # __version__ is looked up in the installed distribution's metadata, whose version setuptools-scm took from
    # the git tag at build time (issue 24). Lazily: `python -m pyforward` imports this package before it installs
    # its SIGTERM handler, and importlib.metadata costs ~10 ms there (it is loaded with pydantic later anyway).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("pyforward")
        except PackageNotFoundError:
            return UNKNOWN_VERSION
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
