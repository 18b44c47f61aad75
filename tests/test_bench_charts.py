"""bench/charts.py (issue 14 item 5): the bench's PNG charts from a results dict, without running a bench.

The dict is built here in the shape bench/run.py writes (`runs`, `steady`, `soak`, `targets`, `load`); the
charts are real matplotlib renderings (Agg) checked as PNG files: signature, IHDR size, non-trivial content.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench import charts
from bench.report import TARGETS
from bench.steady import HISTOGRAM_EDGES_MS, histogram

#: The rendering tests need the bench extra (tests/run.sh installs it); the no-matplotlib path is tested anyway.
needs_matplotlib = pytest.mark.skipif(
    not charts.have_matplotlib(), reason="matplotlib (the bench extra: pip install -e '.[bench]') is not installed"
)

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL = ["soak-rss.png", "steady-cpu.png", "steady-latency.png", "throughput.png"]


def synthetic() -> dict[str, Any]:
    """A full-mode result with three throughput runs, three steady rates and a short soak."""
    rates: dict[str, Any] = {}
    for rate, cpu, delays in (
        (0.0, 0.0, []),
        (100.0, 0.008, [2.0 + (i % 40) for i in range(500)]),
        (1000.0, 0.035, [1.0 + (i % 90) * 1.1 for i in range(5000)]),
    ):
        ordered = sorted(delays)
        rates[f"{rate:g}"] = {
            "rate": rate,
            "cpu_share": cpu,
            "rss_mb": 50.0,
            "hwm_mb": 50.5,
            "p50_ms": ordered[len(ordered) // 2] if ordered else None,
            "p99_ms": ordered[int(len(ordered) * 0.99)] if ordered else None,
            "max_ms": ordered[-1] if ordered else None,
            "events_in_window": len(ordered),
            "events_written": len(ordered),
            "latency_histogram": histogram(ordered),
            "samples": [[t, cpu, 50.0] for t in range(1, 26)],
        }
    soak_samples = [[t * 5.0, 8.0 if t == 0 else 50.0 + 0.001 * t] for t in range(121)]
    return {
        "when": "20261202T000000Z",
        "mode": "full",
        "git": "abc1234",
        "versions": {"python": "3.11.7"},
        "events": 200_000,
        "runs": [{"load": 0.5 + i, "throughput_eps": 60_000.0 + 1_000 * i} for i in range(3)],
        "targets": {k: {"how": h, "value": v} for k, (h, v) in TARGETS.items()},
        "load": {"before": [0.5, 0.4, 0.3], "after": [1.5, 0.6, 0.4]},
        "steady": {"warmup_s": 5.0, "window_s": 20.0, "rates": rates},
        "soak": {
            "seconds": 600.0,
            "rate": 1000.0,
            "restart_every_s": 30.0,
            "backups": 5,
            "prefilled_backups": 0,
            "warmup_s": 60.0,
            "samples": soak_samples,
            "slope_mb_per_hour": 0.72,
            "growth_mb": 0.108,
        },
    }


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@needs_matplotlib
def test_every_chart_is_a_readable_png(tmp_path: Path) -> None:
    written = charts.write_charts(synthetic(), tmp_path / "out")
    assert [p.name for p in written] == ALL
    for path in written:
        assert png_size(path) == (800, 450)
        # Text, axes and data drawn: an empty 800x450 figure compresses to ~3 KB.
        assert 15_000 < path.stat().st_size < 100_000, (path, path.stat().st_size)


@needs_matplotlib
def test_missing_sections_are_skipped(tmp_path: Path) -> None:
    result = synthetic()
    del result["soak"], result["steady"]
    assert [p.name for p in charts.write_charts(result, tmp_path / "throughput")] == ["throughput.png"]

    result = synthetic()
    result["runs"] = [{"load": 1.0, "soak_growth_mb": 0.1}]  # a `--only soak` run: no throughput figures
    del result["steady"], result["targets"]  # an old file without targets: the defaults apply
    assert [p.name for p in charts.write_charts(result, tmp_path / "soak")] == ["soak-rss.png"]

    result = synthetic()
    for rate in result["steady"]["rates"].values():  # idle only, or no latency: no latency chart
        rate["latency_histogram"] = {"edges_ms": HISTOGRAM_EDGES_MS, "counts": [0] * (len(HISTOGRAM_EDGES_MS) + 1)}
    del result["soak"]
    names = [p.name for p in charts.write_charts(result, tmp_path / "steady")]
    assert names == ["steady-cpu.png", "throughput.png"]

    assert charts.write_charts({"runs": []}, tmp_path / "nothing") == []


def test_without_matplotlib_the_bench_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert charts.after_run(synthetic(), tmp_path / "beside", None) == []
    out = capsys.readouterr().out
    assert out == charts.SKIPPED + "\n"
    assert "pip install" in out
    assert not (tmp_path / "beside").exists()


@needs_matplotlib
def test_command_line_renders_an_existing_json(tmp_path: Path) -> None:
    results = tmp_path / "20261202T000000Z-full.json"
    results.write_text(json.dumps(synthetic()))
    done = subprocess.run(
        [sys.executable, "-m", "bench.charts", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "20261202T000000Z-full").iterdir()) == sorted(ALL)

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    done = subprocess.run(
        [sys.executable, "-m", "bench.charts", str(bad), "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"bench.charts: {bad} is not a bench results JSON (not an object)"


@needs_matplotlib
def test_the_footnote_names_the_load_of_the_run() -> None:
    # The machine is shared: a chart says how loaded it was when its figures were taken (issue 23).
    result = {**synthetic(), "cpus": 2}
    figure = charts.throughput(result)
    assert figure is not None
    assert figure.get_supxlabel() == (
        "pyforward bench, full mode, 20261202T000000Z, git abc1234, "
        "load average 0.50 → 1.50, 0.50-2.50 at the runs' starts on 2 CPUs, python 3.11.7"
    )


def test_fluent_bit_figures_from_the_run_else_the_reference() -> None:
    result = synthetic()
    assert charts.fluent_bit_figure(result, "fb_throughput_eps") == (
        31_600.0,
        "fluent-bit 5.1.1 (issues 7 and 11, not this run)",
    )
    assert charts.fluent_bit_figure(result, "steady_100_fb_cpu")[0] == 0.015
    result["medians"] = {"fb_throughput_eps": 28_000.0, "steady_100_fb_cpu": 0.02}
    result["fluent_bit"] = {"binary": "/usr/bin/fluent-bit", "version": "Fluent Bit v3.2.2"}
    assert charts.fluent_bit_figure(result, "fb_throughput_eps") == (28_000.0, "fluent-bit v3.2.2 (this run)")
    assert charts.fluent_bit_figure(result, "steady_100_fb_cpu") == (0.02, "fluent-bit v3.2.2 (this run)")
    assert charts.fluent_bit_figure(result, "steady_10_fb_cpu") == (None, "")
