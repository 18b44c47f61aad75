"""The latency scenario: lines appended at a steady rate, a few per write; append->ack per auditID."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from bench.harness import SEED, Context, Shipper, Sink, profiling, quantile, read_acked


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
