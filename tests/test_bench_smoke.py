"""The benchmark's small mode runs in CI so that it never rots; it fails only on a gross regression.

Every scenario runs for real (processes, TLS, acks, gzip; bench/README.md) and must deliver every event; the
figures must reach a tenth of the targets (a 2-core CI machine shared with the rest of the suite is no place
for timing assertions beyond that).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench.run import TARGETS, meets

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("bench")
def test_small_bench_meets_a_tenth_of_the_targets(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--small", "--out", str(tmp_path / "results"), "--cache", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("*-small.json")
    figures = json.loads(result.read_text())["medians"]
    assert set(TARGETS) <= set(figures), sorted(figures)
    regressed = {key: figures[key] for key in TARGETS if not meets(key, figures[key], scale=0.1)}
    assert not regressed, f"below a tenth of the targets: {regressed}\n{done.stdout}"
    assert figures["latency_events"] == 3000
    assert not json.loads(result.read_text())["heavy_imports"]
