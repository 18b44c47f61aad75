"""PNG charts of a bench results JSON (issue 14 item 5): the pictures beside bench/README.md's tables.

    python -m bench.charts bench/results/<stamp>-<mode>.json              # into bench/results/<stamp>-<mode>/
    python -m bench.charts A.json B.json --out bench/charts               # several runs into one directory

`python -m bench` calls `after_run` once it has written its JSON. Each chart is drawn only when the JSON has
its data (a `--only soak` run has no throughput, a `--small` run no soak):

soak-rss.png        the shipper's RSS over the soak: warm-up shaded, least-squares line after it, 1 MB band
steady-cpu.png      CPU share of a core per steady rate, the targets, fluent-bit's (this run's, else the reference)
steady-latency.png  append->ack latency CDF per steady rate (from the JSON's histogram), p50/p99, 100 ms target
throughput.png      events/s per run, the 50,000 target, fluent-bit's (this run's, else the reference ~31,600)

Each chart's footnote names the run: mode, time, git revision, and the load average (the machine is shared).

matplotlib is a `bench` extra (`pip install -e '.[bench]'`), imported only here and only when charts are drawn:
the bench itself runs without it. Figures are built on matplotlib's Agg canvas directly (no pyplot, no global
state), 800x450 px.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.fluentbit import REFERENCE
from bench.report import TARGETS
from bench.soak import least_squares
from bench.steady import rate_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The targets when the JSON has none (an old results file).
DEFAULT_TARGETS: dict[str, float] = {key: value for key, (_, value) in TARGETS.items()}

WIDTH, HEIGHT, DPI = 8.0, 4.5, 100  # 800x450 px
OURS, THEIRS, TARGET, MUTED = "#1f77b4", "#bbbbbb", "#d62728", "#777777"
RATE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]

SKIPPED = (
    "bench: charts skipped: matplotlib is not installed "
    "(pip install -e '.[bench]', or pip install matplotlib; then python -m bench.charts RESULTS.json)"
)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_charts(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every chart `result` (a bench results JSON, parsed) has the data for, as PNG files in `out_dir`.

    Returns the files written, in the order of the module docstring; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and no other backend's import cost
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, draw in (
        ("soak-rss.png", soak_rss),
        ("steady-cpu.png", steady_cpu),
        ("steady-latency.png", steady_latency),
        ("throughput.png", throughput),
    ):
        figure = draw(result)
        if figure is None:
            continue
        path = out_dir / name
        figure.savefig(path, dpi=DPI)
        written.append(path)
    return written


def after_run(result: dict[str, Any], *out_dirs: Path | None) -> list[Path]:
    """`python -m bench`'s hook: the charts into each of `out_dirs` (None: not asked), or one line saying why not."""
    if not have_matplotlib():
        print(SKIPPED)
        return []
    written: list[Path] = []
    for out_dir in out_dirs:
        if out_dir is not None:
            written += write_charts(result, out_dir)
    if written:
        print(f"bench: charts: {', '.join(str(p) for p in written)}")
    return written


# ---------------------------------------------------------------------------------------------- the charts


def soak_rss(result: dict[str, Any]) -> Figure | None:
    soak = result.get("soak")
    samples = [(float(t), float(rss)) for t, rss in (soak or {}).get("samples", [])]
    if soak is None or len(samples) < 2:
        return None
    warmup = float(soak.get("warmup_s", 0.0))
    minutes = samples[-1][0] >= 180  # minutes read better than seconds past a few of them
    scale, unit = (60.0, "min") if minutes else (1.0, "s")
    figure, ax = new_figure()
    after = [(t, rss) for t, rss in samples if t >= warmup] or samples
    ax.plot(
        [t / scale for t, _ in samples],
        [rss for _, rss in samples],
        color=OURS,
        lw=1.5,
        marker=".",
        ms=3,
        label="VmRSS of `pyforward run`",
    )
    if warmup > 0:
        ax.axvspan(0, warmup / scale, color=MUTED, alpha=0.15, lw=0, label=f"warm-up ({warmup:g} s, not counted)")
    # The target (issue 11 item 5): after the warm-up, RSS grows by at most 1 MB: the band from the first sample
    # after it to 1 MB above.
    limit = target(result, "soak_growth_mb")
    start = after[0][1]
    ax.fill_between(
        [after[0][0] / scale, after[-1][0] / scale],
        start,
        start + limit,
        color="#2ca02c",
        alpha=0.18,
        lw=0,
        label=f"target: growth ≤ {limit:g} MB after the warm-up",
    )
    slope, intercept = least_squares(after)
    fitted = [intercept + slope * t for t, _ in (after[0], after[-1])]
    ax.plot(
        [after[0][0] / scale, after[-1][0] / scale],
        fitted,
        color=TARGET,
        lw=1.2,
        ls="--",
        label=f"least squares after the warm-up: {slope * 3600:+.1f} MB/hour",
    )
    # y range: the samples after the warm-up and the band, padded; the start-up ramp (a few MB at t=0) would
    # squash a flat line into nothing, so it runs off the bottom, and a note says where it starts.
    low = min(min(rss for _, rss in after), start)
    high = max(max(rss for _, rss in samples), start + limit)
    pad = max(1.0, (high - low) * 0.15)
    ax.set_ylim(low - pad, high + pad)
    if samples[0][1] < low - pad:
        ax.annotate(
            f"← RSS rises from {samples[0][1]:.0f} MB at start-up",
            xy=(warmup / scale, 0.03),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize=8,
            color=MUTED,
        )
    ax.set_xlim(0, samples[-1][0] / scale)
    ax.set_xlabel(f"time since the shipper started ({unit})")
    ax.set_ylabel("RSS (MB)")
    growth = soak.get("growth_mb", after[-1][1] - after[0][1])
    restarts = float(soak.get("restart_every_s", 0))
    setup = (
        f"{soak.get('seconds', samples[-1][0]):g} s at {soak.get('rate', 0):,g} events/s, "
        + (f"receiver restarted every {restarts:g} s" if restarts else "no receiver restarts")
        + f", {soak.get('backups', '?')} backups kept"
        + (f" ({soak['prefilled_backups']} there before)" if soak.get("prefilled_backups") else "")
    )
    ax.set_title(f"Soak: shipper RSS over time (MB), growth {growth:+.2f} MB\n{setup}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    footnote(figure, result)
    return figure


def steady_cpu(result: dict[str, Any]) -> Figure | None:
    rates = steady_rates(result)
    if not rates:
        return None
    figure, ax = new_figure()
    xs = range(len(rates))
    ours = [100 * float(r["cpu_share"]) for _, r in rates]
    their_figures = [fluent_bit_figure(result, f"steady_{rate_label(rate)}_fb_cpu") for rate, _ in rates]
    theirs = [None if value is None else 100 * value for value, _ in their_figures]
    fb_label = next((legend for value, legend in their_figures if value is not None), "")
    width = 0.36
    bars = ax.bar([x - width / 2 for x in xs], ours, width, color=OURS, label="pyforward (this run)")
    ax.bar_label(bars, labels=[f"{v:.2f} %" for v in ours], fontsize=8, padding=2)
    known = [(x, v) for x, v in zip(xs, theirs, strict=True) if v is not None]
    if known:
        ref = ax.bar(
            [x + width / 2 for x, _ in known],
            [v for _, v in known],
            width,
            color=THEIRS,
            hatch="//",
            edgecolor="white",
            label=fb_label,
        )
        ax.bar_label(ref, labels=[f"{v:.1f} %" for _, v in known], fontsize=8, padding=2, color=MUTED)
    # The targets (issue 11): a red tick across each rate's pair of bars.
    first = True
    for x, (rate, _) in zip(xs, rates, strict=True):
        goal = target(result, f"steady_{rate_label(rate)}_cpu", None)
        if goal is None:
            continue
        ax.hlines(
            100 * goal,
            x - width - 0.05,
            x + width + 0.05,
            color=TARGET,
            lw=2,
            label="target (issue 11)" if first else "_nolegend_",
        )
        ax.annotate(f"≤ {100 * goal:g} %", (x + width + 0.07, 100 * goal), fontsize=8, color=TARGET, va="center")
        first = False
    ax.set_xticks(list(xs), [("idle" if rate == 0 else f"{rate:,g} events/s") for rate, _ in rates])
    ax.set_xlim(-0.7, len(rates) - 0.3)
    ax.set_ylim(0, max([*ours, *(v for _, v in known), 0.5]) * 1.18)
    ax.set_ylabel("CPU (% of one core)")
    steady = result["steady"]
    ax.set_title(
        "Steady rates: the shipper's CPU share of a core (%)\n"
        f"CPU time of all threads over a {steady.get('window_s', 0):g} s window after "
        f"{steady.get('warmup_s', 0):g} s of warm-up, one shipper per rate",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    footnote(figure, result)
    return figure


def steady_latency(result: dict[str, Any]) -> Figure | None:
    curves = []
    for rate, figures in steady_rates(result):
        histogram = figures.get("latency_histogram") or {}
        edges, counts = histogram.get("edges_ms", []), histogram.get("counts", [])
        if rate > 0 and sum(counts) > 0 and len(counts) == len(edges) + 1:
            curves.append((rate, figures, [float(e) for e in edges], [int(c) for c in counts]))
    if not curves:
        return None
    figure, ax = new_figure()
    lowest, highest = 1e9, 0.0
    for index, (rate, figures, edges, counts) in enumerate(curves):
        colour = RATE_COLOURS[index % len(RATE_COLOURS)]
        total = sum(counts)
        # counts[0] is below edges[0], counts[i] in [edges[i-1], edges[i]), counts[-1] at or above edges[-1]: the
        # share of events below edges[i] is sum(counts[:i + 1]) / total, a step at each edge.
        cumulative, below = [], 0
        for count in counts[:-1]:
            below += count
            cumulative.append(100 * below / total)
        # x range: a bin either side of the occupied ones (bin i spans edges[i-1]..edges[i])
        used = [i for i, c in enumerate(counts) if c]
        lowest = min(lowest, edges[max(0, min(used) - 2)])
        highest = max(highest, edges[min(len(edges) - 1, max(used) + 1)])
        p50, p99 = figures.get("p50_ms"), figures.get("p99_ms")
        quantiles = f": p50 {p50:.1f} ms, p99 {p99:.1f} ms" if p50 is not None and p99 is not None else ""
        ax.step(
            edges,
            cumulative,
            where="post",
            color=colour,
            lw=1.6,
            label=f"{rate:,g} events/s ({total:,} events){quantiles}",
        )
        for q, value, marker in ((50, p50, "o"), (99, p99, "D")):
            if value is not None:
                ax.plot([value], [q], marker=marker, color=colour, ms=6, mec="white", ls="none")
    goal = max(target(result, f"steady_{rate_label(rate)}_p99_ms", 100.0) or 100.0 for rate, *_ in curves)
    ax.axvline(goal, color=TARGET, lw=1.5, ls="--", label=f"target: p99 ≤ {goal:g} ms")
    for q in (50, 99):
        ax.axhline(q, color=MUTED, lw=0.6, ls=":")
        ax.annotate(
            f"p{q}",
            (1.0, q),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            fontsize=8,
            color=MUTED,
            va="center",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.set_xlim(min(lowest, goal / 10), max(highest, goal * 3))
    ax.set_ylim(0, 101)
    ax.set_xlabel("append → ack (ms, log scale)")
    ax.set_ylabel("events acked within (%)")
    ax.set_title(
        "Steady rates: append → ack latency, cumulative (% of events)\n"
        "from write(2) of the line to the sink writing its ack; ● p50, ◆ p99 (exact), curve from the histogram",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="major", axis="x", color="#eeeeee")
    footnote(figure, result)
    return figure


def throughput(result: dict[str, Any]) -> Figure | None:
    runs = [run for run in result.get("runs", []) if "throughput_eps" in run]
    if not runs:
        return None
    figure, ax = new_figure()
    xs = range(1, len(runs) + 1)
    values = [float(run["throughput_eps"]) for run in runs]
    bars = ax.bar(list(xs), values, 0.6, color=OURS, label="pyforward: mTLS + acks + gzip")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=2)
    goal = target(result, "throughput_eps")
    ax.axhline(goal, color=TARGET, lw=1.5, label=f"target ≥ {goal:,.0f} events/s")
    theirs, fb_label = fluent_bit_figure(result, "fb_throughput_eps")
    if theirs is not None:
        ax.axhline(theirs, color=MUTED, lw=1.5, ls="--", label=f"{fb_label}: {theirs:,.0f}")
    ticks = [
        f"run {x}\nload {run['load']:.1f}" if "load" in run else f"run {x}" for x, run in zip(xs, runs, strict=True)
    ]
    ax.set_xticks(list(xs), ticks)
    slots = max(len(runs), 4)  # one run's bar as wide as one of four, centred
    ax.set_xlim((len(runs) + 1) / 2 - slots / 2 - 0.2, (len(runs) + 1) / 2 + slots / 2 + 0.2)
    ax.set_ylim(0, max([*values, goal, theirs or 0.0]) * 1.3)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    ax.set_ylabel("events/s")
    events = result.get("events")
    median = statistics.median(values)
    ax.set_title(
        f"Throughput per run (events/s), median {median:,.0f}\n"
        + (f"{events:,} events " if events else "the corpus ")
        + "from a file to the sink: events / (last ack − first request)",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    footnote(figure, result)
    return figure


# ---------------------------------------------------------------------------------------------- helpers


def new_figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return figure, ax


def footnote(figure: Figure, result: dict[str, Any]) -> None:
    """Which run this is: mode, time, git revision, and the load around it (the machine is shared: on a loaded one
    every figure but RSS moves): the 1-minute load average before and after the run, and its range at the runs'
    starts."""
    load = result.get("load") or {}
    before, after = (load.get("before") or [None])[0], (load.get("after") or [None])[0]
    parts = [
        f"pyforward bench, {result.get('mode', '?')} mode, {result.get('when', '?')}",
        f"git {result.get('git') or 'unknown'}",
    ]
    if before is not None and after is not None:
        at_runs = [float(run["load"]) for run in result.get("runs", []) if "load" in run]
        spread = f", {min(at_runs):.2f}-{max(at_runs):.2f} at the runs' starts" if len(at_runs) > 1 else ""
        cpus = f" on {result['cpus']} CPUs" if result.get("cpus") else ""
        parts.append(f"load average {before:.2f} → {after:.2f}{spread}{cpus}")
    versions = result.get("versions") or {}
    if versions.get("python"):
        parts.append(f"python {versions['python']}")
    figure.supxlabel(", ".join(parts), fontsize=7, color=MUTED, x=0.99, ha="right")


def steady_rates(result: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    rates = (result.get("steady") or {}).get("rates") or {}
    return sorted(((float(figures.get("rate", key)), figures) for key, figures in rates.items()), key=lambda r: r[0])


def fluent_bit_figure(result: dict[str, Any], key: str) -> tuple[float | None, str]:
    """fluent-bit's figure `key` (fb_throughput_eps, steady_100_fb_cpu, ...) and its legend: this run's median where
    the run measured fluent-bit, else the reference figure (bench/fluentbit.py), else None."""
    medians = result.get("medians") or {}
    if key in medians:
        version = str((result.get("fluent_bit") or {}).get("version") or "").removeprefix("Fluent Bit ")
        return float(medians[key]), f"fluent-bit {version} (this run)".replace("  ", " ")
    if key in REFERENCE:
        return REFERENCE[key][0], "fluent-bit 5.1.1 (issues 7 and 11, not this run)"
    return None, ""


def target(result: dict[str, Any], key: str, default: float | None = 0.0) -> Any:
    """The target's value from the JSON (what the run was measured against), else DEFAULT_TARGETS."""
    saved = (result.get("targets") or {}).get(key)
    if saved is not None:
        return float(saved["value"])
    return DEFAULT_TARGETS.get(key, default)


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.charts", description="PNG charts of bench results JSON")
    parser.add_argument("results", type=Path, nargs="+", metavar="RESULTS.json", help="written by python -m bench")
    parser.add_argument(
        "--out", type=Path, default=None, help="directory (default: beside each JSON, in a directory of its name)"
    )
    args = parser.parse_args(argv)
    if not have_matplotlib():
        print(SKIPPED, file=sys.stderr)
        return 1
    for path in args.results:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"bench.charts: cannot read {path}: {e}", file=sys.stderr)
            return 2
        if not isinstance(result, dict):
            print(f"bench.charts: {path} is not a bench results JSON (not an object)", file=sys.stderr)
            return 2
        written = write_charts(result, args.out or path.with_suffix(""))
        print(f"{path}: {', '.join(str(p) for p in written) or 'no chart (no soak, steady or throughput data)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
