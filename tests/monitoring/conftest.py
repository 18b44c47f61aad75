"""Fixtures of the monitoring kit's tests: the process harness (tests/harness.py) and a real Prometheus
(tests/monitoring/prom.py), every process stopped in teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.harness import Harness, harness_at
from tests.monitoring.prom import PrometheusProcess


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Real `pyforward receive` / `pyforward run` processes under tmp_path, all stopped in teardown."""
    with harness_at(tmp_path) as h:
        try:
            yield h
        finally:
            print(h.describe())  # captured: shown for a failing test only


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
