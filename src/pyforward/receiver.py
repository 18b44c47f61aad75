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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from pyforward.certs import CertError, TLSFiles, TLSMaterial
from pyforward.protocol import (
    EventTime,
    HealthCheck,
    Helo,
    NotArray,
    Ping,
    ProtocolError,
    Request,
    ServerDecoder,
    encode_ack,
    encode_helo,
    encode_pong,
    make_helo,
    make_pong,
    verify_ping,
)
from pyforward.records import to_json_line

__all__ = [
    "OutputError",
    "Receiver",
    "ReceiverConfig",
    "ReceiverStats",
    "configure_parser",
    "receive_command",
]

log = logging.getLogger("pyforward.receiver")

OutputFormat = Literal["record", "full"]

ENV_SHARED_KEY = "PYFORWARD_RECEIVER_SHARED_KEY"
ENV_USERS = "PYFORWARD_RECEIVER_USERS"

# One read per wakeup. Large enough that a 1 MiB chunk arrives in a few reads, small enough to bound what a
# connection holds besides the decoder's own (size-limited) buffer.
_READ_SIZE = 256 << 10
# StreamReader pauses the socket above 2 * limit of unread data.
_STREAM_LIMIT = 1 << 20
# How long a closing connection may take to say goodbye (TLS close_notify) before it is aborted.
_CLOSE_TIMEOUT = 2.0
# At the connection cap, a connection idle at least this long is closed to make room for a new one.
_EVICT_MIN_IDLE = 1.0
# On shutdown, how long requests being written may take to be written and acked.
_DRAIN_TIMEOUT = 5.0


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


# ----------------------------------------------------------------------------------------------- logging


class _RateLimitedLog:
    """At most ``burst`` messages per ``interval`` seconds per kind; then one line saying how many were dropped.

    A misbehaving peer reconnecting in a loop must not flood the receiver's log (or its disk).
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 5) -> None:
        self._log = logger
        self._interval = interval
        self._burst = burst
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, emitted, suppressed]

    def __call__(self, level: int, kind: str, msg: str, *args: object) -> None:
        if not self._log.isEnabledFor(level):
            return
        now = time.monotonic()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= self._interval:
            if window is not None and window[2]:
                self._log.log(
                    level, "%d more %s messages suppressed in the last %.0f s", window[2], kind, now - window[0]
                )
            window = self._windows[kind] = [now, 0, 0]
        if window[1] < self._burst:
            window[1] += 1
            self._log.log(level, msg, *args)
        else:
            window[2] += 1


# ----------------------------------------------------------------------------------------------- output


class _Writer:
    """Serialises writes of all connections; each ``submit`` resolves once its bytes are written and flushed.

    Batches everything queued while the previous write was in the worker thread into one write (group commit).
    A file we open is written unbuffered with ``os.write`` (the batch is the buffer): if a write fails half-way
    (ENOSPC), the file is cut back to its last complete line, so the client's retry appends to a clean file.
    Standard output is a buffered binary stream: write + flush.
    """

    def __init__(self, output: Path | None) -> None:
        self._fd: int | None = None
        self._stream: IO[bytes] | None = None
        self._regular = False
        if output is None:
            self._stream = sys.stdout.buffer
        else:
            try:
                self._fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(exc.errno, f"cannot open output {output}: {_reason(exc).lower()}") from None
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pyforward-receiver-writer")

    def submit(self, data: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(OSError("the receiver is closing"))
            return future
        self._queue.append((data, future))
        self._wakeup.set()
        return future

    def _write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            assert self._stream is not None
            self._stream.write(data)
            self._stream.flush()
            return
        end = os.fstat(fd).st_size if self._regular else None
        view = memoryview(data)
        try:
            while view:
                view = view[_os_write(fd, view) :]
        except OSError:
            if end is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
            raise

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if batch:
                data = batch[0][0] if len(batch) == 1 else b"".join(item[0] for item in batch)
                try:
                    await asyncio.to_thread(self._write, data)
                except Exception as exc:  # an OSError in practice; anything else must not kill the writer
                    error = exc if isinstance(exc, OSError) else OSError(str(exc))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
            if self._closing and not self._queue:
                return

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            elif self._stream is not None:
                self._stream.flush()
        except OSError as exc:
            log.error("closing the output failed: %s", _reason(exc))


_os_write = os.write  # a seam for the partial-write test

_RFC3339_SECONDS: dict[int, str] = {}
_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def _rfc3339(seconds: int, nanoseconds: int) -> str:
    prefix = _RFC3339_SECONDS.get(seconds)
    if prefix is None:
        if len(_RFC3339_SECONDS) > 4096:
            _RFC3339_SECONDS.clear()
        prefix = _RFC3339_SECONDS[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{prefix}.{nanoseconds:09d}Z"


def _json_string(value: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # a lone surrogate (invalid UTF-8 from the peer): same repair as the records
        return to_json_line({"": value})[4:-2]


def render(request: Request, output_format: OutputFormat) -> bytes:
    """The output bytes of one request: one JSON line per entry."""
    entries = request.entries
    if output_format == "record":
        try:  # the common case in one pass, without a Python call per record
            return b"".join([_dumps(entry.record, option=_NEWLINE) for entry in entries])
        except TypeError:  # orjson's error: a lone surrogate, a non-str key... (records.py repairs those)
            return b"".join([to_json_line(entry.record) for entry in entries])
    head = b'{"tag":' + _json_string(request.tag) + b',"time":"'
    parts: list[bytes] = []
    for entry in entries:
        stamp: EventTime = entry.time
        parts.append(
            head
            + _rfc3339(stamp.seconds, stamp.nanoseconds).encode("ascii")
            + b'","record":'
            + to_json_line(entry.record)[:-1]
            + b"}\n"
        )
    return b"".join(parts)


# ----------------------------------------------------------------------------------------------- receiver


# A queued request: its chunk id (None: no ack wanted), its record count, and the write to wait for.
_Pending = tuple[bytes | None, int, "asyncio.Future[None]"]


class OutputError(OSError):
    """The output file cannot be opened (``str()`` is one line naming it)."""

    def __str__(self) -> str:
        return str(self.strerror)


class _Closed(Exception):
    """Ends one connection; the reason has been logged."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _address(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "<disconnected>"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


async def _listen(host: str, port: int, backlog: int = 512) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (as asyncio.start_server; port 0: the first one's port)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(listeners) > 1:  # the same free port on every address
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {(exc.strerror or '').lower()}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


class Receiver:
    """The Forward receiver. ``await start()``, then ``await serve_forever()`` (until ``close()``)."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self.stats = ReceiverStats()
        self._listeners: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._writer: _Writer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        # Connections in a state where closing them loses nothing (TLS handshake, waiting for data), with the
        # loop time since when: at the connection cap the one idle the longest makes room (slowloris).
        self._idle: dict[asyncio.Task[Any], float] = {}
        self._evicted: set[asyncio.Task[Any]] = set()  # cancelled to make room, not finished yet
        self._closed = asyncio.Event()
        self._closing = False
        # Chunk ids acked recently (LRU), and the writes in flight by chunk id: a retry of a chunk still being
        # written waits for that write rather than writing the events again.
        self._acked: OrderedDict[bytes, None] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[None]] = {}
        self._ratelimited = _RateLimitedLog(log)
        self._shared_key = config.shared_key
        self._users = dict(config.users)
        self._hostname = config.self_hostname

    @property
    def mode(self) -> str:
        """``plain``, ``tls`` or ``mtls`` (client certificates required)."""
        if self.config.tls is None:
            return "plain"
        return "mtls" if self.config.tls.require_client_cert else "tls"

    async def start(self) -> int:
        """Load the TLS material, open the output, listen. Returns the bound port.

        Raises :class:`CertError` for unusable certificates, :class:`OutputError` for the output file and
        ``OSError`` for the address.
        """
        config = self.config
        if config.tls is not None:
            config.tls.load()
        writer = _Writer(config.output)
        try:
            self._listeners = await _listen(config.host, config.port)
        except BaseException:
            await writer.close()
            raise
        self._writer = writer
        writer.start()
        loop = asyncio.get_running_loop()
        self._accepting = [
            loop.create_task(self._accept(sock), name=f"pyforward-receiver-accept-{n}")
            for n, sock in enumerate(self._listeners)
        ]
        port = int(self._listeners[0].getsockname()[1])
        log.debug(
            "listening on %s:%d (%s%s%s)",
            config.host,
            port,
            self.mode,
            ", shared key" if self._shared_key is not None else "",
            f", {len(self._users)} users" if self._users else "",
        )
        return port

    async def serve_forever(self) -> None:
        """Return once :meth:`close` has finished."""
        await self._closed.wait()

    async def close(self, grace: float = _DRAIN_TIMEOUT) -> None:
        """Stop listening and close every connection, then flush and close the output.

        A connection waiting for data is closed at once. One with requests being written gets up to ``grace``
        seconds to write them and send their acks: an event written but not acked would be sent again by
        the client and so be written twice (the dedup memory does not outlive the process).
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            for accepting in self._accepting:
                accepting.cancel()
            await asyncio.gather(*self._accepting, return_exceptions=True)
            for sock in self._listeners:
                sock.close()
            for task in list(self._connections):
                if task in self._idle:
                    task.cancel()
            if self._connections:
                _, busy = await asyncio.wait(set(self._connections), timeout=grace)
                for task in busy:
                    task.cancel()
                if busy:
                    await asyncio.gather(*busy, return_exceptions=True)
            if self._writer is not None:
                await self._writer.close()
        finally:
            self._closed.set()

    # -- connections -----------------------------------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: the listener stays, the peer will retry
                self._ratelimited(logging.ERROR, "accept", "accepting a connection failed: %s", _reason(exc))
                await asyncio.sleep(0.1)  # not a busy loop while out of file descriptors
                continue
            if not self._closing and self._open_connections() >= self.config.max_connections:
                self._evict_idlest(loop.time())
            if self._closing or self._open_connections() >= self.config.max_connections:
                self.stats.rejected_connections += 1
                self._ratelimited(
                    logging.WARNING,
                    "connection-cap",
                    "refused connection from %s: %d connections open (limit %d)",
                    _address(sock),
                    len(self._connections),
                    self.config.max_connections,
                )
                sock.close()
                continue
            task = loop.create_task(self._connection(sock))
            self._connections.add(task)
            self._idle[task] = loop.time()

    def _open_connections(self) -> int:
        return len(self._connections) - len(self._evicted)

    def _evict_idlest(self, now: float) -> None:
        """At the cap, close the connection that has waited for data the longest (at least _EVICT_MIN_IDLE s).

        Refusing the newcomer instead would let a peer that opens max_connections connections and sends nothing
        (slowloris) lock every client out for idle_timeout. An idle connection loses nothing when closed: it
        has no request in progress, and a client with nothing to send just reconnects.
        """
        candidates = [(since, task) for task, since in self._idle.items() if task not in self._evicted]
        if not candidates:
            return
        since, victim = min(candidates, key=lambda item: item[0])
        if now - since < _EVICT_MIN_IDLE:
            return
        self._evicted.add(victim)
        victim.cancel()
        self.stats.evicted_connections += 1
        self._ratelimited(
            logging.WARNING,
            "connection-cap",
            "%d connections open (limit %d): closed the one idle the longest (%.0f s) to accept a new one",
            len(self._connections),
            self.config.max_connections,
            now - since,
        )

    async def _connection(self, sock: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = _address(sock)
        self.stats.connections += 1
        self.stats.active_connections += 1
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await self._open(sock, peer)
            await self._serve(reader, writer, peer)
        except _Closed:
            pass
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except Exception as exc:  # never let one connection take the receiver down
            self._ratelimited(logging.ERROR, "internal", "connection from %s failed: %r", peer, exc)
            log.debug("connection from %s failed", peer, exc_info=True)
        finally:
            self.stats.active_connections -= 1
            self._connections.discard(task)
            self._idle.pop(task, None)
            self._evicted.discard(task)
            if writer is not None:
                await self._close_connection(writer)
            else:
                sock.close()

    async def _open(self, sock: socket.socket, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams over the accepted socket; TLS with the current context (certificates reloaded on change).

        TLS is started per connection, not by a server: every connection gets ``TLSMaterial.context()``
        of the moment, and a failed handshake is ours to log.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        tls = self.config.tls
        if tls is None:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        else:
            try:
                context = tls.context()
            except CertError as exc:  # only if nothing could ever be loaded; start() loads first
                self._ratelimited(logging.ERROR, "tls", "refused TLS connection from %s: %s", peer, exc)
                raise _Closed from None
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=context, ssl_handshake_timeout=self.config.handshake_timeout
                )
            except (OSError, TimeoutError, EOFError) as exc:  # ssl.SSLError is an OSError
                self._ratelimited(logging.WARNING, "tls", "TLS handshake with %s failed: %s", peer, _reason(exc))
                raise _Closed from None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _close_connection(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)
        except (Exception, asyncio.CancelledError):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.handshake_timeout
        decoder = ServerDecoder(
            max_request_bytes=config.max_request_bytes,
            max_decompressed_bytes=config.max_decompressed_bytes,
            max_entries=config.max_entries,
        )
        helo: Helo | None = None
        if self._shared_key is not None:
            helo = make_helo(user_auth=bool(self._users))
            writer.write(encode_helo(helo))
        task = asyncio.current_task()
        assert task is not None
        while True:
            if self._closing:
                return
            self._idle[task] = loop.time()
            if helo is not None:
                timeout = deadline - loop.time()
                what = "handshake"
            else:
                timeout = config.idle_timeout
                what = "idle"
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), max(timeout, 0.0))
            except TimeoutError:
                self._ratelimited(
                    logging.INFO,
                    "timeout",
                    "closing connection from %s: %s timeout (%.0f s)",
                    peer,
                    what,
                    config.handshake_timeout if helo is not None else config.idle_timeout,
                )
                return
            except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError; a reset is not worth a warning
                log.debug("connection from %s: read failed: %s", peer, _reason(exc))
                return
            if not data:
                return
            self._idle.pop(task, None)
            if helo is not None:
                events = self._decode(decoder, data, peer)
                if not events:
                    continue
                await self._handshake(events[0], helo, writer, peer)
                helo = None
                pending, fatal = self._dispatch(events[1:], peer)
                del events
            else:
                pending, fatal = self._receive(decoder, data, peer)
            if pending:
                await self._ack(pending, writer, peer)
            if fatal:
                raise _Closed

    async def _handshake(self, event: object, helo: Helo, writer: asyncio.StreamWriter, peer: str) -> None:
        """The first message after our HELO must be a PING that proves the shared key (and the user)."""
        assert self._shared_key is not None
        if not isinstance(event, Ping):
            self.stats.auth_failures += 1
            self._ratelimited(
                logging.WARNING,
                "auth",
                "closing connection from %s: data before the handshake (a shared key is required)",
                peer,
            )
            raise _Closed
        reason = verify_ping(event, nonce=helo.nonce, shared_key=self._shared_key, auth=helo.auth, users=self._users)
        if reason is None and event.hostname == self._hostname.encode("utf-8"):
            # Spec: a peer with our own hostname is a forwarding loop or a copied configuration.
            reason = "same hostname between input and output: invalid configuration"
        pong = make_pong(
            event,
            ok=reason is None,
            reason=reason or "",
            nonce=helo.nonce,
            hostname=self._hostname,
            shared_key=self._shared_key,
        )
        writer.write(encode_pong(pong))
        if reason is None:
            return
        self.stats.auth_failures += 1
        self._ratelimited(
            logging.WARNING,
            "auth",
            "handshake with %s (hostname %r, user %r) failed: %s",
            peer,
            _text(event.hostname),
            _text(event.username),
            reason,
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), _CLOSE_TIMEOUT)
        raise _Closed

    def _decode(self, decoder: ServerDecoder, data: bytes, peer: str) -> list[Ping | Request | HealthCheck | NotArray]:
        try:
            return decoder.feed(data)
        except ProtocolError as exc:
            self.stats.bad_requests += 1
            self._ratelimited(logging.WARNING, "protocol", "closing connection from %s: %s", peer, _reason(exc))
            raise _Closed from None

    def _receive(self, decoder: ServerDecoder, data: bytes, peer: str) -> tuple[list[_Pending], bool]:
        """Decode, render and queue for writing, with the cyclic GC paused.

        A 2000-record chunk allocates ~100k containers; each GC pass would traverse all of them while they are
        alive (measured: a quarter of the receiver's CPU). They hold no cycles and are freed by reference
        counting before the GC is resumed, so pausing it here loses nothing.
        """
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            return self._dispatch(self._decode(decoder, data, peer), peer)
        finally:
            if paused:
                gc.enable()

    def _dispatch(
        self, events: list[Ping | Request | HealthCheck | NotArray], peer: str
    ) -> tuple[list[_Pending], bool]:
        """Queue the requests' output; returns what to ack (in order) and whether to close the connection after."""
        pending: list[_Pending] = []
        stats = self.stats
        for event in events:
            if type(event) is Request:
                stats.requests += 1
                if event.skipped:
                    stats.skipped_entries += event.skipped
                    self._ratelimited(
                        logging.WARNING,
                        "skipped",
                        "request from %s (tag %r): skipped %d malformed entries",
                        peer,
                        event.tag,
                        event.skipped,
                    )
                pending.append((event.chunk, len(event.entries), self._submit(event)))
            elif type(event) is HealthCheck:
                continue
            elif type(event) is NotArray:
                stats.bad_requests += 1
                self._ratelimited(
                    logging.WARNING,
                    "not-array",
                    "ignored a message from %s that is not an array: %s",
                    peer,
                    _describe(event),
                )
            else:  # a PING after the handshake, or without a shared key configured
                stats.bad_requests += 1
                self._ratelimited(
                    logging.WARNING,
                    "unexpected",
                    "closing connection from %s: unexpected %s%s",
                    peer,
                    type(event).__name__.upper(),
                    "" if self._shared_key is not None else " (no shared key is configured here)",
                )
                # Requests before it still get their ack once written.
                return pending, True
        return pending, False

    def _submit(self, request: Request) -> asyncio.Future[None]:
        chunk = request.chunk
        dedup = chunk is not None and self.config.dedup_ids > 0
        if dedup:
            assert chunk is not None
            if chunk in self._acked:
                self._acked.move_to_end(chunk)
                self.stats.duplicate_chunks += 1
                return _done()
            inflight = self._inflight.get(chunk)
            if inflight is not None:
                self.stats.duplicate_chunks += 1
                return inflight
        payload = render(request, self.config.output_format) if request.entries else b""
        if not payload:
            future = _done()
        else:
            assert self._writer is not None
            future = self._writer.submit(payload)
        count = len(request.entries)
        key = chunk if dedup else None
        if key is not None:
            self._inflight[key] = future
        future.add_done_callback(lambda f: self._written(f, key, count))
        return future

    def _written(self, future: asyncio.Future[None], chunk: bytes | None, count: int) -> None:
        ok = not future.cancelled() and future.exception() is None
        if ok:
            self.stats.records += count
        if chunk is None:
            return
        self._inflight.pop(chunk, None)
        if ok:
            self._acked[chunk] = None
            if len(self._acked) > self.config.dedup_ids:
                self._acked.popitem(last=False)

    async def _ack(self, pending: list[_Pending], writer: asyncio.StreamWriter, peer: str) -> None:
        wrote_ack = False
        for chunk, count, future in pending:
            try:
                # shield: the future may be shared with a retry on another connection.
                await asyncio.shield(future)
            except OSError as exc:
                self.stats.write_errors += 1
                self._ratelimited(
                    logging.ERROR,
                    "write",
                    "writing %d events from %s failed, not acked, closing the connection: %s",
                    count,
                    peer,
                    _reason(exc),
                )
                raise _Closed from None
            if chunk is not None:
                writer.write(encode_ack(chunk))
                self.stats.acks += 1
                wrote_ack = True
        if wrote_ack:
            try:
                # A peer that never reads its acks must not make us buffer them without bound.
                await asyncio.wait_for(writer.drain(), self.config.idle_timeout)
            except TimeoutError:
                self._ratelimited(logging.INFO, "timeout", "closing connection from %s: it does not read acks", peer)
                raise _Closed from None
            except OSError as exc:
                log.debug("connection from %s: write failed: %s", peer, _reason(exc))
                raise _Closed from None


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def _describe(event: NotArray) -> str:
    value = getattr(event, "value", event)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------- CLI


def _bind(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"--bind wants HOST:PORT, not {value!r}")
    port = int(port_text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"--bind port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


def _positive_size(value: str) -> int:
    from pyforward.settings import parse_bytes  # the same size syntax as `pyforward run` (16Mi, 200M, ...)

    try:
        size = parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(size, int) or size < 1:
        raise argparse.ArgumentTypeError(f"not a positive byte size: {value!r}")
    return size


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value!r}")
    return number


def _count(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {number}")
        return number

    return parse


def _user(value: str) -> tuple[str, str]:
    name, sep, password = value.partition(":")
    if not sep or not name or not password:
        # Never echo the value: it holds a password.
        raise argparse.ArgumentTypeError("--user wants NAME:PASSWORD (both non-empty)")
    return name, password


def _env_users(text: str) -> list[tuple[str, str]]:
    users = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if item:
            try:
                users.append(_user(item))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{ENV_USERS} wants NAME:PASSWORD[,NAME:PASSWORD...]") from None
    return users


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `pyforward receive` options to ``parser`` (the subcommand's parser)."""
    parser.description = (
        "Receive Forward-protocol events (fluentd, fluent-bit, pyforward) and write each one as a JSON line. "
        "Requests are acked only after their events are written and flushed."
    )
    parser.add_argument(
        "--bind",
        type=_bind,
        default=("127.0.0.1", 24224),
        metavar="HOST:PORT",
        help="Address to listen on; port 0 picks a free port, :PORT listens on all IPv4 addresses "
        "(default 127.0.0.1:24224). IPv6: [::1]:24224.",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="Server certificate (PEM, chain allowed); enables TLS."
    )
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="Private key of --tls-cert (PEM).")
    tls.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="CA bundle for client certificates: with it, clients must present a certificate it signed (mTLS).",
    )
    auth = parser.add_argument_group("Authentication")
    auth.add_argument(
        "--shared-key",
        metavar="KEY",
        default=None,
        help=f"Forward shared key: clients must complete the HELO/PING/PONG handshake before sending data. "
        f"Also read from ${ENV_SHARED_KEY} (preferred: a command line is visible to other users).",
    )
    auth.add_argument(
        "--user",
        type=_user,
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help=f"Require user auth in the handshake (needs a shared key); repeatable. Also read from ${ENV_USERS} "
        "as comma-separated NAME:PASSWORD pairs.",
    )
    auth.add_argument(
        "--self-hostname",
        default=None,
        metavar="NAME",
        help="Hostname this receiver sends in its PONG (default: this machine's hostname).",
    )
    out = parser.add_argument_group("Output")
    out.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="Append the JSON lines to FILE (default: standard output).",
    )
    out.add_argument(
        "--format",
        choices=("record", "full"),
        default="record",
        help='"record": each record alone, one JSON object per line (as the audit-tailer prints); "full": '
        '{"tag": ..., "time": "<RFC 3339, nanoseconds, UTC>", "record": {...}} (default: record).',
    )
    limits = parser.add_argument_group("Limits")
    defaults = ReceiverConfig()
    limits.add_argument(
        "--max-request-bytes",
        type=_positive_size,
        default=defaults.max_request_bytes,
        metavar="N",
        help="Largest request on the wire; a bigger one closes the connection without an ack "
        "(default 16Mi; sizes like 1048576, 16Mi, 200M).",
    )
    limits.add_argument(
        "--max-decompressed-bytes",
        type=_positive_size,
        default=defaults.max_decompressed_bytes,
        metavar="N",
        help="Largest gzip-decompressed request (CompressedPackedForward), as fluentd (default 256Mi).",
    )
    limits.add_argument(
        "--max-connections",
        type=_count(1),
        default=defaults.max_connections,
        metavar="N",
        help=f"Connections open at once (default {defaults.max_connections}). At the cap, the connection idle the "
        "longest (at least 1 s) is closed to make room; if none is idle, new connections are refused.",
    )
    limits.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=defaults.idle_timeout,
        metavar="SECONDS",
        help=f"Close a connection that sends nothing for this long (default {defaults.idle_timeout:g}).",
    )
    limits.add_argument(
        "--handshake-timeout",
        type=_positive_float,
        default=defaults.handshake_timeout,
        metavar="SECONDS",
        help=f"Time for the TLS and shared-key handshakes (default {defaults.handshake_timeout:g}).",
    )
    limits.add_argument(
        "--dedup-ids",
        type=_count(0),
        default=defaults.dedup_ids,
        metavar="N",
        help="Recently acked chunk ids remembered: a retried chunk is acked again without writing its events "
        f"twice; 0 disables (default {defaults.dedup_ids}).",
    )
    parser.set_defaults(_receive_parser=parser)


def _fail(args: argparse.Namespace, message: str) -> int:
    parser = getattr(args, "_receive_parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)  # exits 2
    print(f"pyforward receive: error: {message}", file=sys.stderr)
    return 2


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ReceiverConfig:
    """Build the config from parsed arguments. Raises ``ValueError`` with one line for a bad combination."""
    env = os.environ if environ is None else environ
    host, port = args.bind
    shared_key = args.shared_key if args.shared_key is not None else (env.get(ENV_SHARED_KEY) or None)
    users = dict(_env_users(env.get(ENV_USERS, "")))
    users.update(dict(args.user))
    if users and shared_key is None:
        raise ValueError(f"user auth (--user, ${ENV_USERS}) needs a shared key (--shared-key or ${ENV_SHARED_KEY})")
    if shared_key is not None and not shared_key:
        raise ValueError("--shared-key must not be empty")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    tls = None
    if args.tls_cert is not None:
        tls = TLSMaterial(
            TLSFiles(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key),
            purpose="server",
            require_client_cert=args.tls_ca is not None,
            name="receiver",
        )
    config = ReceiverConfig(
        host=host,
        port=port,
        tls=tls,
        shared_key=shared_key,
        users=users,
        output=args.output,
        output_format=args.format,
        max_request_bytes=args.max_request_bytes,
        max_decompressed_bytes=args.max_decompressed_bytes,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        handshake_timeout=args.handshake_timeout,
        dedup_ids=args.dedup_ids,
    )
    if args.self_hostname:
        config.self_hostname = args.self_hostname
    return config


async def receive_command(args: argparse.Namespace) -> int:
    """Run `pyforward receive` until SIGTERM or SIGINT. 0 on a clean stop, 2 for bad options, 1 otherwise."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        config = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        return _fail(args, str(exc))
    receiver = Receiver(config)
    try:
        port = await receiver.start()
    except CertError as exc:
        return _fail(args, str(exc))
    except OutputError as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        print(f"pyforward receive: cannot listen on {config.host}:{config.port}: {_reason(exc)}", file=sys.stderr)
        return 1
    # Everything loaded so far lives as long as the process: keep it out of the GC's full collections.
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"pyforward receive: listening on {host}:{port} ({receiver.mode})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await receiver.close()
    s = receiver.stats
    log.info(
        "stopped: %d connections, %d requests, %d records, %d acks, %d duplicate chunks, %d bad requests, "
        "%d auth failures",
        s.connections,
        s.requests,
        s.records,
        s.acks,
        s.duplicate_chunks,
        s.bad_requests,
        s.auth_failures,
    )
    return 0
