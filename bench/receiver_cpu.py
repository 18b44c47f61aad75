"""CPU per event of `pyforward receive` (issue 22: the exactly-once marks must cost it under 5 %), measured by hand.

    python -m bench.receiver_cpu --src /work/main/src --src src --rounds 3

For each round and each source tree (interleaved: the machine is shared), starts ``python -m pyforward receive`` from
that tree writing to a file, sends it the same chunks of generated audit events (gzip, `chunk_max_records` records
each, a window of 32 in flight on one connection) and reads the process's CPU time (utime + stime of /proc/PID/stat)
before the first chunk and after the last ack. With ``--ranges`` the chunks carry the ``pyforward.*`` options as
`pyforward run` sends them (a tree that does not know them ignores them). Prints microseconds of CPU per event.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyforward.auditgen import generate_events
from pyforward.protocol import ClientDecoder, EntryPacker, EventTime, build_chunk, range_options
from pyforward.records import EntryEncoder, RecordParser, RecordStats

_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def make_chunks(events: int, per_chunk: int, ranges: bool) -> list[bytes]:
    lines = [line.rstrip(b"\n") for line in generate_events(events, seed=7)]
    encoder = EntryEncoder(RecordParser(time_key="stageTimestamp", stats=RecordStats()), EntryPacker())
    now = EventTime.now()
    chunks = []
    offset = 0
    for first in range(0, len(lines), per_chunk):
        part = lines[first : first + per_chunk]
        lengths = [len(line) + 1 for line in part]
        blob = b"".join(encoder.encode(line, now) for line in part)
        extra = range_options("2049:4242:0123456789abcdef", offset, lengths) if ranges else None
        chunks.append(build_chunk("kube.audit", blob, len(part), size=sum(lengths), compress=True, extra=extra).payload)
        offset += sum(lengths)
    return chunks


def measure(src: str, chunks: list[bytes], events: int, window: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyforward", "receive", "--bind", "127.0.0.1:0", "--output", f"{tmp}/out.jsonl"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=tmp,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            match = None
            while match is None:
                line = proc.stderr.readline().decode()
                if not line:
                    raise RuntimeError("the receiver did not start")
                match = re.search(r"listening on \S+:(\d+)", line)
            with socket.create_connection(("127.0.0.1", int(match.group(1)))) as sock:
                decoder = ClientDecoder()
                before = _cpu_seconds(proc.pid)
                sent = acked = 0
                while acked < len(chunks):
                    while sent < len(chunks) and sent - acked < window:
                        sock.sendall(chunks[sent])
                        sent += 1
                    acked += len(decoder.feed(sock.recv(65536)))
                after = _cpu_seconds(proc.pid)
            return (after - before) / events * 1e6
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", required=True, help="a source tree (repeat: A, B, ...)")
    parser.add_argument("--ranges", action="append", choices=("yes", "no"), help="per --src: send pyforward.* ranges")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--per-chunk", type=int, default=700, help="records a chunk (700: ~1 MiB of audit lines)")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ranges = args.ranges or ["no"] * len(args.src)
    chunks = {flag: make_chunks(args.events, args.per_chunk, flag == "yes") for flag in set(ranges)}
    results: dict[int, list[float]] = {i: [] for i in range(len(args.src))}
    for round_ in range(args.rounds):
        for i, src in enumerate(args.src):
            started = time.monotonic()
            value = measure(src, chunks[ranges[i]], args.events, args.window)
            results[i].append(value)
            load = Path("/proc/loadavg").read_text().split()[0]
            print(f"round {round_ + 1} {src} ranges={ranges[i]}: {value:.2f} us/event "
                  f"({time.monotonic() - started:.1f} s, load {load})", flush=True)  # fmt: skip
    for i, src in enumerate(args.src):
        print(f"{src} ranges={ranges[i]}: median {statistics.median(results[i]):.2f} us/event {results[i]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
