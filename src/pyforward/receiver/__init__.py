"""`pyforward receive`: an asyncio Forward receiver that writes every event as one JSON line.

It is the in-cluster end of the audit pipeline (what the audit-tailer prints) and the benchmark's sink, so it
must be correct first (ack only what is written, exactly once per chunk id) and never the bottleneck.

Model: fluentd's in_forward (shared/reference/forward-protocol.md, "Malformed input at the receiver"):
* a value that is not an array is logged and skipped, the connection is kept;
* a msgpack or gzip error, or a request over a size limit, closes the connection without an ack: the
  client's retry is the recovery path;
* an ack (``{"ack": chunk}``) is sent only after the request's events are written *and flushed* to the
  output. A write error means no ack and the connection is closed.
* A retried chunk id (fluent-bit derives it from the payload, our client re-sends unacked chunks with the
  same id) that was acked recently is acked again without writing its events a second time.

Writes from all connections go through one writer task that joins whatever is queued into one
``write`` + ``flush`` in a worker thread (group commit): a slow stdout pipe never blocks the event loop,
and many small requests (Message mode) cost one flush per batch, not one per request.

Performance (it must keep up with 50k events/s on one core): decoding and rendering a request run with the
cyclic GC paused (see ``_receive``), records are rendered with orjson in one pass, nothing is flushed per
record. TLS is started per accepted socket with the context of the moment, so renewed certificates apply
to new connections without a restart (certs.py).

Exactly once (issue 22): a request from `pyforward run` says which file its records came from and the bytes each
covers (``pyforward.*`` options); the receiver keeps per source the end of what it has written and acks, without
writing them, the records that end at or before it (`dedup`), the marks kept across restarts in a file of one sector
per source (`markfile`). Every batch records there the output's length too, and start-up cuts what a killed receiver
wrote beyond it but never acked (`recovery`).

Modules: `config` (settings, counters), `output` (the writer), `server` (Receiver), `dedup`, `markfile` and `recovery`
(exactly once), `listen` (sockets, rate-limited log), `metrics` (``--metrics-bind``), `cli` (`pyforward receive`).
"""

from __future__ import annotations

from pyforward.receiver.cli import configure_parser, receive_command
from pyforward.receiver.config import ReceiverConfig, ReceiverStats
from pyforward.receiver.output import OutputError
from pyforward.receiver.server import Receiver

__all__ = [
    "OutputError",
    "Receiver",
    "ReceiverConfig",
    "ReceiverStats",
    "configure_parser",
    "receive_command",
]
