"""The soak scenario (issue 11 item 5): `pyforward run` for minutes to hours through rotations and receiver
restarts; RSS over time, its growth and slope."""

from __future__ import annotations

import datetime as _dt
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.harness import SEED, Context, Sampler, Shipper, Sink, profiling


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t seconds, y) points, in y per hour."""
    return least_squares(points)[0] * 3600 if len(points) >= 2 else 0.0


def least_squares(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(slope per second, intercept) of y over t (the soak chart draws the line)."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in points) / var if var else 0.0
    return slope, mean_y - slope * mean_t


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
