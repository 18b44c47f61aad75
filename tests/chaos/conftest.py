"""Fixtures of the chaos suite: the process harness, and the figures each scenario reports.

Set PYFORWARD_CHAOS_REPORT=DIR to have every scenario write its figures (faults tried, events written, lost,
duplicated and the bound, inputs tried, limits held) to DIR/<test>.json; ``python -m tests.chaos.report DIR``
renders them as docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

REPORT_ENV = "PYFORWARD_CHAOS_REPORT"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome
    return report


_OUTCOME = pytest.StashKey[str]()


class Figures(dict[str, Any]):
    """What one scenario reports. Keys used by the report: scenario, group, faults, written, lost, duplicated,
    bound, inputs, limits, notes (all optional but scenario and group)."""


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    data = Figures()
    started = time.monotonic()
    yield data
    directory = os.environ.get(REPORT_ENV)
    if not directory or "scenario" not in data:
        return
    node = request.node
    data.setdefault("mode", "long" if "[long" in node.nodeid or "-long" in node.nodeid else "ci")
    data["test"] = node.nodeid
    data["outcome"] = node.stash.get(_OUTCOME, "error")
    data["seconds"] = round(time.monotonic() - started, 1)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.nodeid)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
