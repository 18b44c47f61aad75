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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
#: The pyforward source measured (`--src`): put first on sys.path here and on PYTHONPATH of every process, so
#: that an editable install pointing elsewhere (another checkout) is not what gets measured.
SRC = ROOT / "src"
SINK = Path(__file__).resolve().parent / "sink.py"
FLOOR_SHIPPER = Path(__file__).resolve().parent / "floor_shipper.py"
RESULTS = Path(__file__).resolve().parent / "results"
SEED = 20261126
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The issue's targets: (metric, comparison, value). "min" means value >= target, "max" value <= target.
TARGETS: dict[str, tuple[str, float]] = {
    "throughput_eps": ("min", 50_000),
    "of_floor": ("min", 0.70),
    "cpu_us_per_event": ("max", 39.0),
    "peak_rss_mb": ("max", 64.0),
    "startup_s": ("max", 1.0),
    # Issue 11: p99 <= 100 ms at steady rates (a latency budget of 90 ms buys ~20x less CPU than the 5 ms flush that
    # gave ~10 ms; fluent-bit: ~1 s). It was 50 ms before.
    "latency_p99_ms": ("max", 100.0),
    "backlog_peak_rss_mb": ("max", 64.0),
    # issue 11: a sidecar at everyday rates (steady scenario): CPU as a share of one core over the window
    "steady_idle_cpu": ("max", 0.001),
    "steady_100_cpu": ("max", 0.010),
    "steady_1000_cpu": ("max", 0.04),
    "steady_100_p99_ms": ("max", 100.0),
    "steady_1000_p99_ms": ("max", 100.0),
    "steady_peak_rss_mb": ("max", 52.0),
    # issue 11 item 5: flat RSS over a soak (after its warm-up; meant for 10 minutes at 1,000 events/s)
    "soak_growth_mb": ("max", 1.0),
}

#: Optional modules `pyforward run` must not import unless configured to use them.
HEAVY_OPTIONAL = ("kubernetes_asyncio", "prometheus_client", "tqdm", "aiofiles", "uvloop")

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


# ---------------------------------------------------------------------------------------------- processes


def proc_cpu(pid: int) -> float:
    """CPU seconds of every thread of `pid`: the scheduler's own runtime of each thread (/proc/PID/task/*/sched,
    microseconds) where the kernel shows it, else utime + stime (/proc/PID/stat, 10 ms ticks).

    The ticks are too coarse for the steady scenario: 1 % of a core over its 20 s window is 20 ticks, so one tick more
    or less moved the figure by 0.05 %, a twentieth of issue 11's target. The per-thread runtime misses a thread that
    exits within the window; pyforward's threads (the default executor's, the gzip worker) live as long as it does.
    """
    runtime = _sched_runtime(pid)
    if runtime is not None:
        return runtime
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _sched_runtime(pid: int) -> float | None:
    """Sum of se.sum_exec_runtime (ms) of the threads of `pid`, in seconds; None without CONFIG_SCHED_DEBUG."""
    total_ms = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/sched", "rb") as f:
                field = next((line for line in f if line.startswith(b"se.sum_exec_runtime")), None)
        except FileNotFoundError:
            if tid == str(pid):
                return None  # no such file at all
            continue  # (that thread ended meanwhile)
        if field is None:
            return None
        total_ms += float(field.split(b":")[1])
    return total_ms / 1000


def proc_status(pid: int, key: str) -> int:
    """A kB value from /proc/PID/status (VmHWM, VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class Sink:
    """bench/sink.py in its own process; its JSON event lines are read by a thread."""

    def __init__(
        self,
        certs: Any,
        workdir: Path,
        *,
        expect: int,
        ack_delay: float = 0.0,
        ids: Path | None = None,
        seen: Path | None = None,
        port: int = 0,
    ):
        argv = [
            sys.executable,
            str(SINK),
            "--ca", str(certs.ca),
            "--cert", str(certs.server_cert),
            "--key", str(certs.server_key),
            "--expect", str(expect),
            "--ack-delay", str(ack_delay),
            "--port", str(port),
        ]  # fmt: skip
        if ids is not None:
            argv += ["--ids", str(ids)]
        if seen is not None:
            argv += ["--seen", str(seen)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=workdir)
        self.events: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._thread.start()
        self.port = int(self.wait("listening", 30)["port"])

    def _read(self, pipe: IO[bytes]) -> None:
        for line in pipe:
            event = json.loads(line)
            with self._cond:
                if event["event"] == "error":
                    print(f"bench: sink: {event['message']}", file=sys.stderr)
                self.events.setdefault(event["event"], event)
                self._cond.notify_all()
        with self._cond:
            self.events.setdefault("exit", {})
            self._cond.notify_all()

    def wait(self, name: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while name not in self.events:
                if "exit" in self.events:
                    raise RuntimeError(f"bench: the sink exited before '{name}'")
                if not alive():
                    raise RuntimeError(f"bench: pyforward run exited before the sink said '{name}'")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"bench: no '{name}' from the sink within {timeout:.0f}s")
                self._cond.wait(min(left, 0.5))
            return self.events[name]

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            stats = self.wait("stats", 60)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return stats


class Shipper:
    """`pyforward run` (or `program`: bench/floor_shipper.py) with a clean PYFORWARD_* environment pointing at the
    sink."""

    def __init__(
        self, certs: Any, log_path: Path, workdir: Path, port: int, extra: dict[str, str], program: Path | None = None
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYFORWARD_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
        env.update(
            {
                "PYFORWARD_LOG_PATH": str(log_path),
                "PYFORWARD_CHECKPOINT_PATH": str(workdir / f"checkpoint-{time.monotonic_ns()}.json"),
                "PYFORWARD_START_AT": "head",
                "PYFORWARD_HOST": "127.0.0.1",
                "PYFORWARD_PORT": str(port),
                "PYFORWARD_TLS": "true",
                "PYFORWARD_TLS_CA_FILE": str(certs.ca),
                "PYFORWARD_TLS_CERT_FILE": str(certs.client_cert),
                "PYFORWARD_TLS_KEY_FILE": str(certs.client_key),
                "PYFORWARD_TLS_SERVER_NAME": "localhost",
                "PYFORWARD_COMPRESS": "gzip",
                "PYFORWARD_LOG_FORMAT": "text",
                "PYFORWARD_LOG_LEVEL": "warning",
            }
        )
        env.update(extra)
        self.started = time.time()
        argv = [str(program)] if program is not None else ["-m", "pyforward", "run"]
        self.proc = subprocess.Popen([sys.executable, *argv], env=env, cwd=workdir)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample(self) -> tuple[float, float]:
        """(CPU seconds of all threads, peak RSS in MB) now."""
        pid = self.proc.pid
        return proc_cpu(pid), proc_status(pid, "VmHWM") / 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextlib.contextmanager
def profiling(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy attached to `pid` (all threads, idle frames dropped) while the block runs, if asked."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--threads",
            "--gil",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)


# ---------------------------------------------------------------------------------------------- corpus


def corpus(cache: Path, count: int | None = None, *, min_bytes: int = 0) -> Path:
    """The seeded audit log of `count` events (or of at least `min_bytes`), generated once into `cache`."""
    name = f"audit-{count}-{SEED}.log" if count is not None else f"audit-{min_bytes >> 20}MiB-{SEED}.log"
    path = cache / name
    if path.exists():
        return path
    from pyforward.auditgen import generate_events

    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    size = 0
    with partial.open("wb") as out:
        batch: list[bytes] = []
        for line in generate_events(count if count is not None else 10**9, seed=SEED):
            batch.append(line)
            size += len(line)
            if len(batch) == 4096:
                out.write(b"".join(batch))
                batch.clear()
            if count is None and size >= min_bytes:
                break
        out.write(b"".join(batch))
    partial.rename(path)
    return path


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))


# ---------------------------------------------------------------------------------------------- scenarios


def floor(lines: list[bytes]) -> dict[str, float]:
    """The per-event work alone, in this process, in a tight loop: the most the Python path can do here.

    ``floor_eps``: RecordParser.parse + EntryPacker.pack_entry (the issue's definition). ``floor_encode_eps``:
    EntryEncoder.encode, the same result by a shorter path, which is what `pyforward run` calls per line; the
    target is on the first (the issue's floor); the share of the second is shown as well, and is the stricter.
    """
    from pyforward.protocol import EntryPacker, EventTime
    from pyforward.records import RecordParser

    parse = RecordParser().parse
    pack = EntryPacker().pack_entry
    now = EventTime.now()
    started = time.perf_counter()
    for line in lines:
        t, record = parse(line, now=now)
        pack(t, record)
    figures = {"floor_eps": len(lines) / (time.perf_counter() - started)}
    try:
        from pyforward.records import EntryEncoder  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # an older pyforward (bench run against the code before the encoder)
        return figures
    encode = EntryEncoder(RecordParser()).encode
    started = time.perf_counter()
    for line in lines:
        encode(line, now)
    figures["floor_encode_eps"] = len(lines) / (time.perf_counter() - started)
    return figures


def throughput(ctx: Context, log_path: Path, events: int, size: int) -> dict[str, float]:
    sink = Sink(ctx.certs, ctx.workdir, expect=events)
    shipper = Shipper(ctx.certs, log_path, ctx.workdir, sink.port, ctx.extra_env)
    try:
        with profiling(shipper.proc.pid, ctx.profile_to("throughput")):
            first = sink.wait("first", 60, shipper.alive)
            done = sink.wait("done", 60 + events / 2000, shipper.alive)
        cpu, rss = shipper.sample()
    finally:
        code = shipper.stop()
        stats = sink.stop()
    if code != 0:
        raise RuntimeError(f"bench: pyforward run exited {code}")
    elapsed = done["t"] - first["t"]
    return {
        "throughput_eps": events / elapsed,
        "throughput_mbps": size / elapsed / 1e6,
        "cpu_us_per_event": cpu / events * 1e6,
        "peak_rss_mb": rss,
        "startup_s": first["t"] - shipper.started,
        "sink_cpu_us_per_event": stats["cpu"] / events * 1e6,
        "wire_bytes_per_event": stats["wire_bytes"] / events,
    }


def latency(ctx: Context, rate: float, seconds: float) -> dict[str, float]:
    from pyforward.auditgen import audit_id, generate_events

    directory = ctx.workdir / f"latency-{time.monotonic_ns()}"
    directory.mkdir()
    log_path = directory / "audit.log"
    log_path.touch()
    warmup = [*generate_events(5, seed=SEED + 1, id_prefix="warmup-")]
    count = int(rate * seconds)
    lines = [*generate_events(count, seed=SEED + 2, id_prefix="latency-")]
    ids_file = directory / "acked.txt"
    sink = Sink(ctx.certs, ctx.workdir, expect=len(warmup) + count, ids=ids_file)
    shipper = Shipper(ctx.certs, log_path, ctx.workdir, sink.port, ctx.extra_env)
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"".join(warmup))
            sink.wait("first", 60, shipper.alive)
            cpu_start = shipper.sample()[0]
            started = time.monotonic()
            with profiling(shipper.proc.pid, ctx.profile_to("latency")):
                written = write_steadily(fd, lines, rate, audit_id)
            cpu_share = (shipper.sample()[0] - cpu_start) / (time.monotonic() - started)
        finally:
            os.close(fd)
        sink.wait("done", 30 + seconds, shipper.alive)
    finally:
        code = shipper.stop()
        sink.stop()
    if code != 0:
        raise RuntimeError(f"bench: pyforward run exited {code}")
    acked = read_acked(ids_file)
    delays = sorted((acked[k] - t) * 1000 for k, t in written.items() if k in acked)
    if len(delays) != len(written):
        raise RuntimeError(f"bench: {len(written) - len(delays)} of {len(written)} latency events were never acked")
    return {
        "latency_p50_ms": quantile(delays, 0.50),
        "latency_p99_ms": quantile(delays, 0.99),
        "latency_max_ms": delays[-1],
        "latency_events": len(delays),
        "latency_cpu_share": cpu_share,
    }


def read_acked(ids_file: Path) -> dict[str, float]:
    """The sink's `--ids` file: auditID -> time.time() when it sent the ack."""
    acked: dict[str, float] = {}
    for row in ids_file.read_text().splitlines():
        key, _, value = row.partition(" ")
        acked[key] = float(value)
    return acked


def write_steadily(fd: int, lines: list[bytes], rate: float, key: Callable[[bytes], str]) -> dict[str, float]:
    """Append `lines` at `rate` lines/s: whatever is due goes in one write (1-2 lines per ms at 1,000/s).
    Returns key(line) -> time.time() just after the write that held it."""
    written: dict[str, float] = {}
    start = time.monotonic()
    index = 0
    while index < len(lines):
        due = min(len(lines), int((time.monotonic() - start) * rate) + 1)
        if due > index:
            os.write(fd, b"".join(lines[index:due]))
            now = time.time()
            for line in lines[index:due]:
                written[key(line)] = now
            index = due
        time.sleep(0.0005)  # pacing the writer, not synchronisation
    return written


def backlog(ctx: Context, log_path: Path, events: int, size: int, delay: float) -> dict[str, float]:
    sink = Sink(ctx.certs, ctx.workdir, expect=events, ack_delay=delay)
    shipper = Shipper(ctx.certs, log_path, ctx.workdir, sink.port, ctx.extra_env)
    try:
        first = sink.wait("first", 60, shipper.alive)
        done = sink.wait("done", 120 + size / 5e6, shipper.alive)
        _, rss = shipper.sample()
    finally:
        code = shipper.stop()
        sink.stop()
    if code != 0:
        raise RuntimeError(f"bench: pyforward run exited {code}")
    return {
        "backlog_peak_rss_mb": rss,
        "backlog_mb": size / 1e6,
        "backlog_drain_s": done["t"] - first["t"],
    }


class Sampler:
    """A thread sampling a process at absolute deadlines (start + k * step): time, CPU seconds, VmRSS, VmHWM.

    Deadlines, not a sleep per sample, so that the samples do not drift and a window boundary is a sample."""

    def __init__(self, pid: int, start: float, step: float, extra: tuple[str, ...] = ()) -> None:
        self.pid = pid
        self.start = start
        self.step = step
        self.extra = extra  # more /proc/PID/status fields (RssAnon, Threads, ...), raw numbers, into .extras
        self.samples: list[tuple[float, float, float, float]] = []  # (t - start, cpu s, rss MB, hwm MB)
        self.extras: list[list[int]] = []
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _take(self) -> None:
        try:
            cpu = proc_cpu(self.pid)
            rss = proc_status(self.pid, "VmRSS") / 1024
            hwm = proc_status(self.pid, "VmHWM") / 1024
            extra = [proc_status(self.pid, key) for key in self.extra]
        except (OSError, KeyError):
            return  # the process is gone: the caller finds out from its exit code
        with self._cond:
            self.samples.append((time.monotonic() - self.start, cpu, rss, hwm))
            self.extras.append(extra)
            self._cond.notify_all()

    def _run(self) -> None:
        k = 0
        while True:
            if self._stop.wait(max(0.0, self.start + k * self.step - time.monotonic())):
                return  # pacing the samples, not synchronisation
            self._take()
            k += 1

    def stop(self) -> list[tuple[float, float, float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def wait_for(self, t: float, alive: Callable[[], bool]) -> None:
        """Until the sample due `t` seconds after the start has been taken (or the process has exited)."""
        deadline = time.monotonic() + max(0.0, self.start + t - time.monotonic()) + self.step + 10.0
        with self._cond:
            while not (self.samples and self.samples[-1][0] >= t - self.step / 10):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"bench: no RSS/CPU sample at {t:.0f}s")
                if not alive():
                    raise RuntimeError("bench: pyforward run exited during the measurement")
                self._cond.wait(min(left, 0.5))

    def at(self, t: float) -> tuple[float, float, float, float]:
        """The first sample taken at or after `t` seconds from the start (else the last one)."""
        for sample in self.samples:
            if sample[0] >= t - self.step / 10:
                return sample
        return self.samples[-1]


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
    ctx: Context, rate: float, warmup: float, window: float, *, floor: bool = False
) -> tuple[dict[str, float], dict[str, Any]]:
    """One `pyforward run` (default settings, mTLS + acks + gzip) and one rate: events appended one write
    each for `warmup` + `window` seconds; CPU, RSS and append->ack latency over the window. `floor`: the same with
    bench/floor_shipper.py in its place; the figures are named steady_{rate}_floor_*."""
    from pyforward.auditgen import audit_id, generate_events

    label = rate_label(rate) + ("_floor" if floor else "")
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
        ctx.certs, log_path, ctx.workdir, sink.port, ctx.extra_env, program=FLOOR_SHIPPER if floor else None
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


def steady_floor(ctx: Context, rates: list[float], warmup: float, window: float) -> dict[str, float]:
    """steady_rate of bench/floor_shipper.py for each rate: steady_{rate}_floor_cpu and _p99_ms."""
    figures: dict[str, float] = {}
    for rate in rates:
        one, _ = steady_rate(ctx, rate, warmup, window, floor=True)
        label = rate_label(rate)
        for figure in ("cpu", "p99_ms"):
            if f"steady_{label}_floor_{figure}" in one:
                figures[f"steady_{label}_floor_{figure}"] = one[f"steady_{label}_floor_{figure}"]
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


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t seconds, y) points, in y per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var * 3600


def prefill_backups(log_path: Path, count: int) -> None:
    """`count` empty gzip backups named as lumberjack would, a millisecond apart in 2020 (older than anything the
    soak rotates): a directory that has kept thousands of backups, without gigabytes to ship first (and the
    shipper is given a checkpoint in the live file: it has shipped them already)."""
    import gzip

    empty = gzip.compress(b"", mtime=0)
    base = _dt.datetime(2020, 1, 1)
    for index in range(count):
        stamp = (base + _dt.timedelta(milliseconds=index)).strftime("%Y-%m-%dT%H-%M-%S.%f")[:-3]
        (log_path.parent / f"{log_path.stem}-{stamp}{log_path.suffix}.gz").write_bytes(empty)


class Restarter:
    """Restarts the sink every `every` seconds on the same port (SIGTERM, then a new process): a receiver that
    goes away under load (a rollout, a crash), as in issue 11's soaks. The sinks share the --seen bitmap."""

    def __init__(self, sink: Sink, make: Callable[[], Sink], start: float, every: float) -> None:
        self.sink = sink
        self.stats: list[dict[str, Any]] = []
        self._make = make
        self._start = start
        self._every = every
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        if every > 0:
            self._thread.start()

    def _run(self) -> None:
        k = 1
        try:
            while not self._stop.wait(max(0.0, self._start + k * self._every - time.monotonic())):
                self.stats.append(self.sink.stop())
                self.sink = self._make()
                k += 1
        except BaseException as e:  # reported by stop()
            self._error = e

    def halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def stop(self) -> Sink:
        """No more restarts; the sink now running (raises what went wrong in the thread)."""
        self.halt()
        if self._error is not None:
            raise RuntimeError(f"bench: restarting the sink failed: {self._error}") from self._error
        return self.sink


def soak(
    ctx: Context,
    *,
    seconds: float,
    rate: float,
    restart_every: float,
    backups: int,
    prefill: int,
    warmup: float,
    step: float,
) -> tuple[dict[str, float], dict[str, Any]]:
    """`pyforward run` for `seconds` at `rate` events/s, the log written through RotatingAuditLog (1 MB files,
    gzip, `backups` kept, as kube-apiserver's lumberjack), the receiver restarted every `restart_every` s; the
    shipper's RSS sampled every `step` s; after `warmup`, its growth and least-squares slope. Every event must
    be acked (distinct auditIDs at the sinks)."""
    from pyforward.auditgen import RotatingAuditLog, generate_events

    directory = ctx.workdir / f"soak-{time.monotonic_ns()}"
    directory.mkdir()
    log_path = directory / "audit.log"
    prefill_backups(log_path, prefill)
    total = int(rate * seconds)
    seen = ctx.workdir / f"soak-seen-{time.monotonic_ns()}.bin"
    first_sink = Sink(ctx.certs, ctx.workdir, expect=total, seen=seen)
    port = first_sink.port

    def make() -> Sink:
        return Sink(ctx.certs, ctx.workdir, expect=total, seen=seen, port=port)

    writer = RotatingAuditLog(log_path, max_bytes=1 << 20, max_backups=backups, compress=True)
    env = dict(ctx.extra_env)
    if prefill:
        # A sidecar that has been running: its checkpoint names the live file, so that it starts there instead
        # of reading the (empty) prefilled backups one by one while the writer runs ahead of it.
        from pyforward.checkpoint import FileIdentity, Position, save_checkpoint

        checkpoint = directory / "checkpoint.json"
        st = log_path.stat()
        save_checkpoint(checkpoint, Position(FileIdentity.of(st.st_dev, st.st_ino, b""), 0, str(log_path)))
        env.setdefault("PYFORWARD_CHECKPOINT_PATH", str(checkpoint))
    shipper = Shipper(ctx.certs, log_path, ctx.workdir, port, env)
    start = time.monotonic()
    sampler = Sampler(shipper.proc.pid, start, step, extra=("RssAnon", "RssFile", "Threads"))
    restarter = Restarter(first_sink, make, start, restart_every)
    late = 0.0
    try:
        print(
            f"bench: soak {seconds:.0f}s at {rate:g} events/s, receiver restarts every {restart_every:g}s, "
            f"{backups} backups kept ({prefill} there before), shipper pid {shipper.proc.pid}",
            flush=True,
        )
        with profiling(shipper.proc.pid, ctx.profile_to("soak")):
            for index, line in enumerate(generate_events(total, seed=SEED + 5, id_prefix="soak-")):
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing the writer (absolute deadlines), not synchronisation
                else:
                    late = max(late, -delay)
                writer.write(line)  # one write(2) per event, rotation and gzip inline, as lumberjack
                if not index % 4096 and not shipper.alive():
                    raise RuntimeError("bench: pyforward run exited during the soak")
            writer.close()
            restarter.stop().wait("done", 120, shipper.alive)
            sampler.wait_for(seconds, shipper.alive)
    finally:
        writer.close()
        restarter.halt()
        samples = sampler.stop()
        code = shipper.stop()
        last = restarter.sink.stop()
    if code != 0:
        raise RuntimeError(f"bench: pyforward run exited {code}")
    every = [*restarter.stats, last]
    acked = int.from_bytes(seen.read_bytes(), "little").bit_count()
    if acked != total:
        raise RuntimeError(f"bench: soak: {total - acked} of {total} events were never acked")
    after = [(t, rss) for t, _, rss, _ in samples if t >= warmup]
    if len(after) < 2:
        raise RuntimeError(f"bench: soak: {seconds:.0f}s is too short for a {warmup:.0f}s warm-up")
    t_end, cpu_end, _, hwm = samples[-1]
    warm = next(i for i, sample in enumerate(samples) if sample[0] >= warmup)
    t_warm, cpu_warm, _, _ = samples[warm]
    anon = [(t, extra[0] / 1024) for (t, *_), extra in zip(samples, sampler.extras, strict=True)][warm:]
    figures = {
        "soak_rss_start_mb": after[0][1],
        "soak_rss_end_mb": after[-1][1],
        "soak_growth_mb": after[-1][1] - after[0][1],
        "soak_slope_mb_per_hour": slope_per_hour(after),
        "soak_anon_growth_mb": anon[-1][1] - anon[0][1],
        "soak_anon_slope_mb_per_hour": slope_per_hour(anon),
        "soak_peak_rss_mb": hwm,
        "soak_cpu": (cpu_end - cpu_warm) / (t_end - t_warm),
        "soak_events": total,
        "soak_duplicates": sum(s.get("duplicates", 0) for s in every),
        "soak_restarts": len(restarter.stats),
        "soak_writer_late_max_s": late,
    }
    detail: dict[str, Any] = {
        "seconds": seconds,
        "rate": rate,
        "restart_every_s": restart_every,
        "backups": backups,
        "prefilled_backups": prefill,
        "warmup_s": warmup,
        "step_s": step,
        "rotations": writer.rotations,
        "samples": [[round(t, 2), round(rss, 3)] for t, _, rss, _ in samples],
        # (t, CPU seconds, VmRSS MB, VmHWM MB, RssAnon kB, RssFile kB, threads): for the investigation
        "samples_full": [
            [round(t, 2), round(cpu, 2), round(rss, 3), round(h, 3), *extra]
            for (t, cpu, rss, h), extra in zip(samples, sampler.extras, strict=True)
        ],
        "slope_mb_per_hour": figures["soak_slope_mb_per_hour"],
        "growth_mb": figures["soak_growth_mb"],
        "rss_start_mb": figures["soak_rss_start_mb"],
        "rss_end_mb": figures["soak_rss_end_mb"],
        "sinks": every,
    }
    return figures, detail


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def heavy_imports() -> list[str]:
    """Optional heavy modules loaded by importing what `pyforward run` imports (none should be)."""
    code = (
        f"import sys; sys.path.insert(0, {str(SRC)!r}); import pyforward.cli, pyforward.pipeline;"
        f"print(','.join(m for m in {HEAVY_OPTIONAL!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Context:
    certs: Any
    workdir: Path
    extra_env: dict[str, str]
    profile: Path | None

    def profile_to(self, scenario: str) -> Path | None:
        if self.profile is None:
            return None
        self.profile.mkdir(parents=True, exist_ok=True)
        return self.profile / f"{scenario}.raw"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("orjson", "msgpack", "uvloop", "isal"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SRC, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=SRC, capture_output=True, text=True)
    except OSError:
        return "?"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


ROWS: list[tuple[str, str, str]] = [
    # (key, label, format)
    ("floor_eps", "floor: parse + pack_entry (events/s)", "{:,.0f}"),
    ("floor_encode_eps", "floor: EntryEncoder.encode (events/s)", "{:,.0f}"),
    ("throughput_eps", "throughput, TLS + acks + gzip (events/s)", "{:,.0f}"),
    ("of_floor", "  share of the floor (parse + pack_entry)", "{:.0%}"),
    ("of_encode_floor", "  share of the EntryEncoder floor", "{:.0%}"),
    ("throughput_mbps", "  source MB/s", "{:.1f}"),
    ("cpu_us_per_event", "CPU per event, all threads (us)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS shipping the corpus (MB)", "{:.1f}"),
    ("sink_cpu_us_per_event", "  sink CPU per event (us)", "{:.1f}"),
    ("wire_bytes_per_event", "  bytes on the wire per event", "{:.0f}"),
    ("startup_s", "start-up to first request (s)", "{:.2f}"),
    ("latency_p50_ms", "latency write->ack p50 (ms)", "{:.1f}"),
    ("latency_p99_ms", "latency write->ack p99 (ms)", "{:.1f}"),
    ("latency_max_ms", "latency write->ack max (ms)", "{:.1f}"),
    ("latency_cpu_share", "  shipper CPU at that rate (share of a core)", "{:.1%}"),
    ("backlog_peak_rss_mb", "peak RSS draining the backlog (MB)", "{:.1f}"),
    ("backlog_mb", "  backlog (MB)", "{:.0f}"),
    ("backlog_drain_s", "  drained in (s), slow sink", "{:.1f}"),
]


def steady_rows(label: str) -> list[tuple[str, str, str]]:
    what = "idle" if label == "idle" else f"{label} events/s"
    return [
        (f"steady_{label}_cpu", f"steady {what}: CPU (share of a core)", "{:.2%}"),
        (f"steady_{label}_rss_mb", "  RSS at the end of the window (MB)", "{:.1f}"),
        (f"steady_{label}_hwm_mb", "  peak RSS, VmHWM (MB)", "{:.1f}"),
        (f"steady_{label}_p50_ms", "  append->ack p50 (ms)", "{:.1f}"),
        (f"steady_{label}_p99_ms", "  append->ack p99 (ms)", "{:.1f}"),
        (f"steady_{label}_max_ms", "  append->ack max (ms)", "{:.1f}"),
        (f"steady_{label}_floor_cpu", "  floor shipper's CPU (steady-floor)", "{:.2%}"),
        (f"steady_{label}_floor_p99_ms", "  floor shipper's append->ack p99 (ms)", "{:.1f}"),
        (f"steady_{label}_of_floor", "  pyforward's CPU / the floor's", "{:.2f}"),
    ]


def all_rows(keys: set[str]) -> list[tuple[str, str, str]]:
    """ROWS, then the steady scenario's rows for every rate measured (in the order of their rates)."""
    labels = {k.split("_")[1] for k in keys if k.startswith("steady_") and k.endswith("_cpu")}
    ordered = sorted(labels, key=lambda label: -1.0 if label == "idle" else float(label))
    rows = [*ROWS]
    for label in ordered:
        rows += steady_rows(label)
    rows.append(("steady_peak_rss_mb", "steady: peak RSS over the rates (MB)", "{:.1f}"))
    return rows + SOAK_ROWS


SOAK_ROWS: list[tuple[str, str, str]] = [
    ("soak_rss_start_mb", "soak: RSS after the warm-up (MB)", "{:.2f}"),
    ("soak_rss_end_mb", "  RSS at the end (MB)", "{:.2f}"),
    ("soak_growth_mb", "  growth after the warm-up (MB)", "{:+.2f}"),
    ("soak_slope_mb_per_hour", "  slope, least squares (MB/hour)", "{:+.2f}"),
    ("soak_anon_growth_mb", "  of which anonymous memory (RssAnon, MB)", "{:+.2f}"),
    ("soak_anon_slope_mb_per_hour", "  RssAnon slope (MB/hour)", "{:+.2f}"),
    ("soak_peak_rss_mb", "  peak RSS, VmHWM (MB)", "{:.1f}"),
    ("soak_cpu", "  CPU after the warm-up (share of a core)", "{:.1%}"),
    ("soak_events", "  events, all acked", "{:,.0f}"),
    ("soak_duplicates", "  duplicates (at-least-once)", "{:,.0f}"),
    ("soak_restarts", "  receiver restarts", "{:.0f}"),
    ("soak_writer_late_max_s", "  writer's worst lateness (s)", "{:.2f}"),
]


def target_text(key: str, fmt: str = "") -> str:
    if key not in TARGETS:
        return ""
    how, value = TARGETS[key]
    shown = (fmt.replace(".2%", ".1%") if "%" in fmt else "{:,g}").format(value)
    return (">= " if how == "min" else "<= ") + shown


def meets(key: str, value: float, scale: float = 1.0) -> bool:
    """Does `value` meet the target (scale 0.1: a tenth of it, the smoke test's gross-regression bound)?"""
    how, target = TARGETS[key]
    return value >= target * scale if how == "min" else value <= target / scale


def table(medians: dict[str, float], header: str, compare: dict[str, float] | None) -> str:
    lines = [header]
    columns = ["metric".ljust(44), "value".rjust(12)]
    if compare is not None:
        columns.append("compared".rjust(12))
    columns += ["target".rjust(12), "  met"]
    lines.append("".join(columns))
    for key, label, fmt in all_rows(set(medians)):
        if key not in medians:
            continue
        row = [label.ljust(44), fmt.format(medians[key]).rjust(12)]
        if compare is not None:
            row.append((fmt.format(compare[key]) if key in compare else "-").rjust(12))
        row.append(target_text(key, fmt).rjust(12))
        if key in TARGETS:
            row.append("  yes" if meets(key, medians[key]) else "  NO")
        lines.append("".join(row).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


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
        "--src", type=Path, default=SRC, help="the pyforward source tree to measure (default: this checkout's src)"
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pyforward-bench-cache")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON results")
    parser.add_argument("--compare", type=Path, default=None, help="a results JSON to show side by side")
    parser.add_argument("--charts", type=Path, default=None, metavar="DIR", help="the PNG charts here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global SRC
    SRC = args.src.resolve()
    sys.path.insert(0, str(SRC))
    import pyforward

    if Path(pyforward.__file__).resolve().parent.parent != SRC:
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

    from pyforward.devcerts import write_dev_certs

    load_before = os.getloadavg()
    started = time.time()
    print(f"bench: {'small' if args.small else 'full'} mode, {runs} run(s); load {load_before[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pyforward-bench-") as tmp:
        workdir = Path(tmp)
        certs = write_dev_certs(workdir / "certs")
        ctx = Context(certs=certs, workdir=workdir, extra_env=extra_env, profile=args.profile)
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
            if "steady-floor" in only:
                figures.update(steady_floor(ctx, steady_rates, steady_warmup, steady_seconds))
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
    heavy = heavy_imports()
    print(f"heavy optional modules imported by `pyforward run` at start: {', '.join(heavy) or 'none'}")
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "when": stamp,
        "mode": "small" if args.small else "full",
        "git": git_rev(),
        "src": str(SRC),
        "versions": info,
        "events": events,
        "corpus_bytes": corpus_size,
        "runs": per_run,
        "medians": medians,
        "targets": {k: {"how": h, "value": v} for k, (h, v) in TARGETS.items()},
        "load": {"before": load_before, "after": load_after},
        "seconds": time.time() - started,
        "env": extra_env,
        "heavy_imports": heavy,
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
    sys.path.append(str(ROOT))  # for `python bench/run.py` as well
    from bench.charts import after_run

    after_run(result, out.with_suffix(""), args.charts)  # PNGs beside the JSON, in a directory of its name
    return 0


if __name__ == "__main__":  # `python bench/run.py` as well as `python -m bench`
    raise SystemExit(main())
