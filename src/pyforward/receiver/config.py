"""The receiver's settings and counters (ReceiverConfig, ReceiverStats) and the logger its modules share."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyforward.certs import TLSMaterial

log = logging.getLogger("pyforward.receiver")

OutputFormat = Literal["record", "full"]

ENV_SHARED_KEY = "PYFORWARD_RECEIVER_SHARED_KEY"
ENV_USERS = "PYFORWARD_RECEIVER_USERS"


@dataclass
class ReceiverConfig:
    """Everything a :class:`Receiver` needs. ``port`` 0 binds a free port (see :meth:`Receiver.start`)."""

    host: str = "127.0.0.1"
    port: int = 24224
    tls: TLSMaterial | None = None
    shared_key: str | None = field(default=None, repr=False)
    # username -> password; user auth (HELO auth salt, checked PING user digest) when non-empty.
    users: dict[str, str] = field(default_factory=dict, repr=False)
    self_hostname: str = field(default_factory=socket.gethostname)
    output: Path | None = None  # stdout when None
    output_format: OutputFormat = "record"
    max_request_bytes: int = 16 << 20
    max_decompressed_bytes: int = 256 << 20
    max_connections: int = 1024
    idle_timeout: float = 300.0  # slowloris: a connection that sends nothing for this long is closed
    dedup_ids: int = 100_000  # recently acked chunk ids remembered (0: no dedup)
    handshake_timeout: float = 10.0  # TLS plus shared-key handshake
    max_entries: int = 1_000_000  # entries per request
    # Exactly once (issue 22, dedup.py): records a sender marks with pyforward.* ranges that end at or before what is
    # written for their source are acked and not written again.
    exactly_once: bool = True
    dedup_state: Path | None = None  # where the marks are kept across restarts (None: in memory only)
    dedup_max_sources: int = 4096
    dedup_forget_after: float = 7 * 86400.0  # seconds a source may stay idle before it is forgotten
    sync: bool = False  # fdatasync the output, then the state, before each ack (power loss)


@dataclass
class ReceiverStats:
    """Counters since start. ``connections`` counts accepted connections (``active_connections``: open now)."""

    connections: int = 0
    requests: int = 0
    records: int = 0
    acks: int = 0
    duplicate_chunks: int = 0
    bad_requests: int = 0
    skipped_entries: int = 0
    auth_failures: int = 0
    active_connections: int = 0
    rejected_connections: int = 0
    evicted_connections: int = 0  # idle connections closed at the cap to make room
    write_errors: int = 0
    bad_ranges: int = 0  # requests whose pyforward.* ranges made no sense (connection closed)
