"""Fixtures of the monitoring kit's tests: the process harness (tests/harness.py) and a real Prometheus
(tests/monitoring/prom.py), every process stopped in teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.monitoring.prom import PrometheusProcess


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[Sequence[str]], PrometheusProcess]]:
    """Start a real Prometheus scraping the given targets with prometheus-rules.yaml loaded."""
    started: list[PrometheusProcess] = []

    def start(targets: Sequence[str]) -> PrometheusProcess:
        server = PrometheusProcess(tmp_path / f"prometheus{len(started) + 1}", targets)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            print(server.describe())
            server.stop()
