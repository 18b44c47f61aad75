"""A lean Forward receiver for the benchmark: TLS (client certificate required), acks, no output file.

`pyforward receive` decodes every entry into a dict and renders it as a JSON line: that is its job, and at
50,000 events/s it would take most of the second core of a 2-core machine away from the shipper being
measured. This sink does the least a receiver must do to prove delivery:

* reads the outer request (``[tag, entries, {"size", "chunk", "compressed"}]``) with msgpack,
* gunzips the entries and counts them (the ``auditID`` keys, cross-checked with the ``size`` option),
* acks (``{"ack": chunk}``), optionally after a delay (``--ack-delay``: the slow receiver of the backlog
  scenario; then it does not gunzip at all, as a receiver that only queues),
* with ``--ids FILE``, decodes every entry and records, per auditID, when the ack was written (time.time()),
  written to FILE at exit (the latency scenario).
* with ``--seen FILE``, decodes every entry and sets, in a bitmap, the bit of the event's index (the last
  group of auditgen's auditIDs, hex): compact for millions of events. FILE is read at start if it exists and
  written at exit, so that a sink restarted on the same ``--port`` (the soak scenario's receiver restarts)
  goes on from its predecessors: ``done`` means ``--expect`` distinct events acked, whatever the restarts;
  events acked again are counted as duplicates.

It talks to its parent on stdout, one JSON object per line: ``listening`` (port), ``first`` (the first request
arrived), ``done`` (``--expect`` events acked), ``stats`` at exit (SIGTERM), with its own CPU seconds.
Standalone on purpose (stdlib + msgpack): run as ``python bench/sink.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import ssl
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack

_AUDIT_ID_KEY = b"\xa7auditID"  # msgpack fixstr "auditID"


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Stats:
    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.requests = 0
        self.records = 0  # counted in the data
        self.declared = 0  # the size options
        self.wire_bytes = 0
        self.raw_bytes = 0  # msgpack entries after gunzip
        self.first: float | None = None
        self.done: float | None = None
        self.connections = 0
        self.acked_at: dict[str, float] = {}
        self.seen: bytearray | None = None  # --seen: bit i = event index i acked
        self.distinct = 0  # --seen: bits set (this run and its predecessors)
        self.duplicates = 0  # --seen: entries acked whose bit was already set


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats, ack_delay: float, record_ids: bool) -> None:
        self.stats = stats
        self.ack_delay = ack_delay
        self.record_ids = record_ids
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        stats = self.stats
        stats.wire_bytes += len(data)
        self.unpacker.feed(data)
        for message in self.unpacker:
            self.request(message)

    def request(self, message: Any) -> None:
        stats = self.stats
        if stats.first is None:
            stats.first = time.time()
            emit("first", t=stats.first)
        if not (isinstance(message, list) and len(message) == 3 and isinstance(message[2], dict)):
            raise SystemExit(f"sink: unexpected message {str(message)[:80]}")
        _tag, entries, options = message
        stats.requests += 1
        chunk = options.get("chunk")
        declared = int(options.get("size", 0))
        ids: list[str] = []
        if self.ack_delay <= 0 or self.record_ids or stats.seen is not None:
            data = zlib.decompress(entries, 31) if options.get("compressed") == "gzip" else bytes(entries)
            stats.raw_bytes += len(data)
            if self.record_ids or stats.seen is not None:
                ids = _ids(data)
                counted = len(ids)
            else:
                counted = data.count(_AUDIT_ID_KEY)
            if counted != declared:
                emit("error", message=f"request declares {declared} entries, holds {counted}")
        else:
            counted = declared
        stats.declared += declared
        if chunk is None:
            return
        ack = msgpack.packb({"ack": chunk})
        if self.ack_delay > 0:
            asyncio.get_running_loop().call_later(self.ack_delay, self.ack, ack, counted, ids)
        else:
            self.ack(ack, counted, ids)

    def ack(self, ack: bytes, counted: int, ids: list[str]) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the client sends it again on its next connection
        self.transport.write(ack)
        stats = self.stats
        stats.records += counted
        if ids and stats.seen is not None:
            seen = stats.seen
            for audit_id in ids:
                index = int(audit_id.rpartition("-")[2], 16)
                byte, bit = index >> 3, 1 << (index & 7)
                if byte >= len(seen):
                    seen.extend(bytes(byte + 1 - len(seen) + (1 << 16)))
                if seen[byte] & bit:
                    stats.duplicates += 1
                else:
                    seen[byte] |= bit
                    stats.distinct += 1
        elif ids:
            now = time.time()
            for audit_id in ids:
                stats.acked_at.setdefault(audit_id, now)
        acked = stats.distinct if stats.seen is not None else stats.records
        if stats.done is None and stats.expect and acked >= stats.expect:
            stats.done = time.time()
            emit("done", t=stats.done, records=stats.records)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _ids(data: bytes) -> list[str]:
    unpacker = msgpack.Unpacker(None, raw=False)
    unpacker.feed(data)
    return [entry[1]["auditID"] for entry in unpacker]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def serve(args: argparse.Namespace) -> Stats:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(args.ca))
    context.load_cert_chain(str(args.cert), str(args.key))
    context.verify_mode = ssl.CERT_REQUIRED
    stats = Stats(args.expect)
    if args.seen is not None:
        stats.seen = bytearray(args.seen.read_bytes()) if args.seen.exists() else bytearray()
        stats.distinct = int.from_bytes(stats.seen, "little").bit_count()
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 30
    while True:
        try:
            server = await loop.create_server(
                lambda: SinkProtocol(stats, args.ack_delay, args.ids is not None),
                "127.0.0.1",
                args.port,
                ssl=context,
                reuse_address=True,
            )
            break
        except OSError as e:
            # A restart on the same port: the previous sink's socket may still be closing.
            if args.port == 0 or time.monotonic() > deadline:
                raise SystemExit(f"sink: cannot listen on port {args.port}: {e}") from None
            await asyncio.sleep(0.1)  # retrying the bind, not synchronisation
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    emit("listening", port=server.sockets[0].getsockname()[1])
    if stats.expect and stats.distinct >= stats.expect:  # --seen: a predecessor acked the last ones
        stats.done = time.time()
        emit("done", t=stats.done, records=stats.records)
    await stop.wait()
    server.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/sink.py", description=__doc__.splitlines()[0])
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--expect", type=int, default=0, help="say 'done' once this many events are acked")
    parser.add_argument("--ack-delay", type=float, default=0.0, help="seconds between a request and its ack")
    parser.add_argument("--ids", type=Path, default=None, help="write 'auditID ack-time' lines here at exit")
    parser.add_argument("--seen", type=Path, default=None, help="bitmap of acked event indices, read and written")
    parser.add_argument("--port", type=int, default=0, help="listen here (default: any free port)")
    args = parser.parse_args(argv)
    stats = asyncio.run(serve(args))
    if args.ids is not None:
        args.ids.write_text("".join(f"{k} {v:.6f}\n" for k, v in stats.acked_at.items()))
    if args.seen is not None and stats.seen is not None:
        partial = args.seen.with_name(args.seen.name + ".partial")
        partial.write_bytes(stats.seen)
        partial.replace(args.seen)
    emit(
        "stats",
        requests=stats.requests,
        records=stats.records,
        declared=stats.declared,
        wire_bytes=stats.wire_bytes,
        raw_bytes=stats.raw_bytes,
        connections=stats.connections,
        distinct=stats.distinct,
        duplicates=stats.duplicates,
        cpu=cpu_seconds(),
        max_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
