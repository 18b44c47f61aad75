"""`pyforward send`: JSON lines from a file or stdin -> acked chunks -> exit 0 only when all were acked."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import IO, Any

from pyforward.chunks import ByteBudget
from pyforward.client import ForwardClient
from pyforward.connection import StartupError, client_config, connection_material
from pyforward.protocol import Chunk, EntryPacker, build_chunk
from pyforward.records import RecordParser, RecordStats
from pyforward.settings import Settings
from pyforward.transport import Destination, open_stream


def _lines(stream: IO[bytes], max_line: int) -> Iterator[tuple[bytes, int | None, int]]:
    """(line, truncated_from, source bytes) for every complete or final line; long lines are cut, not dropped."""
    rest = b""
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for line in parts:
            if len(line) > max_line:
                yield line[:max_line], len(line), len(line) + 1
            else:
                yield line, None, len(line) + 1
    if rest:
        yield (rest[:max_line], len(rest), len(rest)) if len(rest) > max_line else (rest, None, len(rest))


async def send_file(settings: Settings, path: str, *, timeout: float, progress: bool) -> int:
    assert settings.host
    try:
        material, proxy = connection_material(settings)
    except StartupError as exc:
        print(f"pyforward send: {exc}", file=sys.stderr)
        return 2
    destination = Destination(
        host=settings.host, port=settings.port, tls=material, server_name=settings.tls_server_name
    )

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await open_stream(destination, proxy, timeout=settings.connect_timeout)

    budget = ByteBudget(settings.max_inflight_bytes)
    bar: Any = None
    acked_records = 0

    def on_ack(chunk: Chunk, latency: float) -> None:
        nonlocal acked_records
        acked_records += chunk.records
        budget.release(chunk.size)
        if bar is not None:
            bar.update(chunk.size)

    client = ForwardClient(connect, client_config(settings), on_ack=on_ack)
    stats = RecordStats()
    parser = RecordParser(time_key=settings.time_key, stats=stats)
    packer = EntryPacker()
    compress = settings.compress == "gzip"
    records = chunks = 0
    started = time.monotonic()
    with ExitStack() as stack:
        stream: IO[bytes]
        if path == "-":
            stream = sys.stdin.buffer
        else:
            try:
                stream = stack.enter_context(open(path, "rb"))
            except OSError as exc:
                print(f"pyforward send: cannot read {path}: {exc.strerror}", file=sys.stderr)
                return 2
            if progress and sys.stderr.isatty():
                import os

                from tqdm import tqdm

                bar = stack.enter_context(
                    tqdm(
                        total=os.fstat(stream.fileno()).st_size,
                        unit="B",
                        unit_scale=True,
                        desc="acked",
                        file=sys.stderr,
                    )
                )
        client.start()
        entries: list[bytes] = []
        size = 0

        async def flush() -> None:
            nonlocal entries, size, chunks
            if not entries:
                return
            await budget.acquire(size)
            blob = b"".join(entries)
            chunk = build_chunk(
                settings.tag, blob, len(entries), size=size, compress=compress, level=settings.compress_level
            )
            client.submit(chunk)
            chunks += 1
            entries, size = [], 0

        try:
            async with asyncio.timeout(timeout):
                for line, truncated_from, source in _lines(stream, settings.max_line_bytes):
                    if not line.strip() and truncated_from is None:
                        continue  # blank lines carry no record
                    t, record = parser.parse(line, truncated_from=truncated_from)
                    entries.append(packer.pack_entry(t, record))
                    size += source
                    records += 1
                    if size >= settings.chunk_max_bytes or len(entries) >= settings.chunk_max_records:
                        await flush()
                await flush()
                await client.drain()
        except TimeoutError:
            pass
        finally:
            await client.close()
    elapsed = max(time.monotonic() - started, 1e-9)
    not_json = stats.parse_errors + stats.not_objects
    note = f'; {not_json} line(s) were not JSON objects and went as {{"log": line}}' if not_json else ""
    if acked_records == records:
        print(
            f"pyforward send: {records} record(s) in {chunks} chunk(s) acked by {settings.host}:{settings.port} "
            f"in {elapsed:.2f}s ({records / elapsed:,.0f}/s){note}",
            file=sys.stderr,
        )
        return 0
    error = client.stats.last_error or "no ack"
    print(
        f"pyforward send: only {acked_records} of {records} record(s) acked within {timeout:g}s "
        f"(last error: {error}){note}",
        file=sys.stderr,
    )
    return 1
