"""Fixtures of the tailer's tests (test_tailer.py, test_tailer_loss.py, ...)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pyforward.tail import Tailer
from tests.unit.test_tailer import Apiserver


@pytest.fixture
async def make_tailer() -> AsyncIterator[Callable[..., Tailer]]:
    """Tailers (no checkpoint unless given), closed after the test."""
    made: list[Tailer] = []

    def make(path: Path, **kwargs: Any) -> Tailer:
        kwargs.setdefault("start", None)
        tailer = Tailer(path, **kwargs)
        made.append(tailer)
        return tailer

    yield make
    for tailer in made:
        await tailer.close()


@pytest.fixture
def api(tmp_path: Path) -> Apiserver:
    return Apiserver(tmp_path / "auditlog")
