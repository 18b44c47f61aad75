"""The Forward client: one connection at a time, a window of chunks in flight, acks matched by chunk id.

It never drops a chunk on its own: a chunk leaves the client only when the receiver acked it. On an ack
timeout, a closed connection, garbage from the receiver, or an ack for a chunk id it did not send (fluentd
#4057 / #3361: stale acks on a reused connection), the connection is dropped and every unacked chunk is sent
again, in order and with the same chunk id (so a receiver that remembers ids can ack the retry without
writing the events twice), on a new connection after a capped exponential backoff with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import select
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TypeVar

from pyforward.protocol import (
    Ack,
    Chunk,
    ClientDecoder,
    HandshakeError,
    Helo,
    Pong,
    ProtocolError,
    encode_ping,
    make_ping,
    verify_pong,
)
from pyforward.transport import socket_transport

log = logging.getLogger("pyforward.client")

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connector = Callable[[], Awaitable[Stream]]
_E = TypeVar("_E", Helo, Pong)


class NoDestination(Exception):
    """The connector has nowhere to connect to right now (e.g. the Service is deleted): wait, don't count."""


@dataclass
class ClientConfig:
    shared_key: str | None = None
    username: str = ""
    password: str = ""
    hostname: str = "localhost"
    window: int = 32
    ack_timeout: float = 30.0
    handshake_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass
class ClientStats:
    chunks_sent: int = 0
    chunks_acked: int = 0
    chunks_retried: int = 0
    records_acked: int = 0
    connects: int = 0
    reconnects: int = 0
    connected: bool = False
    last_error: str = ""
    ack_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))


class _Reconnect(Exception):
    """Internal: drop this connection and start over."""


class ForwardClient:
    """Send chunks, get acks. ``submit`` queues; ``on_ack(chunk, latency)`` fires once per chunk."""

    def __init__(
        self,
        connector: Connector,
        config: ClientConfig,
        *,
        on_ack: Callable[[Chunk, float], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_retry: Callable[[int], None] | None = None,
    ) -> None:
        self._connector = connector
        self.config = config
        self._on_ack = on_ack
        self._on_state = on_state
        self._on_retry = on_retry
        self.stats = ClientStats()
        # Not yet written on the current connection, in send order (retries go first).
        self._pending: deque[Chunk] = deque()
        # Written, awaiting the ack: chunk id bytes -> (chunk, monotonic send time), in send order.
        self._inflight: OrderedDict[bytes, tuple[Chunk, float]] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._conn_task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._ack_task: asyncio.Task[None] | None = None  # the receive loop, while a connection is up
        self._ack_timer: asyncio.TimerHandle | None = None  # when the oldest unacked chunk may be late (lazy)
        self._ack_expired = False  # the timer cancelled the receive loop: no ack in time
        self._writer: asyncio.StreamWriter | None = None  # while a connection is up and its handshake is done
        self._held: asyncio.TimerHandle | None = None  # acks not read until it fires (hold_acks)
        self._held_raw: asyncio.Transport | None = None  # the socket transport paused by the hold
        self._unread = False  # a hold began and the socket was not read since: acks may wait there
        self._hangup: select.poll | None = None  # the connection's socket, polled for the receiver's close (held acks)

    # --- public API ----------------------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        """Start the connection loop; returns its task (`pyforward run` supervises it: it must never end)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="forward-client")
        return self._task

    def submit(self, chunk: Chunk) -> None:
        self._idle.clear()
        if self._unread and self._peer_gone():
            # The receiver closed or reset the connection while its acks waited unread in our socket (hold_acks). A
            # write now would fail and end the connection with them unread: their chunks would be sent again. So
            # nothing is written before the loop has read them (no sender wakeup): the read finds the acks, then the
            # end of the connection, and this chunk goes on the next one.
            self.release_acks()
            self._pending.append(chunk)
            return
        writer = self._writer
        if (
            writer is not None
            and not self._pending
            and len(self._inflight) < self.config.window
            and writer.transport.get_write_buffer_size() == 0
        ):
            # The common case at steady rates: connected, room in the window, nothing queued. Write now rather than
            # wake the sender task for it (a task step per chunk, issue 11); the empty buffer means no drain is due.
            self._write(writer, chunk)
            if self._held is not None and len(self._inflight) >= self.config.window:
                self.release_acks()  # the next chunk can leave only once an ack came
            return
        self._pending.append(chunk)
        self._wakeup.set()
        self.release_acks()

    def hold_acks(self, until: float) -> None:
        """Read no ack before loop time `until`, unless the window fills up or `release_acks` is called first.

        At steady rates the pipeline sends a chunk and sleeps one latency budget; each ack came a millisecond later
        and woke the process once more per chunk, and reading it (the TLS layers, the stream, the receive loop) cost
        as much CPU as the chunk itself: in a VM every wakeup runs with cold caches (issue 11). So the socket is not
        watched meanwhile: the acks wait in the kernel and are read together, once per hold. Nothing is lost by the
        wait: what an ack frees (budget, checkpoint) is not needed before then, and the ack deadline is far later.
        The hold ends early when the window is full (the next chunk needs an ack to leave).
        """
        writer = self._writer
        if writer is None or self._held is not None or self._pending or len(self._inflight) >= self.config.window:
            return
        raw = socket_transport(writer)
        if raw is None or not raw.is_reading():  # (paused by TLS flow control: leave it alone)
            return
        raw.pause_reading()
        self._held = asyncio.get_running_loop().call_at(until, self._release_acks, raw)
        self._held_raw = raw
        self._unread = True
        if self._hangup is None:
            sock = raw.get_extra_info("socket")
            if sock is not None:
                self._hangup = select.poll()
                self._hangup.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)

    def _peer_gone(self) -> bool:
        """Has the receiver closed (FIN) or reset (RST) the connection? One poll(2), no wait: while acks are held the
        loop does not watch the socket, so it cannot tell us."""
        return self._hangup is not None and bool(self._hangup.poll(0))

    def release_acks(self) -> None:
        """End a hold now: the acks that came meanwhile are read in the next loop iteration."""
        if self._held is not None:
            self._held.cancel()
            self._release_acks(self._held_raw)

    def _release_acks(self, raw: asyncio.Transport | None) -> None:
        self._held = None
        self._held_raw = None
        if raw is not None and not raw.is_closing() and not raw.is_reading():
            raw.resume_reading()

    @property
    def unacked(self) -> int:
        return len(self._pending) + len(self._inflight)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted chunk was acked. True when done, False on timeout."""
        self.release_acks()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def reconnect(self, reason: str = "destination changed") -> None:
        """Abandon the current connection (unacked chunks go again on the next one)."""
        if self._conn_task is not None and not self._conn_task.done():
            log.info("dropping the connection: %s", reason)
            self._conn_task.cancel()
        self._kick.set()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- connection loop -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = self.config.backoff_initial
        while not self._closing:
            self._conn_task = asyncio.get_running_loop().create_task(self._connection())
            acked_before = self.stats.chunks_acked
            try:
                await self._conn_task
            except asyncio.CancelledError:
                if self._task is not None and self._task.cancelling():
                    self._conn_task.cancel()
                    raise
                # reconnect() cancelled the connection: come back at once.
                delay = self.config.backoff_initial
                self._kick.clear()
                continue
            except NoDestination as exc:
                self._set_error(str(exc) or "no destination")
                await self._wait_kick(self.config.backoff_max)
                continue
            except (OSError, ProtocolError, TimeoutError, _Reconnect) as exc:
                self._set_error(_describe(exc))
                log.warning(
                    "connection to the receiver failed: %s; retrying in %.1fs",
                    self.stats.last_error,
                    delay,
                    extra={"rate_key": f"connection failed: {self.stats.last_error}"},
                )
            except Exception as exc:  # never let the sender die: a bug here must not stop shipping
                self._set_error(f"{type(exc).__name__}: {exc}")
                log.exception("unexpected error in the connection; retrying in %.1fs", delay)
            finally:
                self._set_connected(False)
                self._requeue_inflight()
                # A dead connection is cyclic garbage: the StreamReader keeps the error that ended it, whose
                # traceback keeps the frames that hold the reader (and the writer, the decoder, the TLS and socket
                # transports). This process makes so few container objects that the collector's older
                # generations run every few minutes: until then each reconnect held its buffers and RSS grew
                # (bench soak, issue 11 item 5). Clearing those frames' locals breaks the cycle, so that the
                # connection is freed now by reference counting (a full collection would cost ~30 ms here).
                _clear_frames(self._conn_task)
            if self.stats.chunks_acked > acked_before:
                delay = self.config.backoff_initial  # the connection was useful: start the backoff over
            await self._wait_kick(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.backoff_max)

    async def _wait_kick(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), delay)
        self._kick.clear()

    async def _connection(self) -> None:
        reader, writer = await self._connector()
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        try:
            decoder = ClientDecoder()
            if self.config.shared_key is not None:
                await asyncio.wait_for(self._handshake(reader, writer, decoder), self.config.handshake_timeout)
            self._set_connected(True)
            sender = asyncio.get_running_loop().create_task(self._send_loop())
            self._writer = writer
            try:
                await self._receive_loop(reader, decoder)
            finally:
                if self._held is not None:
                    self._held.cancel()
                    self._held = self._held_raw = None
                self._unread = False
                self._hangup = None
                self._writer = None
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, _Reconnect):
                    await sender
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: ClientDecoder
    ) -> None:
        """HELO -> PING -> PONG (Forward spec v1, "Handshake Messages"). Nothing is sent before it succeeds."""
        assert self.config.shared_key is not None
        helo = await self._next_event(reader, decoder, Helo, "HELO")
        ping = make_ping(
            helo,
            hostname=self.config.hostname,
            shared_key=self.config.shared_key,
            username=self.config.username,
            password=self.config.password,
        )
        writer.write(encode_ping(ping))
        await writer.drain()
        pong = await self._next_event(reader, decoder, Pong, "PONG")
        if not pong.auth_ok:
            raise HandshakeError(f"receiver refused the handshake: {pong.reason or 'no reason given'}")
        verify_pong(
            pong,
            salt=ping.salt,
            nonce=helo.nonce,
            shared_key=self.config.shared_key,
            own_hostname=self.config.hostname,
        )

    @staticmethod
    async def _next_event(reader: asyncio.StreamReader, decoder: ClientDecoder, kind: type[_E], name: str) -> _E:
        while True:
            data = await reader.read(65536)
            if not data:
                raise ProtocolError(f"receiver closed the connection before {name}")
            events = decoder.feed(data)
            if events:
                event = events[0]
                if not isinstance(event, kind) or len(events) > 1:
                    raise ProtocolError(f"expected {name} from the receiver, got {type(event).__name__}")
                return event

    async def _send_loop(self) -> None:
        # No local of this frame holds the writer: a write that fails keeps its callers' frames, this one included,
        # and a coroutine's frame is not cleared (_clear_callers).
        window = self.config.window
        while True:
            while not self._pending or len(self._inflight) >= window:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._writer is None:  # (the connection is ending: it cancels this task)
                return
            self._write(self._writer, self._pending.popleft())
            await self._writer.drain()

    def _write(self, writer: asyncio.StreamWriter, chunk: Chunk) -> None:
        first = not self._inflight
        self._inflight[chunk.chunk_id.encode()] = (chunk, time.monotonic())
        self.stats.chunks_sent += 1
        if first:  # the ack clock starts (later chunks do not move the oldest one's deadline)
            self._arm_ack_deadline()
        writer.write(chunk.payload)

    async def _receive_loop(self, reader: asyncio.StreamReader, decoder: ClientDecoder) -> None:
        # The wait for the oldest chunk's ack is bounded (fluent-bit has no bound and stalls on a silent peer). One
        # lazy timer for the whole loop (_arm_ack_deadline): a plain read per ack, and no task, timer or reschedule per
        # chunk (they were a good share of the CPU at steady rates, issue 11).
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._ack_task = task
        self._ack_expired = False
        self._arm_ack_deadline()
        try:
            while True:
                data = await reader.read(65536)
                if self._held is None:
                    self._unread = False  # (one read takes every ack that waited: they are a few dozen bytes each)
                if not data:
                    raise _Reconnect("receiver closed the connection")
                for event in decoder.feed(data):
                    if not isinstance(event, Ack):
                        raise ProtocolError(f"unexpected {type(event).__name__} from the receiver")
                    self._acked(event.chunk_id)
        except asyncio.CancelledError:
            # Our own deadline cancelled the read (as asyncio.timeout does): unless someone else cancelled us too.
            if self._ack_expired and task.uncancel() <= cancelling:
                raise _Reconnect(
                    f"no ack within {self.config.ack_timeout:g}s for {len(self._inflight)} chunk(s) in flight"
                ) from None
            raise
        finally:
            self._ack_task = None
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None

    def _arm_ack_deadline(self) -> None:
        """The receive loop gives up at the oldest unacked chunk's send time + ack_timeout (never while none is).

        Lazily: a timer is set for the oldest chunk's deadline and left alone as chunks are sent and acked; when it
        fires it looks at the chunk that is the oldest then, and sets itself again for that one if it is not late."""
        if self._ack_task is None or self._ack_timer is not None or not self._inflight:
            return
        oldest_sent = next(iter(self._inflight.values()))[1]  # time.monotonic(), the clock of asyncio's loop.time()
        self._ack_timer = asyncio.get_running_loop().call_at(oldest_sent + self.config.ack_timeout, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_timer = None
        if self._ack_task is None or not self._inflight:
            return
        oldest_sent = next(iter(self._inflight.values()))[1]
        if time.monotonic() < oldest_sent + self.config.ack_timeout:
            self._arm_ack_deadline()  # the chunk it was set for was acked: wait for the one that is the oldest now
            return
        self._ack_expired = True
        self._ack_task.cancel()

    def _acked(self, chunk_id: bytes) -> None:
        entry = self._inflight.pop(chunk_id, None)
        if entry is None:
            # An ack we cannot match means the stream is out of step (fluentd #4057): start over.
            raise ProtocolError(f"ack for an unknown chunk id {chunk_id[:64]!r}")
        chunk, sent = entry
        latency = time.monotonic() - sent
        self.stats.chunks_acked += 1
        self.stats.records_acked += chunk.records
        self.stats.ack_latencies.append(latency)
        if self._pending:  # a chunk waits for room in the window (else waking the sender would find nothing to do)
            self._wakeup.set()
        self._arm_ack_deadline()
        if not self._pending and not self._inflight:
            self._idle.set()
        if self._on_ack is not None:
            self._on_ack(chunk, latency)

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def _requeue_inflight(self) -> None:
        if not self._inflight:
            return
        retried = [chunk for chunk, _ in self._inflight.values()]
        self._inflight.clear()
        self._pending.extendleft(reversed(retried))
        self.stats.chunks_retried += len(retried)
        if self._on_retry is not None:
            self._on_retry(len(retried))

    def _set_connected(self, value: bool) -> None:
        if self.stats.connected != value:
            self.stats.connected = value
            if value:
                log.info("connected to the receiver")
            if self._on_state is not None:
                self._on_state(value)

    def _set_error(self, message: str) -> None:
        self.stats.last_error = message


def _clear_frames(task: asyncio.Task[None] | None) -> None:
    """Drop the locals of the finished frames in the tracebacks of the error that ended `task` (and of the
    errors it was raised from or during), and of the finished callers of those frames."""
    if task is None or not task.done() or task.cancelled():
        return
    pending: list[BaseException | None] = [task.exception()]
    seen: set[int] = set()
    frames: set[int] = set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # skips frames still running (this one's caller)
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            _clear_callers(frame, frames)
        pending += [exc.__cause__, exc.__context__]


_SUSPENDABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _clear_callers(frame: FrameType, done: set[int]) -> None:
    """A frame kept by a traceback keeps its callers too (f_back), after they returned: a write that failed in
    asyncio's socket transport (EPIPE, ECONNRESET: the receiver went while we did not read) keeps the frames of
    StreamWriter.write (and of the TLS layer's writes), _write and submit, whose locals hold the writer, which
    holds the reader, whose error holds the traceback: the same cycle as above, out of traceback.clear_frames'
    reach (issue 11 item 5). Those callers are done; clearing stops at the first one still running, and before
    any coroutine or generator (clearing a suspended one would close it)."""
    caller = frame.f_back
    while caller is not None and id(caller) not in done and not caller.f_code.co_flags & _SUSPENDABLE:
        done.add(id(caller))
        try:
            caller.clear()
        except RuntimeError:  # still running
            return
        caller = caller.f_back


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({text})"
    return text
