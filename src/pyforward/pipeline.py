"""`pyforward run`: file -> lines -> records -> chunks -> wire -> ack -> checkpoint.

The file is the buffer. Memory holds the chunk being built and the chunks in flight, under
``max_inflight_bytes``; the checkpoint moves only to the end of the last contiguous range of acked chunks
(fluent-bit #5912 saves offsets when lines are read, and loses them on a crash). Delivery is at-least-once:
after a crash only the chunks in flight (and those acked after the last checkpoint write) are sent again; each chunk
says which bytes of which file its records are (ranges.py), so `pyforward receive` writes each of them once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pyforward.certs import CertError
from pyforward.checkpoint import AckTracker, CheckpointError, CheckpointWriter, Position, load_checkpoint, not_writable
from pyforward.chunks import COMPRESS_AHEAD, INLINE_GZIP_BYTES, Building, ByteBudget, build_compressed
from pyforward.client import ForwardClient, NoDestination, Stream
from pyforward.connection import (
    StartupError,
    client_config,
    load_receiver_tls,
    proxy_from,
    require_discovery_package,
    tls_material,
)
from pyforward.protocol import Chunk, EntryPacker, EventTime, build_chunk
from pyforward.ranges import ChunkRanges
from pyforward.records import EntryEncoder, RecordParser, RecordStats
from pyforward.settings import Settings, env_name
from pyforward.supervise import Policy, Supervisor
from pyforward.tail import Tailer, TailerStats
from pyforward.transport import Destination, open_stream

if TYPE_CHECKING:
    from pyforward.discovery import Discovery, Target
    from pyforward.metrics import HealthState, Metrics

log = logging.getLogger("pyforward.run")


class Pipeline:
    def __init__(
        self, settings: Settings, *, metrics: Metrics | None = None, health: HealthState | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.tailer_stats = TailerStats()
        self.record_stats = RecordStats()
        self.parser = RecordParser(time_key=settings.time_key, stats=self.record_stats)
        self.packer = EntryPacker()
        self.encoder = EntryEncoder(self.parser, self.packer)
        self.tracker = AckTracker()
        # Every long-running task of `run` is started through it: none dies silently (issue 12, supervise.py).
        self.supervisor = Supervisor(on_restart=self._task_restarted)
        self.checkpoint = CheckpointWriter(
            settings.effective_checkpoint_path,
            interval=settings.checkpoint_interval,
            on_settled=self._checkpointed,
            on_task=lambda task: self.supervisor.watch("checkpoint", task),
        )
        # The room comes from acks (and the checkpoint they move): a hold of the acks (steady rates) ends when it waits.
        self.budget = ByteBudget(settings.max_inflight_bytes, on_wait=lambda: self.client.release_acks())
        self.proxy = proxy_from(settings)
        self.tls = tls_material(settings)
        self.discovery: Discovery | None = None
        self.target: tuple[str, int] | None = (settings.host, settings.port) if settings.host else None
        self.client = ForwardClient(
            self._connect,
            client_config(settings),
            on_ack=self._acked,
            on_state=self._connected,
            on_retry=self._retried,
        )
        self.acked_position: Position | None = None
        self._tailer: Tailer | None = None
        self._reported: dict[str, int] = {}
        self._acked_sizes: dict[int, int] = {}  # seq -> source bytes, acked, budget not yet freed
        self._unsaved = 0  # their sum
        self._marks: deque[tuple[Position, int]] = deque()  # checkpoint positions handed to the writer
        self._released_below = 0  # budget freed for every seq below this
        self._last_ack = 0.0
        self._last_data = float("-inf")  # monotonic time of the last read that returned lines
        self._quiet = False  # the last wait for the writer ended after a quiet spell: ship the next lines at once
        self._acks_due: float | None = None  # loop time when the acks held while ticking are read (_settle)
        # Chunks being built (gzip), in read order; the sender hands them to the client in that order.
        self._outbox: asyncio.Queue[asyncio.Future[Chunk]] | None = None
        self._compressing = 0  # chunks in the outbox or being awaited by the sender: later chunks queue behind them
        # One thread, so chunks leave it in the order they went in. gzip releases the GIL: chunk N is compressed
        # while the loop parses chunk N+1 (awaiting each compression serialised the two: profile in bench/README).
        self._compressor: ThreadPoolExecutor | None = None
        # Chunks handed to the compressor and not yet compressed: bounded, so that a starved gzip thread holds at
        # most this many uncompressed chunks in memory, whatever max_inflight_bytes allows.
        self._compress_slots = asyncio.Semaphore(COMPRESS_AHEAD)

    # --- start-up ------------------------------------------------------------------------------------------
    def check_startup(self) -> Position | None:
        """Everything that must fail before anything starts: certificates, packages, the checkpoint."""
        if not self.settings.discovery_enabled:
            load_receiver_tls(self.settings, self.tls)
        else:
            require_discovery_package(self.settings)
        try:
            start = load_checkpoint(self.settings.effective_checkpoint_path)
        except CheckpointError as exc:
            raise StartupError(str(exc)) from None
        self._check_checkpoint_writable()
        return start

    def _check_checkpoint_writable(self) -> None:
        """One clear line at start-up when the checkpoint cannot be written (issue 13: the volume is not writable
        by the image's uid 65532). Not fatal: shipping without a checkpoint still delivers every event; only a
        restart cannot resume where it stopped. The checkpoint writer keeps reporting each failed write."""
        path = self.settings.effective_checkpoint_path
        problem = not_writable(path)
        if problem is not None:
            uid = os.getuid()
            log.error(
                "cannot write the checkpoint %s: its directory is not writable by uid %d gid %d (%s); shipping goes "
                "on, but a restart will not resume where it stopped. Fix: make the volume writable by uid %d "
                "(Kubernetes: securityContext.fsGroup), or set %s to a writable volume",
                path, uid, os.getgid(), problem, uid, env_name("checkpoint_path"),
            )

    # --- the connection ------------------------------------------------------------------------------------
    async def _connect(self) -> Stream:
        if self.target is None:
            raise NoDestination(
                f"waiting for Service {self.settings.namespace}/{self.settings.service_name}"
                if self.settings.discovery_enabled
                else "no destination"
            )
        if self.tls is not None and self.tls.generation == 0:
            try:
                self.tls.load()
            except CertError as exc:
                raise NoDestination(f"waiting for TLS material: {exc}") from None
        host, port = self.target
        destination = Destination(host=host, port=port, tls=self.tls, server_name=self.settings.effective_server_name)
        return await open_stream(destination, self.proxy, timeout=self.settings.connect_timeout)

    def _on_target(self, target: Target | None) -> None:
        new = (target.host, target.port) if target is not None else None
        if new == self.target:
            return
        log.info("destination: %s", f"{new[0]}:{new[1]}" if new else "none (shipping paused)")
        self.target = new
        if self.metrics is not None:
            self.metrics.destination_changes.inc()
        self.client.reconnect("destination changed")

    def _on_secret(self) -> None:
        if self.tls is not None and self.tls.generation == 0:
            self.client.reconnect("TLS material arrived")

    # --- acks ----------------------------------------------------------------------------------------------
    def _acked(self, chunk: Chunk, latency: float) -> None:
        assert isinstance(chunk.position, int)
        # The budget of an acked chunk is freed only once a checkpoint covering it was written (or failed to
        # be: shipping goes on with a stale checkpoint). So whatever a crash makes us send again — chunks in
        # flight, and acked ones the checkpoint did not cover yet — stays within max_inflight_bytes.
        self._acked_sizes[chunk.position] = chunk.size
        self._unsaved += chunk.size
        position = self.tracker.ack(chunk.position)
        if position is not None:
            self.acked_position = position
            self._marks.append((position, self.tracker.acked_below))
            # Writes are coalesced in time (checkpoint_interval); but what they cover holds budget, so when the reader
            # waits for room, or a chunk's worth of acked bytes is unsaved (bulk rates: every ack, as before; at 1,000
            # events/s about once a second anyway), write at once.
            urgent = self.budget.waiting or self._unsaved >= self.settings.chunk_max_bytes
            self.checkpoint.update(position, urgent=urgent)
        if self.metrics is not None:
            self.metrics.records_acked.inc(chunk.records)
            self.metrics.chunks_acked.inc()
            self.metrics.ack_latency.observe(latency)
            self._last_ack = time.time()
            self.metrics.last_ack_timestamp_seconds.set(self._last_ack)
            self.metrics.inflight_bytes.set(self.budget.used)

    def _checkpointed(self, position: Position) -> None:
        """A checkpoint write settled: free the budget of the chunks it covers (those acked before it)."""
        if self._tailer is not None and self.checkpoint.last_written is position:  # written: the spool may let go
            self._tailer.saved(position)
        covered = None
        while self._marks and covered is None:
            mark, below = self._marks.popleft()
            if mark is position:
                covered = below
        if covered is None:
            return  # a retry of a position settled before
        for seq in range(self._released_below, covered):
            size = self._acked_sizes.pop(seq)
            self._unsaved -= size
            self.budget.release(size)
        self._released_below = max(self._released_below, covered)
        if self.metrics is not None:
            self.metrics.inflight_bytes.set(self.budget.used)

    def _connected(self, connected: bool) -> None:
        if self.health is not None:
            self.health.connected = connected
        if self.metrics is not None:
            self.metrics.connected.set(1 if connected else 0)
            if connected and self.client.stats.connects > 1:
                self.metrics.reconnects.inc()

    def _retried(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.chunks_retried.inc(count)

    # --- the read loop -------------------------------------------------------------------------------------
    async def _submit(self, building: Building) -> None:
        """Close the chunk being built: wait for room under the in-flight bound, then queue it for the sender.

        Cancelled while waiting, the chunk stays in `building` (the shutdown sends it).
        """
        if not building.entries:
            return
        assert building.end is not None
        assert self._outbox is not None
        settings = self.settings
        size = building.size
        in_thread = settings.compress == "gzip" and size > INLINE_GZIP_BYTES
        await self.budget.acquire(size)
        if in_thread:
            try:
                await self._compress_slots.acquire()
            except asyncio.CancelledError:
                self.budget.release(size)
                raise
        # Nothing waits from here on: the chunk leaves `building` for good.
        records = len(building.entries)
        blob = b"".join(building.entries)
        seq = self.tracker.register(building.end)
        extra = building.ranges.take() if building.ranges is not None else None
        building.entries = []
        building.size = 0
        future: asyncio.Future[Chunk]
        if in_thread:
            if self._compressor is None:
                self._compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyforward-gzip")
            future = asyncio.get_running_loop().run_in_executor(
                self._compressor, build_compressed, settings.tag, blob, records, size, settings.compress_level, seq,
                extra,
            )  # fmt: skip
            future.add_done_callback(lambda _: self._compress_slots.release())
        else:
            compress = settings.compress == "gzip"
            chunk = build_chunk(
                settings.tag, blob, records, size=size, compress=compress, level=settings.compress_level, position=seq,
                extra=extra,
            )  # fmt: skip
            if not self._compressing:  # nothing earlier is still compressing: hand it over now, no task hop
                self._sent(chunk)
                return
            future = asyncio.get_running_loop().create_future()
            future.set_result(chunk)
        self._compressing += 1
        self._outbox.put_nowait(future)

    async def _send_loop(self) -> None:
        """Hand the chunks to the client in read order, each once it is built."""
        assert self._outbox is not None
        outbox = self._outbox
        while True:
            future = await outbox.get()
            try:
                self._sent(await future)
            finally:
                self._compressing -= 1
                outbox.task_done()

    def _sent(self, chunk: Chunk) -> None:
        self.client.submit(chunk)
        if self.metrics is not None:
            self.metrics.records_sent.inc(chunk.records)
            self.metrics.chunks_sent.inc()
            self.metrics.inflight_bytes.set(self.budget.used)

    async def _read_loop(self, tailer: Tailer, building: Building) -> None:
        """Read, encode, cut chunks. A chunk leaves when it is full, or when its first line has waited the latency
        budget (flush_interval); a line written after a quiet spell leaves at once.

        What a chunk costs (a gzip member, a TLS record, an ack, a read, wakeups) is paid per chunk, not per line:
        at steady rates it was most of the sidecar's CPU (issue 11: 22 % of a core at 100 events/s with a chunk
        every 5 ms). So, caught up with the writer, the loop sleeps until a write, lets the writer go on for the
        budget, and takes what was written in one read and one chunk: at most about 1/flush_interval chunks a
        second whatever the rate, and no line waits longer than the budget. When the last lines were read longer
        than the budget ago, waiting would save nothing (the chunk would hold this one write): the line goes now.
        """
        settings = self.settings
        budget = settings.flush_interval
        parse = self.parser.parse
        pack = self.packer.pack_entry
        encode = self.encoder.encode
        max_bytes = settings.chunk_max_bytes
        max_records = settings.chunk_max_records
        due: float | None = None  # when the lines of the next read must leave (set by a wait for the writer)
        while True:
            batch = await tailer.read_batch(max(max_bytes - building.size, 1))
            if batch is None:  # caught up
                due = await self._settle(tailer, building)
                continue
            ranges = building.ranges
            if ranges is not None and ranges.other_file(batch):  # a chunk holds one file's records (issue 22)
                await self._submit(building)
            self._last_data = time.monotonic()
            if not building.entries:
                building.due = due if due is not None else self._last_data + budget
                building.batched = not self._quiet and budget > 0
            due = None
            self._quiet = False
            now = EventTime.now()
            lines = batch.lines
            truncated = dict(batch.truncated) if batch.truncated else {}
            if truncated and self.metrics is not None:
                self.metrics.truncated_line_bytes.inc(sum(n - len(lines[i]) for i, n in truncated.items()))
            # A batch is cut by source bytes only: with tiny lines it can hold far more than chunk_max_records
            # lines, and a request above a receiver's entry limit (1,000,000 in fluentd and pyforward receive) is
            # refused on every retry. So a chunk ends after its max_records-th line, also inside a batch; every
            # line but a batch's last one ends with a newline, which gives the Position there.
            offset = batch.end.offset - batch.size  # where the batch starts in its file
            lengths = ranges.start(batch) if ranges is not None else None
            first = 0
            while first < len(lines):
                last = min(len(lines), first + max(max_records - len(building.entries), 1))
                if truncated:
                    for index in range(first, last):
                        t, record = parse(lines[index], truncated_from=truncated.get(index), now=now)
                        building.entries.append(pack(t, record))
                else:
                    building.entries.extend([encode(line, now) for line in lines[first:last]])
                if ranges is not None and lengths is not None:
                    ranges.add(batch.source, lengths[first:last])
                if last == len(lines):
                    building.size += batch.end.offset - offset
                    building.end = batch.end
                else:
                    used = sum(truncated.get(i, len(lines[i])) + 1 for i in range(first, last))
                    offset += used
                    building.size += used
                    building.end = Position(
                        file=batch.end.file, offset=offset, path=batch.end.path, size=batch.end.size
                    )
                    await self._submit(building)
                    building.due = time.monotonic() + budget
                first = last
            self._count(len(lines), batch.size)
            if building.size >= max_bytes or len(building.entries) >= max_records:
                await self._submit(building)
            elif batch.caught_up:  # as a read_batch returning None would say, without reading again
                due = await self._settle(tailer, building)

    async def _settle(self, tailer: Tailer, building: Building) -> float | None:
        """Caught up: sleep until the chunk being built is due (then read once more and return None); or send it and
        wait for the writer. Returns when the lines of the next read are due."""
        budget = self.settings.flush_interval
        if building.entries:
            wait = building.due - time.monotonic()
            if wait > 0:  # the lines written until the chunk is due are read in one go then
                await asyncio.sleep(wait)
                return None
            batched = building.batched
            await self._submit(building)
            if batched:
                # The writer is writing steadily (this chunk waited the budget for its lines): look again one budget
                # later rather than wait for inotify. What was written meanwhile has waited at most the budget then
                # and leaves at once; one timer wakeup a chunk instead of an inotify wakeup, its events and a timer (in
                # this VM each wakeup costs ~0.2 ms of CPU, most of a chunk's cost: issue 11). If nothing was written,
                # the next read_batch says so and the loop waits for the writer. Meanwhile the acks are not read: they
                # are read together about once per checkpoint interval (all they free waits for the checkpoint anyway),
                # in the wakeup of a look (not one of their own), or when the window fills, or when the loop stops
                # ticking (below).
                loop = asyncio.get_running_loop()
                if self._acks_due is None:
                    self._acks_due = loop.time() + max(budget, self.settings.checkpoint_interval)
                self.client.hold_acks(self._acks_due + budget)  # (a backstop: the look below releases them)
                await asyncio.sleep(budget)
                if loop.time() >= self._acks_due:
                    self._acks_due = None
                    self.client.release_acks()
                    # Two loop iterations: the first sees the socket readable, the second reads it (its callback runs
                    # after this task's step in that iteration); then the next chunk's hold may pause it again.
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                return time.monotonic()
        self._acks_due = None
        self.client.release_acks()  # not ticking: the acks are read as they come
        await tailer.wait(None)
        woke = time.monotonic()
        if woke - self._last_data >= budget:
            self._quiet = True
            return woke  # a write after a quiet spell: nothing to batch it with, ship it at once
        await asyncio.sleep(budget)  # the writer goes on meanwhile: one read, one chunk for all of it
        return woke + budget

    def _delta(self, name: str, current: int) -> int:
        """How much a plain stats counter grew since it was last reported to Prometheus."""
        grown = current - self._reported.get(name, 0)
        self._reported[name] = current
        return grown

    def _count(self, lines: int, size: int) -> None:
        if self.metrics is None:
            return
        self.metrics.lines_read.inc(lines)
        self.metrics.read_bytes.inc(size)
        stats = self.record_stats
        for kind, current in (
            ("json", stats.parse_errors),
            ("not_object", stats.not_objects),
            ("invalid_utf8", stats.invalid_utf8),
            ("bad_time", stats.bad_time),
        ):
            grown = self._delta(kind, current)
            if grown > 0:
                self.metrics.parse_errors.labels(kind=kind).inc(grown)
        grown = self._delta("truncated_lines", self.tailer_stats.truncated_lines)
        if grown > 0:
            self.metrics.truncated_lines.inc(grown)

    # --- state computed when looked at: backlog, certificate expiry ---------------------------------------------
    async def _refresh_metrics(self) -> None:
        """Bring the gauges and the counters kept in plain stats up to date. Run on the loop when /metrics or /readyz
        is asked (metrics.HealthState.refresh), not on a timer: an idle sidecar does no periodic work (issue 11)."""
        backlog = self.budget.used
        files = log_files = 0
        if self._tailer is not None:
            # Every unread backup counts (issue 12); this look also finds the backups deleted unread. In a thread: it
            # lists the directory when that changed since the tailer's last listing.
            with contextlib.suppress(OSError):
                unread, files, log_files = await asyncio.to_thread(self._tailer.backlog)
                backlog += unread
        if self.health is not None:
            self.health.backlog_bytes = backlog
        if self.metrics is None:
            return
        self.metrics.backlog_bytes.set(backlog)
        behind = 0.0
        if backlog > self.budget.used and self._last_ack:
            behind = max(0.0, time.time() - self._last_ack)
        self.metrics.backlog_seconds.set(behind if backlog else 0.0)
        for name, material in (("receiver", self.tls), ("proxy", self.proxy.tls if self.proxy else None)):
            if material is not None and material.generation:
                expiry = material.seconds_to_expiry()
                if expiry is not None:
                    self.metrics.certificate_expiry_seconds.labels(cert=name).set(expiry)
        for result, current in (("ok", self.checkpoint.writes), ("error", self.checkpoint.failures)):
            grown = self._delta(f"checkpoint_{result}", current)
            if grown > 0:
                self.metrics.checkpoint_writes.labels(result=result).inc(grown)
        self.metrics.backlog_files.set(files)
        self.metrics.log_files.set(log_files)
        for name, current in (
            ("rotations", self.tailer_stats.rotations),
            ("truncation_lost_bytes", self.tailer_stats.truncation_bytes_lost),
            ("checkpoint_misses", self.tailer_stats.checkpoint_misses),
            ("unreadable_files", self.tailer_stats.unreadable_files),
        ):
            grown = self._delta(name, current)
            if grown > 0:
                getattr(self.metrics, name).inc(grown)
        spool = self._tailer.spool if self._tailer is not None else None
        self.metrics.show_losses(self.tailer_stats.lost_files, self.tailer_stats.lost_bytes, spool)
        if spool is not None:
            with contextlib.suppress(OSError):
                self.metrics.show_spool(await asyncio.to_thread(spool.status))

    # --- run -----------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, start: Position | None) -> int:
        settings = self.settings
        if settings.discovery_enabled:
            from pyforward.discovery import Discovery  # kubernetes-asyncio only when discovery is configured

            self.discovery = Discovery(settings, on_target=self._on_target, on_secret=self._on_secret)
        tailer = Tailer(
            settings.log_path,
            start=start,
            start_at=settings.start_at,
            max_line_bytes=settings.max_line_bytes,
            poll_interval=settings.poll_interval,
            stats=self.tailer_stats,
            spool_dir=settings.effective_spool_dir,
            spool_max_bytes=settings.spool_max_bytes,
            spool_min_free=settings.spool_min_free,
        )
        self._tailer = tailer
        await tailer.open()
        log.info(
            "shipping %s to %s (%s, %s)%s",
            settings.log_path,
            f"{settings.host}:{settings.port}"
            if settings.host
            else f"Service {settings.namespace}/{settings.service_name}",
            "tls" if settings.tls else "plain tcp",
            settings.compress,
            f" from {start.path} at offset {start.offset}" if start else f" from the {settings.start_at}",
        )
        # Supervised (docs/architecture.md has the table): a failure is logged with its traceback, then the task
        # is restarted with backoff (discovery) or `run` ends with exit code 1 (the others).
        supervisor = self.supervisor
        supervisor.watch("client", self.client.start())
        if self.health is not None:
            self.health.refresh = self._refresh_metrics
        if self.discovery is not None:
            supervisor.spawn("discovery", self.discovery.run, Policy.RESTART)
        building = Building(entries=[], ranges=ChunkRanges() if settings.record_ranges else None)
        self._outbox = asyncio.Queue()
        supervisor.spawn("sender", self._send_loop, Policy.EXIT)
        reader = supervisor.spawn("tailer", lambda: self._read_loop(tailer, building), Policy.EXIT)
        stopper = asyncio.create_task(stop.wait())
        try:
            waiting: list[asyncio.Future[Any]] = [reader, stopper, supervisor.failed]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if supervisor.failed.done():
                return await self._abort()
            return await self._shutdown(reader, building)
        finally:
            stopper.cancel()
            await supervisor.close()
            with contextlib.suppress(Exception):  # a client that failed was logged already (supervisor)
                await self.client.close()
            await tailer.close()
            if self._compressor is not None:
                self._compressor.shutdown(wait=False, cancel_futures=True)

    def _task_restarted(self, task: str) -> None:
        if self.metrics is not None:
            self.metrics.task_restarts.labels(task=task).inc()

    async def _abort(self) -> int:
        """A task that must not fail failed (logged by the supervisor): stop now, without reading or sending more;
        the checkpoint keeps what was acked (a write in progress is finished, bounded), the rest is read again."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.checkpoint.close(), self.settings.shutdown_timeout)
        return 1

    async def _shutdown(self, reader: asyncio.Task[None], building: Building) -> int:
        """SIGTERM: stop reading, send what was read, wait (bounded) for acks, write the checkpoint."""
        log.info("stopping: waiting up to %.0fs for the acks of what is in flight", self.settings.shutdown_timeout)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        deadline = time.monotonic() + self.settings.shutdown_timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._submit(building), self.settings.shutdown_timeout)
        if self._outbox is not None:  # every chunk read is with the client before we wait for its acks
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), max(0.0, deadline - time.monotonic()))
        drained = await self.client.drain(max(0.0, deadline - time.monotonic()))
        await self.checkpoint.close()
        if drained:
            log.info("stopped: everything read was acked; checkpoint written")
        else:
            log.warning(
                "stopped with %d chunk(s) unacked; they are read again from the log after the restart",
                self.client.unacked,
            )
        return 0
