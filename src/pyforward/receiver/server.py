"""The server: connections, TLS per accepted socket, the handshake, decoding, acks after the output's flush,
duplicate chunk ids, limits and shutdown (see the package's doc)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections import OrderedDict
from typing import Any

from pyforward.certs import CertError
from pyforward.protocol import (
    HealthCheck,
    Helo,
    NotArray,
    Ping,
    ProtocolError,
    RangeError,
    Request,
    ServerDecoder,
    encode_ack,
    encode_helo,
    encode_pong,
    make_helo,
    make_pong,
    parse_ranges,
    verify_ping,
)
from pyforward.receiver.config import ReceiverConfig, ReceiverStats, log
from pyforward.receiver.dedup import Mark, SourceMarks
from pyforward.receiver.listen import RateLimitedLog, listen, peer_address
from pyforward.receiver.markfile import MarkFile
from pyforward.receiver.output import _reason, _Writer, render

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


# ----------------------------------------------------------------------------------------------- receiver


# A queued request: its chunk id (None: no ack wanted), its record count, and the write to wait for.
_Pending = tuple[bytes | None, int, "asyncio.Future[None]"]


class _Closed(Exception):
    """Ends one connection; the reason has been logged."""


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
        self._ratelimited = RateLimitedLog(log)
        self._shared_key = config.shared_key
        self._users = dict(config.users)
        self._hostname = config.self_hostname
        # The state file (markfile.py): the output's length (recovery.py), and the marks (exactly once); None: memory
        self._state = MarkFile(config.dedup_state) if config.dedup_state is not None else None
        self.marks: SourceMarks | None = None  # exactly once (dedup.py); None: turned off
        if config.exactly_once:
            self.marks = SourceMarks(
                self._state,
                max_sources=config.dedup_max_sources,
                forget_after=config.dedup_forget_after,
            )

    def _load_state(self) -> MarkFile | None:
        """Load the state file (blocking, at start-up); the one the writer records the output's length in, or None.
        Exactly once creates it; without, one left by an earlier run is kept current (else a later start with exactly
        once would cut by its stale length what this run acked) and none is created. Raises MarkFileError."""
        if self.marks is not None:
            self.marks.load()
            return self._state
        if self._state is None or not self._state.path.exists():
            return None
        self._state.load()  # (its marks unused: they lag what this run writes, a duplicate at most)
        return self._state

    @property
    def mode(self) -> str:
        """``plain``, ``tls`` or ``mtls`` (client certificates required)."""
        if self.config.tls is None:
            return "plain"
        return "mtls" if self.config.tls.require_client_cert else "tls"

    async def start(self) -> int:
        """Load the TLS material, open the output, listen. Returns the bound port.

        Raises :class:`CertError` for unusable certificates, :class:`OutputError` for the output file,
        :class:`MarkFileError` for the exactly-once state and ``OSError`` for the address.
        """
        config = self.config
        if config.tls is not None:
            config.tls.load()
        writer = _Writer(config.output, self.marks, sync=config.sync)
        try:
            await asyncio.to_thread(writer.recover, self._load_state())  # before listening: nothing acked yet
            self._listeners = await listen(config.host, config.port)
        except BaseException:
            await writer.close()
            if self._state is not None:
                self._state.close()
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
            if self._state is not None:
                self._state.close()
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
                    peer_address(sock),
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
        peer = peer_address(sock)
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
                try:
                    pending.append((event.chunk, len(event.entries), self._submit(event)))
                except RangeError as exc:
                    stats.bad_requests += 1
                    stats.bad_ranges += 1
                    self._ratelimited(logging.WARNING, "ranges", "closing connection from %s: %s", peer, exc)
                    return pending, True  # the requests before it are acked once written
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
        count = len(request.entries)
        ranges = parse_ranges(request.options, count, request.skipped) if self.marks is not None else None
        if ranges is not None:
            assert self.marks is not None
            future, count = self.marks.submit(request, ranges, self._write)
        else:
            future = self._write(request, None)
        key = chunk if dedup else None
        if key is not None:
            self._inflight[key] = future
        future.add_done_callback(lambda f: self._written(f, key, count))
        return future

    def _write(self, request: Request, mark: Mark | None) -> asyncio.Future[None]:
        payload = render(request, self.config.output_format) if request.entries else b""
        if not payload:
            return _done()
        assert self._writer is not None
        return self._writer.submit(payload, mark)

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
