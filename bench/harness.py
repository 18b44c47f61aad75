"""What every scenario of the bench uses: paths, the measured processes (bench/sink.py, `pyforward run` or the
floor shipper) and their /proc figures, a sampler, the corpus, the scenarios' context."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
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


@dataclass
class Context:
    certs: Any
    workdir: Path
    extra_env: dict[str, str]
    profile: Path | None
    fluent_bit: Path | None = None  # measured beside pyforward where given (bench/fluentbit.py)

    def profile_to(self, scenario: str) -> Path | None:
        if self.profile is None:
            return None
        self.profile.mkdir(parents=True, exist_ok=True)
        return self.profile / f"{scenario}.raw"


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
    sink; or `fluent_bit`, that binary with audit-forwarder's configuration pointing at it (bench/fluentbit.py)."""

    def __init__(
        self,
        certs: Any,
        log_path: Path,
        workdir: Path,
        port: int,
        extra: dict[str, str],
        program: Path | None = None,
        fluent_bit: Path | None = None,
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
        if fluent_bit is not None:  # configured by its file alone: no PYFORWARD_* (nor --env) in its environment
            from bench import fluentbit

            env = {k: v for k, v in os.environ.items() if not k.startswith("PYFORWARD_")}
            directory = workdir / f"fluent-bit-{time.monotonic_ns()}"
            directory.mkdir()
            argv = [str(fluent_bit), *fluentbit.config(directory, log_path, port, certs)]
        else:
            argv = [sys.executable, str(program)] if program is not None else [sys.executable, "-m", "pyforward", "run"]
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, cwd=workdir)

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


def read_acked(ids_file: Path) -> dict[str, float]:
    """The sink's `--ids` file: auditID -> time.time() when it sent the ack."""
    acked: dict[str, float] = {}
    for row in ids_file.read_text().splitlines():
        key, _, value = row.partition(" ")
        acked[key] = float(value)
    return acked


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


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
