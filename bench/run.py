"""The pyforward benchmark: one command, one table, one JSON file. See bench/README.md.

    python -m bench                 # full: 200,000-event corpus, 1 GB backlog, 3 runs, medians
    python -m bench --small         # quick (CI smoke): 20,000 events, 48 MB backlog, 1 run

Scenarios, each run in this order:

floor       RecordParser.parse + EntryPacker.pack_entry over the corpus lines, in this process, tight loop.
throughput  `pyforward run` (a real process) ships the corpus file to bench/sink.py (another process) over
            mTLS with acks and gzip. events/s = events / (last ack - first request at the sink); CPU = the CPU
            time of the whole shipper process (all threads, start-up included; proc_cpu) when the last ack is
            sent; peak RSS = VmHWM from /proc/PID/status at that moment.
startup     from spawning `pyforward run` (the log already full) to the first request arriving at the sink.
latency     lines appended to an empty log at a steady rate (default 1,000/s, a few per write); per auditID,
            the time the sink wrote the ack minus the time the line was written (time.time() in both
            processes). The ack's way back to the shipper (loopback) is not included.
backlog     a ~1 GB log (small: 48 MB) already there, a sink that acks every request 0.1 s late (and does not
            even gunzip): peak RSS (VmHWM) of the shipper until every event is acked.
steady      a sidecar's everyday life (issue 11): events appended at 0, 100 and 1,000 events/s, one write(2)
            per event paced by absolute deadlines, one `pyforward run` per rate; after a warm-up, over a
            window: the shipper's CPU share of a core, its RSS (VmRSS, VmHWM) and append->ack p50/p99/max.
steady-floor  the same, with bench/floor_shipper.py in place of `pyforward run`: the least a shipper does per
            chunk (wake, read, encode, gzip, TLS write) in the plainest asyncio loop, no acks read, no
            checkpoint. Its CPU is the floor that steady's CPU is shown against (steady_*_of_floor).
soak        only when named: RSS over minutes to hours through rotations and receiver restarts (soak.py).

Where a fluent-bit binary is found (--fluent-bit, $FLUENT_BIT, PATH), throughput and steady measure it too, with
audit-forwarder's configuration (fb_* figures, fluentbit.py); else the reference figures are printed.

Modules: harness (processes, sink control, sampler, corpus), bulk (floor, throughput, backlog), latency, steady,
soak, fluentbit, report (targets, the table), charts; this one has the command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: the bench package is found from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fluentbit, harness
from bench.bulk import backlog, floor, throughput, throughput_fluent_bit
from bench.harness import RESULTS, Context, corpus, count_lines
from bench.latency import latency
from bench.report import TARGETS, git_rev, heavy_imports, table, versions
from bench.soak import soak
from bench.steady import rate_label, steady, steady_other

SCENARIOS = {"floor", "throughput", "latency", "backlog", "steady", "steady-floor", "soak"}


@dataclass(frozen=True)
class Mode:
    events: int
    backlog_bytes: int
    latency_seconds: float
    runs: int
    steady_warmup: float
    steady_seconds: float


FULL = Mode(events=200_000, backlog_bytes=1 << 30, latency_seconds=10.0, runs=3, steady_warmup=5.0, steady_seconds=20.0)
SMALL = Mode(events=20_000, backlog_bytes=48 << 20, latency_seconds=3.0, runs=1, steady_warmup=2.0, steady_seconds=3.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="pyforward benchmark (bench/README.md)")
    parser.add_argument("--small", action="store_true", help="quick mode (CI smoke test)")
    parser.add_argument(
        "--runs", type=int, default=None, help="runs; the table shows medians (default 3, small 1; 1 with soak)"
    )
    parser.add_argument("--events", type=int, default=None, help="corpus size (default 200,000; small 20,000)")
    parser.add_argument("--backlog-mb", type=int, default=None, help="backlog size (default 1024; small 48)")
    parser.add_argument("--latency-seconds", type=float, default=None, help="steady-rate phase (default 10; small 3)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s of the latency phase (default 1000)")
    parser.add_argument("--ack-delay", type=float, default=0.1, help="slow sink's delay per ack (default 0.1 s)")
    parser.add_argument(
        "--steady-rates", default="0,100,1000", help="events/s of the steady scenario (default 0,100,1000)"
    )
    parser.add_argument(
        "--steady-seconds", type=float, default=None, help="steady: measurement window per rate (default 20; small 3)"
    )
    parser.add_argument(
        "--steady-warmup", type=float, default=None, help="steady: warm-up before each window (default 5; small 2)"
    )
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="soak: duration (default 600)")
    parser.add_argument("--soak-rate", type=float, default=1000.0, help="soak: events/s (default 1000)")
    parser.add_argument(
        "--soak-restart-every", type=float, default=30.0, help="soak: seconds between receiver restarts (0: none)"
    )
    parser.add_argument("--soak-backups", type=int, default=5, help="soak: rotated files kept (default 5)")
    parser.add_argument(
        "--soak-prefill", type=int, default=0, help="soak: empty gzip backups already there (e.g. 2000)"
    )
    parser.add_argument("--soak-warmup", type=float, default=60.0, help="soak: warm-up before growth (default 60)")
    parser.add_argument("--soak-step", type=float, default=None, help="soak: seconds between RSS samples (5; 1 <2min)")
    parser.add_argument(
        "--only",
        default="floor,throughput,latency,backlog,steady,steady-floor",
        help="comma-separated scenarios to run (floor, throughput, latency, backlog, steady, steady-floor; soak: only "
        "if named)",
    )
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for pyforward run")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="py-spy (raw) profiles of throughput and latency here"
    )
    parser.add_argument(
        "--src",
        type=Path,
        default=harness.SRC,
        help="the pyforward source tree to measure (default: this checkout's src)",
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pyforward-bench-cache")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON results")
    parser.add_argument("--compare", type=Path, default=None, help="a results JSON to show side by side")
    parser.add_argument("--charts", type=Path, default=None, metavar="DIR", help="the PNG charts here too")
    parser.add_argument(
        "--fluent-bit",
        default=None,
        metavar="PATH",
        help="fluent-bit to measure beside pyforward in throughput and steady (default: $FLUENT_BIT, else fluent-bit "
        "on PATH; 'none': do not)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.SRC = args.src.resolve()  # read by the processes started (PYTHONPATH) and the report
    sys.path.insert(0, str(harness.SRC))
    import pyforward

    if Path(pyforward.__file__).resolve().parent.parent != harness.SRC:
        raise SystemExit(f"bench: pyforward was imported from {pyforward.__file__} before --src could apply")
    mode = SMALL if args.small else FULL
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    runs = args.runs or (1 if "soak" in only else mode.runs)  # a soak is long: once, unless --runs says
    events = args.events or mode.events
    backlog_bytes = (args.backlog_mb << 20) if args.backlog_mb else mode.backlog_bytes
    seconds = args.latency_seconds or mode.latency_seconds
    unknown = only - SCENARIOS
    if unknown:
        known = ", ".join(sorted(SCENARIOS))
        raise SystemExit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))}; known: {known}")
    steady_rates = [float(r) for r in args.steady_rates.split(",") if r.strip()]
    steady_warmup = mode.steady_warmup if args.steady_warmup is None else args.steady_warmup
    steady_seconds = args.steady_seconds or mode.steady_seconds
    steady_detail: list[dict[str, Any]] = []
    soak_detail: list[dict[str, Any]] = []
    extra_env = dict(item.split("=", 1) for item in args.env)
    compare = json.loads(args.compare.read_text())["medians"] if args.compare else None
    fluent_bit = fluentbit.find(args.fluent_bit)
    fluent_bit_version = fluentbit.version(fluent_bit) if fluent_bit is not None else None

    from pyforward.devcerts import write_dev_certs

    load_before = os.getloadavg()
    started = time.time()
    print(f"bench: {'small' if args.small else 'full'} mode, {runs} run(s); load {load_before[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pyforward-bench-") as tmp:
        workdir = Path(tmp)
        certs = write_dev_certs(workdir / "certs")
        ctx = Context(certs=certs, workdir=workdir, extra_env=extra_env, profile=args.profile, fluent_bit=fluent_bit)
        corpus_path = corpus(args.cache, events)
        corpus_size = corpus_path.stat().st_size
        lines = corpus_path.read_bytes().splitlines() if "floor" in only else []
        backlog_path = corpus(args.cache, min_bytes=backlog_bytes) if "backlog" in only else None
        backlog_events = count_lines(backlog_path) if backlog_path else 0
        per_run: list[dict[str, float]] = []
        for run in range(runs):
            figures: dict[str, float] = {"load": os.getloadavg()[0]}
            if "floor" in only:
                figures.update(floor(lines))
            if "throughput" in only:
                figures.update(throughput(ctx, corpus_path, events, corpus_size))
                if fluent_bit is not None:
                    figures.update(throughput_fluent_bit(ctx, corpus_path, events, corpus_size))
                if "floor_eps" in figures:
                    figures["of_floor"] = figures["throughput_eps"] / figures["floor_eps"]
                if "floor_encode_eps" in figures:
                    figures["of_encode_floor"] = figures["throughput_eps"] / figures["floor_encode_eps"]
            if "latency" in only:
                figures.update(latency(ctx, args.rate, seconds))
            if backlog_path is not None:
                figures.update(backlog(ctx, backlog_path, backlog_events, backlog_path.stat().st_size, args.ack_delay))
            if "steady" in only:
                steady_figures, detail = steady(ctx, steady_rates, steady_warmup, steady_seconds)
                figures.update(steady_figures)
                steady_detail.append(detail)
                if fluent_bit is not None:
                    figures.update(steady_other(ctx, steady_rates, steady_warmup, steady_seconds, "fb"))
            if "steady-floor" in only:
                figures.update(steady_other(ctx, steady_rates, steady_warmup, steady_seconds, "floor"))
                for rate in steady_rates:
                    label = rate_label(rate)
                    mine, least = figures.get(f"steady_{label}_cpu"), figures.get(f"steady_{label}_floor_cpu")
                    if mine is not None and least:
                        figures[f"steady_{label}_of_floor"] = mine / least
            if "soak" in only:
                soak_figures, detail = soak(
                    ctx,
                    seconds=args.soak_seconds,
                    rate=args.soak_rate,
                    restart_every=args.soak_restart_every,
                    backups=args.soak_backups,
                    prefill=args.soak_prefill,
                    warmup=args.soak_warmup,
                    step=args.soak_step or (5.0 if args.soak_seconds >= 120 else 1.0),
                )
                figures.update(soak_figures)
                soak_detail.append(detail)
            per_run.append(figures)
            shown = ", ".join(f"{k}={v:,.4g}" for k, v in figures.items())
            print(f"bench: run {run + 1}/{runs}: {shown}", flush=True)
    medians = {key: statistics.median(run[key] for run in per_run) for key in per_run[0]}
    load_after = os.getloadavg()
    info = versions()
    header = (
        f"pyforward bench: {'small' if args.small else 'full'}, {events:,} events ({corpus_size / 1e6:.0f} MB), "
        f"median of {runs} run(s); load {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs; "
        f"python {info['python']}, orjson {info['orjson']}, msgpack {info['msgpack']}, uvloop {info['uvloop']}"
    )
    print(table(medians, header, compare))
    if fluent_bit is not None:
        print(f"fluent-bit: {fluent_bit} ({fluent_bit_version}), audit-forwarder's configuration, measured in this run")
    elif only & {"throughput", "steady"}:
        print("\n".join(fluentbit.reference_lines()))
    heavy = heavy_imports()
    print(f"heavy optional modules imported by `pyforward run` at start: {', '.join(heavy) or 'none'}")
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "when": stamp,
        "mode": "small" if args.small else "full",
        "git": git_rev(),
        "src": str(harness.SRC),
        "versions": info,
        "events": events,
        "corpus_bytes": corpus_size,
        "runs": per_run,
        "medians": medians,
        "targets": {k: {"how": h, "value": v} for k, (h, v) in TARGETS.items()},
        "load": {"before": load_before, "after": load_after},
        "cpus": os.cpu_count(),
        "seconds": time.time() - started,
        "env": extra_env,
        "heavy_imports": heavy,
        "fluent_bit": {
            "binary": str(fluent_bit) if fluent_bit else None,
            "version": fluent_bit_version,
            "reference": {
                key: {"value": value, "source": where} for key, (value, where) in fluentbit.REFERENCE.items()
            },
        },
    }
    if steady_detail:
        # Chart-friendly: per rate, the medians of the runs' figures, and the first run's samples and histogram.
        steady_result = steady_detail[0]
        for rate in steady_rates:
            label, key = rate_label(rate), f"{rate:g}"
            for name, figure in (("cpu_share", "cpu"), ("rss_mb", "rss_mb"), ("hwm_mb", "hwm_mb"), ("p50_ms", "p50_ms"),
                                 ("p99_ms", "p99_ms"), ("max_ms", "max_ms")):  # fmt: skip
                if f"steady_{label}_{figure}" in medians:
                    steady_result["rates"][key][name] = medians[f"steady_{label}_{figure}"]
        steady_result["runs"] = [{k: {n: v for n, v in d.items() if n not in ("samples", "latency_histogram")}
                                  for k, d in run["rates"].items()} for run in steady_detail]  # fmt: skip
        result["steady"] = steady_result
    if soak_detail:
        result["soak"] = soak_detail[0] if len(soak_detail) == 1 else {**soak_detail[0], "runs": soak_detail}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{stamp}-{result['mode']}.json"
    if out.exists():  # two benches that ended in the same second (a soak beside another one)
        out = out.with_name(f"{stamp}-{result['mode']}-{os.getpid()}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench: results in {out}")
    from bench.charts import after_run

    after_run(result, out.with_suffix(""), args.charts)  # PNGs beside the JSON, in a directory of its name
    return 0


if __name__ == "__main__":  # `python bench/run.py` as well as `python -m bench`
    raise SystemExit(main())
