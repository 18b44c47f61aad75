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
from bench.charts import have_matplotlib
from bench.report import TARGETS, meets

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
    measured = {key for key in TARGETS if not key.startswith("soak_")}  # the soak runs only when named
    assert measured <= set(figures), sorted(figures)
    regressed = {key: figures[key] for key in measured if not meets(key, figures[key], scale=0.1)}
    assert not regressed, f"below a tenth of the targets: {regressed}\n{done.stdout}"
    assert figures["latency_events"] == 3000
    steady = json.loads(result.read_text())["steady"]["rates"]
    assert [steady[rate]["events_written"] for rate in ("0", "100", "1000")] == [0, 500, 5000]
    # steady-floor: bench/floor_shipper.py delivered every event too; pyforward's CPU over it:
    floors = [figures[f"steady_{rate}_floor_cpu"] for rate in ("idle", "100", "1000")]
    assert all(0 < cpu < 1 for cpu in floors), floors
    assert figures["steady_100_of_floor"] > 0
    assert not json.loads(result.read_text())["heavy_imports"]
    # The charts beside the JSON (bench/charts.py; a small run has no soak), or the one line saying why not.
    if have_matplotlib():
        pngs = {p.name: p.read_bytes()[:8] for p in result.with_suffix("").glob("*.png")}
        assert pngs == dict.fromkeys(("steady-cpu.png", "steady-latency.png", "throughput.png"), b"\x89PNG\r\n\x1a\n")
    else:
        assert "bench: charts skipped: matplotlib is not installed" in done.stdout


@pytest.mark.timeout(180)
@pytest.mark.xdist_group("bench")
def test_mini_soak_restarts_the_receiver_and_every_event_is_acked(tmp_path: Path) -> None:
    """The soak harness itself (not its figures): rotation with gzip through RotatingAuditLog, backups already
    there, sinks restarted on the same port sharing their bitmap of acked events, RSS samples and a slope."""
    argv = [
        sys.executable, "-m", "bench", "--only", "soak", "--soak-seconds", "12", "--soak-warmup", "4",
        "--soak-rate", "500", "--soak-restart-every", "4", "--soak-prefill", "50", "--soak-backups", "52",
        "--out", str(tmp_path / "results"), "--cache", str(tmp_path), "--charts", str(tmp_path / "charts"),
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("*-full.json")
    report = json.loads(result.read_text())
    figures, soak = report["medians"], report["soak"]
    assert figures["soak_events"] == 6000  # the bench fails unless every one of them was acked
    assert figures["soak_restarts"] >= 2, soak["sinks"]
    assert soak["rotations"] >= 2
    assert [t for t, _ in soak["samples"]] == sorted(t for t, _ in soak["samples"])
    assert soak["samples"][-1][0] >= 12
    assert isinstance(figures["soak_slope_mb_per_hour"], float)
    if have_matplotlib():  # beside the JSON and in --charts DIR: the soak's chart only
        for where in (result.with_suffix(""), tmp_path / "charts"):
            assert [p.name for p in where.iterdir()] == ["soak-rss.png"]
