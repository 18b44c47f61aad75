"""Fixtures of the end-to-end tests: the process harness (tests/harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Harness, harness_at


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Real `pyforward receive` / `pyforward run` processes under tmp_path, all stopped in teardown."""
    with harness_at(tmp_path) as h:
        try:
            yield h
        finally:
            # Captured: pytest shows it for a failing test only.
            print(h.describe())
