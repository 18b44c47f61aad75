"""The report renderer (python -m tests.chaos.report) turns the scenarios' JSON figures into docs/reliability.md."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos import report


def test_report_renders_groups_sizes_and_failures(tmp_path: Path) -> None:
    figures = [
        {"scenario": "kill it", "group": "faults", "mode": "ci", "test": "t.py::k[ci]", "outcome": "passed",
         "faults": 20, "written": 12345, "lost": 0, "duplicated": 7, "bound": 900, "notes": "a | b"},
        {"scenario": "kill it", "group": "faults", "mode": "long", "test": "t.py::k[long]", "outcome": "failed",
         "faults": 20, "written": 99999, "lost": 3, "duplicated": 1, "bound": 900,
         "notes": "cannot read /tmp/pytest-of-root/pytest-7/popen-gw1/test_x0/auditlog/audit.log"},
        {"scenario": "fuzz", "group": "hostile peers", "mode": "ci", "test": "t.py::f", "outcome": "passed",
         "inputs": 600, "limits": "only ProtocolError"},
    ]  # fmt: skip
    for i, item in enumerate(figures):
        (tmp_path / f"{i}.json").write_text(json.dumps(item))
    out = tmp_path / "reliability.md"
    assert report.main([str(tmp_path), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Reliability and security")
    assert "3 scenario runs, 2 passed, **1 not passed**" in text
    assert "| kill it | ci | 20 | 12,345 | 0 | 7 (900) | a \\| b |" in text
    assert "| kill it | long **failed** | 20 | 99,999 | 3 | 1 (900) | cannot read <tmp>/auditlog/audit.log |" in text
    assert text.index("## Faults on the path") < text.index("## Hostile peers")
    assert "| fuzz | ci | 600 | only ProtocolError |" in text


def test_report_refuses_an_empty_directory(tmp_path: Path) -> None:
    assert report.main([str(tmp_path)]) == 1
