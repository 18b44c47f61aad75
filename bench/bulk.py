"""The bulk scenarios: floor (the per-event work alone), throughput (a corpus shipped; CPU per event, peak RSS,
start-up), backlog (a big log drained through a slow sink: peak RSS)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.harness import Context, Shipper, Sink, profiling


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


#: The throughput figures measured of fluent-bit too, named fb_<figure> (bench/fluentbit.py).
FLUENT_BIT_FIGURES = ("throughput_eps", "cpu_us_per_event", "peak_rss_mb", "wire_bytes_per_event")


def throughput_fluent_bit(ctx: Context, log_path: Path, events: int, size: int) -> dict[str, float]:
    """The throughput scenario with ctx.fluent_bit in place of `pyforward run`: fb_throughput_eps, ..."""
    figures = throughput(ctx, log_path, events, size, fluent_bit=True)
    return {f"fb_{key}": figures[key] for key in FLUENT_BIT_FIGURES}


def throughput(ctx: Context, log_path: Path, events: int, size: int, *, fluent_bit: bool = False) -> dict[str, float]:
    sink = Sink(ctx.certs, ctx.workdir, expect=events)
    shipper = Shipper(
        ctx.certs, log_path, ctx.workdir, sink.port, ctx.extra_env, fluent_bit=ctx.fluent_bit if fluent_bit else None
    )
    try:
        with profiling(shipper.proc.pid, ctx.profile_to("throughput")):
            first = sink.wait("first", 60, shipper.alive)
            done = sink.wait("done", 60 + events / 2000, shipper.alive)
        cpu, rss = shipper.sample()
    finally:
        code = shipper.stop()
        stats = sink.stop()
    if code != 0:
        raise RuntimeError(f"bench: {'fluent-bit' if fluent_bit else 'pyforward run'} exited {code}")
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
