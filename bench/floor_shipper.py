"""The steady scenario's floor: the least a shipper must do per chunk, in the plainest asyncio loop.

Every `flush_interval` it wakes, reads what the log grew by with the tailer's own read_plain (fstat + pread + the
4 KiB head pread that notices a copy-truncate), cuts complete lines, turns each into a Forward entry with pyforward's
own EntryEncoder, builds one gzip'ed CompressedPackedForward chunk with pyforward's own build_chunk, writes it to the
TLS connection, and stats the log's path (a rotation check). That is all: no acks read (the socket is not watched,
so they wait in the kernel, as they do in `pyforward run` between its reads of held acks; fine for a window of
minutes, not hours), no checkpoint, no retry, no rotation handling, no supervision, no metrics. Not a shipper anyone
should run: a lower bound that `pyforward run`'s steady CPU is shown against (bench/README.md, "steady: the floor"),
measured by the same harness with the same events, sink and certificates. Configured by the environment
`bench.harness.Shipper` gives `pyforward run`.
"""

from __future__ import annotations

import asyncio
import os
import signal

from pyforward.checkpoint import FINGERPRINT_BYTES
from pyforward.connection import tls_material
from pyforward.protocol import EventTime, build_chunk
from pyforward.records import EntryEncoder, RecordParser
from pyforward.settings import Settings, load_settings
from pyforward.tail.file import read_plain
from pyforward.transport import Destination, open_stream, socket_transport


async def ship(settings: Settings) -> None:
    tls = tls_material(settings)
    assert tls is not None, "the floor shipper speaks TLS only (as the steady scenario does)"
    tls.load()
    destination = Destination(
        host=str(settings.host), port=settings.port, tls=tls, server_name=settings.effective_server_name
    )
    _, writer = await open_stream(destination)  # pyforward's own TLS transport, as `pyforward run` has it
    raw = socket_transport(writer)
    assert raw is not None
    raw.pause_reading()  # no wakeup per ack
    fd = os.open(settings.log_path, os.O_RDONLY)
    head = os.pread(fd, FINGERPRINT_BYTES, 0)
    encode = EntryEncoder(RecordParser(time_key=settings.time_key)).encode
    compress = settings.compress == "gzip"
    offset = seq = 0
    while True:
        await asyncio.sleep(settings.flush_interval)
        size = os.fstat(fd).st_size
        if size <= offset:
            continue
        result = read_plain(fd, offset, size - offset, head, size)
        if result.truncated:
            raise SystemExit("floor shipper: the log was truncated (not handled here)")
        if len(head) < FINGERPRINT_BYTES:  # (the tailer keeps what it reads: Source.add_to_head)
            head = os.pread(fd, FINGERPRINT_BYTES, 0)
        data = result.data
        end = data.rfind(b"\n")
        if end < 0:
            continue
        now = EventTime.now()
        entries = [encode(line, now) for line in data[:end].split(b"\n")]
        offset += end + 1
        chunk = build_chunk(
            settings.tag, b"".join(entries), len(entries), size=end + 1, compress=compress, position=seq
        )
        seq += 1
        writer.write(chunk.payload)
        os.stat(settings.log_path)


def main() -> None:
    settings = load_settings()
    loop = asyncio.new_event_loop()
    task = loop.create_task(ship(settings))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()


if __name__ == "__main__":
    main()
