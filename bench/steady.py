"""The steady scenario, a sidecar's everyday rates (issue 11): one write(2) per event at 0, 100 and 1,000 events/s;
CPU share, RSS, append->ack over a window; and steady-floor, the same with bench/floor_shipper.py."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from bench.harness import FLOOR_SHIPPER, SEED, Context, Sampler, Shipper, Sink, profiling, quantile, read_acked


def write_paced(
    fd: int, lines: list[bytes], rate: float, start: float, key: Callable[[bytes], str]
) -> list[tuple[str, float]]:
    """Append `lines` one write(2) each (kube-apiserver's lumberjack writes one event per write), line i at
    monotonic `start + i / rate`: absolute deadlines, so sleep overshoot does not accumulate into a lower rate
    (a late writer catches up, still one line per write). Returns (key, time.time() after its write)."""
    written: list[tuple[str, float]] = []
    for index, line in enumerate(lines):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the writer, not synchronisation
        os.write(fd, line)
        written.append((key(line), time.time()))
    return written


#: Log-spaced latency histogram edges (ms), 10 per decade from 0.1 ms to 100 s: chart-friendly and small.
HISTOGRAM_EDGES_MS = [round(10 ** (k / 10 - 1), 4) for k in range(61)]


def histogram(values: list[float]) -> dict[str, list[float] | list[int]]:
    import bisect

    counts = [0] * (len(HISTOGRAM_EDGES_MS) + 1)  # [0] below the first edge, [-1] at or above the last
    for value in values:
        counts[bisect.bisect_right(HISTOGRAM_EDGES_MS, value)] += 1
    return {"edges_ms": HISTOGRAM_EDGES_MS, "counts": counts}


def rate_label(rate: float) -> str:
    return "idle" if rate == 0 else f"{rate:g}"


def steady_rate(
    ctx: Context, rate: float, warmup: float, window: float, *, variant: str = ""
) -> tuple[dict[str, float], dict[str, Any]]:
    """One `pyforward run` (default settings, mTLS + acks + gzip) and one rate: events appended one write
    each for `warmup` + `window` seconds; CPU, RSS and append->ack latency over the window. `variant` "floor": the
    same with bench/floor_shipper.py in its place, "fb" with ctx.fluent_bit; the figures are named
    steady_{rate}_{variant}_*."""
    from pyforward.auditgen import audit_id, generate_events

    label = rate_label(rate) + (f"_{variant}" if variant else "")
    directory = ctx.workdir / f"steady-{label}-{time.monotonic_ns()}"
    directory.mkdir()
    log_path = directory / "audit.log"
    log_path.touch()
    # A few events before the clock starts: the connection is up and the first chunk acked (as for a sidecar
    # that has been running), so the warm-up is the rate's own, not the start-up's.
    primer = [*generate_events(5, seed=SEED + 3, id_prefix="primer-")]
    lines = [*generate_events(int(rate * (warmup + window)), seed=SEED + 4, id_prefix=f"steady-{label}-")]
    ids_file = directory / "acked.txt"
    sink = Sink(ctx.certs, ctx.workdir, expect=len(primer) + len(lines), ids=ids_file)
    shipper = Shipper(
        ctx.certs,
        log_path,
        ctx.workdir,
        sink.port,
        ctx.extra_env,
        program=FLOOR_SHIPPER if variant == "floor" else None,
        fluent_bit=ctx.fluent_bit if variant == "fb" else None,
    )
    sampler: Sampler | None = None
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
        try:
            for line in primer:
                os.write(fd, line)
            sink.wait("first", 60, shipper.alive)
            start = time.monotonic()
            sampler = Sampler(shipper.proc.pid, start, 0.5 if window < 10 else 1.0)
            with profiling(shipper.proc.pid, ctx.profile_to(f"steady-{label}")):
                written = write_paced(fd, lines, rate, start, audit_id) if rate > 0 else []
                sampler.wait_for(warmup + window, shipper.alive)
        finally:
            os.close(fd)
        sink.wait("done", 30 + warmup + window, shipper.alive)
    finally:
        samples = sampler.stop() if sampler is not None else []
        code = shipper.stop()
        sink.stop()
    if code != 0:
        raise RuntimeError(f"bench: pyforward run exited {code}")
    acked = read_acked(ids_file)
    missing = sum(1 for k, _ in written if k not in acked)
    if missing:
        raise RuntimeError(f"bench: {missing} of {len(written)} steady events at {label}/s were never acked")
    first_in_window = int(rate * warmup)
    delays = sorted((acked[k] - t) * 1000 for k, t in written[first_in_window:])
    t0, cpu0, _, _ = sampler.at(warmup) if sampler else (0.0, 0.0, 0.0, 0.0)
    t1, cpu1, rss, hwm = sampler.at(warmup + window) if sampler else (1.0, 0.0, 0.0, 0.0)
    figures = {
        f"steady_{label}_cpu": (cpu1 - cpu0) / (t1 - t0),
        f"steady_{label}_rss_mb": rss,
        f"steady_{label}_hwm_mb": hwm,
    }
    if delays:
        figures.update(
            {
                f"steady_{label}_p50_ms": quantile(delays, 0.50),
                f"steady_{label}_p99_ms": quantile(delays, 0.99),
                f"steady_{label}_max_ms": delays[-1],
            }
        )
    detail: dict[str, Any] = {
        "rate": rate,
        "cpu_share": figures[f"steady_{label}_cpu"],
        "rss_mb": rss,
        "hwm_mb": hwm,
        "p50_ms": figures.get(f"steady_{label}_p50_ms"),
        "p99_ms": figures.get(f"steady_{label}_p99_ms"),
        "max_ms": figures.get(f"steady_{label}_max_ms"),
        "events_in_window": len(delays),
        "events_written": len(written),
        "latency_histogram": histogram(delays),
        # (t s since the start of the warm-up, CPU share of a core since the previous sample, VmRSS MB)
        "samples": [
            [round(t, 3), round((c - pc) / (t - pt), 5) if t > pt else 0.0, round(r, 2)]
            for (pt, pc, _, _), (t, c, r, _) in itertools.pairwise(samples)
        ],
    }
    return figures, detail


def steady_other(ctx: Context, rates: list[float], warmup: float, window: float, variant: str) -> dict[str, float]:
    """steady_rate of another shipper for each rate (`variant` "floor": bench/floor_shipper.py, "fb": fluent-bit):
    steady_{rate}_{variant}_cpu and _p99_ms."""
    figures: dict[str, float] = {}
    for rate in rates:
        one, _ = steady_rate(ctx, rate, warmup, window, variant=variant)
        label = rate_label(rate)
        for figure in ("cpu", "p99_ms"):
            if f"steady_{label}_{variant}_{figure}" in one:
                figures[f"steady_{label}_{variant}_{figure}"] = one[f"steady_{label}_{variant}_{figure}"]
    return figures


def steady(ctx: Context, rates: list[float], warmup: float, window: float) -> tuple[dict[str, float], dict[str, Any]]:
    """steady_rate for each rate, one shipper process each (a clean RSS per rate); peak RSS across them."""
    figures: dict[str, float] = {}
    detail: dict[str, Any] = {"warmup_s": warmup, "window_s": window, "rates": {}}
    for rate in rates:
        one, about = steady_rate(ctx, rate, warmup, window)
        figures.update(one)
        detail["rates"][f"{rate:g}"] = about
    figures["steady_peak_rss_mb"] = max(v for k, v in figures.items() if k.endswith("_hwm_mb"))
    return figures, detail
