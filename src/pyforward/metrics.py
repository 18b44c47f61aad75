"""Prometheus metrics, /healthz and /readyz for one pyforward process.

The pipeline updates the metrics once per batch of lines or per chunk, never per line: a counter increment takes a
lock, and the hot path reads tens of thousands of lines a second.

The HTTP server runs in its own daemon thread (wsgiref + prometheus_client's WSGI app), not on the event loop, so
that a stuck loop is still visible: /healthz compares the loop's heartbeat with the clock and answers 503 when the
loop has not run for ``loop_stall_seconds``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import platform
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from pyforward import __version__

if TYPE_CHECKING:
    from pyforward.tail.spool import Spool, SpoolStatus

log = logging.getLogger(__name__)

RESTART_INITIAL, RESTART_MAX = 1.0, 60.0  # backoff of the HTTP server's restarts after a failure

# Ack latency spans a loopback receiver (< 1 ms) to a congested fluentd behind a tunnel (tens of seconds); the
# client's ack timeout defaults to 30 s, so the top bucket is above it.
ACK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

PARSE_ERROR_KINDS = ("json", "not_object", "invalid_utf8", "bad_time")
CHECKPOINT_RESULTS = ("ok", "error")
CERT_KINDS = ("receiver", "proxy")
#: Why files were lost (pyforward_lost_files_total{reason}): the API server's retention deleted them unread (and
#: checkpointed files gone at start), or the spool's disk guard released them (issue 21). Sum without(reason) for all.
LOSS_REASONS = ("retention", "spool_budget")
#: The tasks that are restarted when they fail (pyforward_task_restarts_total{task}); the others end the process
#: (supervise.py, docs/architecture.md).
RESTARTED_TASKS = ("discovery", "metrics")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Served(Protocol):
    """What the endpoint serves: `Metrics`, or `pyforward receive`'s (receiver/metrics.py)."""

    registry: CollectorRegistry
    task_restarts: Counter


class Metrics:
    """Every metric of one process, on its own registry (tests create several instances side by side)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # The process's own CPU and memory (process_cpu_seconds_total, process_resident_memory_bytes, open fds) and
        # python_info, read from /proc at each scrape: the dashboard's CPU and RSS panels (docs/monitoring/) use them,
        # and this registry is not prometheus_client's global one, which has them by default.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            # prometheus_client appends _total to the sample name (pyforward_<name>_total).
            return Counter(f"pyforward_{name}", doc, labelnames=labels, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"pyforward_{name}", doc, labelnames=labels, registry=r)

        # --- input ------------------------------------------------------------------------------------------
        self.lines_read = counter("lines_read", "Complete lines read from the audit log and its rotated files.")
        self.read_bytes = counter("read_bytes", "Bytes read from the audit log, newlines included.")
        self.rotations = counter("rotations", "Rotations of the audit log seen (a new file at the path).")
        self.truncated_lines = counter(
            "truncated_lines", "Lines longer than the line limit, shipped cut to the limit and marked."
        )
        self.truncated_line_bytes = counter(
            "truncated_line_bytes", "Bytes cut from lines longer than the line limit (the rest of the line is shipped)."
        )
        self.truncation_lost_bytes = counter(
            "truncation_lost_bytes",
            "Bytes of the log that were never read because the file was truncated or rewritten in place.",
        )
        # --- losses (issue 12): created at 0, so that increase() and absent() work from the first scrape ---------
        self.lost_files = counter(
            "lost_files",
            "Rotated log files that disappeared before they were read to their end, by reason: retention (the API "
            "server's retention ran out while shipping was behind, and checkpointed files gone at start), "
            "spool_budget (the spool's disk guard released them). Each is logged at ERROR.",
            ("reason",),
        )
        self.lost_bytes = counter(
            "lost_bytes",
            "Bytes of those files that were not read, by reason, at the size last seen (compressed bytes for a .gz; "
            "files created and deleted between two looks are not seen): a lower bound.",
            ("reason",),
        )
        self.checkpoint_misses = counter(
            "checkpoint_misses", "Starts where the file named by the checkpoint was gone (its unread lines lost)."
        )
        self.unreadable_files = counter(
            "unreadable_files", "Rotated files skipped or cut short because they could not be read (corrupt .gz)."
        )
        self.parse_errors = counter(
            "parse_errors",
            "Lines shipped with a parse problem, by kind (json, not_object, invalid_utf8, bad_time).",
            ("kind",),
        )
        # --- records, chunks, the wire ------------------------------------------------------------------------
        self.records_sent = counter("records_sent", "Records written to the wire (retries included).")
        self.records_acked = counter("records_acked", "Records the receiver has acked.")
        self.chunks_sent = counter("chunks_sent", "Chunks (Forward requests) written to the wire, retries included.")
        self.chunks_acked = counter("chunks_acked", "Chunks the receiver has acked.")
        self.chunks_retried = counter("chunks_retried", "Chunks sent again after a timeout or a lost connection.")
        self.reconnects = counter("reconnects", "Connections to the receiver opened after the first one.")
        self.destination_changes = counter(
            "destination_changes", "Changes of the receiver address or TLS material (discovery, file reload)."
        )
        self.ack_latency = Histogram(
            "pyforward_ack_latency_seconds",
            "Seconds from writing a chunk to reading its ack. At steady rates acks are read together about once per "
            "checkpoint_interval (no wakeup per ack), so up to about that much later.",
            buckets=ACK_LATENCY_BUCKETS,
            registry=r,
        )
        # --- checkpoint ---------------------------------------------------------------------------------------
        self.checkpoint_writes = counter("checkpoint_writes", "Checkpoint writes, by result (ok, error).", ("result",))
        # --- state --------------------------------------------------------------------------------------------
        self.backlog_bytes = gauge(
            "backlog_bytes",
            "Bytes in the audit log and its rotated files not yet acked (the file is the buffer): the rest of the "
            "file being read, every unread backup, the live log, and what is in flight. A gzipped backup counts at "
            "its size on disk (compressed: less than it holds).",
        )
        self.log_files = gauge("log_files", "Files of the audit log present at the last look: the live log + backups.")
        self.backlog_files = gauge(
            "backlog_files", "Of those, files not yet read to their end, the one being read included."
        )
        self.backlog_seconds = gauge(
            "backlog_seconds",
            "While there is a backlog (unread bytes beyond what is in flight): seconds since the last ack; 0 when "
            "caught up.",
        )
        # --- the spool (issue 21): hard links keeping unshipped backups from the API server's retention ------------
        self.spool_active = gauge(
            "spool_active", "1 while the spool links new backups; 0 when it is off (why: the WARNING at start)."
        )
        self.spool_files = gauge("spool_files", "Backups the spool holds a link to.")
        self.spool_bytes = gauge(
            "spool_bytes",
            "Bytes of the spooled backups whose only name left is the spool's (the API server's retention deleted "
            "its own): what the spool costs the disk, limited by spool_max_bytes.",
        )
        self.spool_linked_bytes = gauge(
            "spool_linked_bytes", "Bytes of every spooled backup, those the API server still keeps included."
        )
        self.spool_budget_bytes = gauge(
            "spool_budget_bytes", "spool_max_bytes: beyond it files only the spool keeps are released (lost)."
        )
        self.spool_free_bytes = gauge("spool_free_bytes", "Free bytes of the spool's (the log's) file system.")
        self.spool_min_free_bytes = gauge(
            "spool_min_free_bytes", "The free-space floor: below it the spool releases files (lost)."
        )
        self.inflight_bytes = gauge("inflight_bytes", "Source bytes read but not yet acked (bounded in memory).")
        self.connected = gauge("connected", "1 while a connection to the receiver is up (handshake done), else 0.")
        self.certificate_expiry_seconds = gauge(
            "certificate_expiry_seconds",
            "Seconds until the client certificate in use expires (negative: expired), by cert (receiver, proxy).",
            ("cert",),
        )
        self.last_ack_timestamp_seconds = gauge(
            "last_ack_timestamp_seconds", "Unix time of the last ack received; 0 before the first."
        )
        self.build_info = gauge(
            "build_info", "Always 1; the labels name the running version and Python.", ("version", "python")
        )
        self.task_restarts = counter(
            "task_restarts",
            "Background tasks restarted after an unexpected error (logged at ERROR with a traceback), by task.",
            ("task",),
        )

        # Label values known in advance are created at 0, so that rate() and absent() work from the first scrape.
        # Certificate expiry is left unset until a certificate is loaded: a 0 would read as "expired".
        for kind in PARSE_ERROR_KINDS:
            self.parse_errors.labels(kind=kind)
        for result in CHECKPOINT_RESULTS:
            self.checkpoint_writes.labels(result=result)
        for task in RESTARTED_TASKS:
            self.task_restarts.labels(task=task)
        for reason in LOSS_REASONS:
            self.lost_files.labels(reason=reason)
            self.lost_bytes.labels(reason=reason)
        self._losses_shown: dict[tuple[bool, str], int] = {}  # (files?, reason) -> count shown (show_losses)
        # python: the interpreter's version (3.12.1); the image's and a pip install's differ (issue 24).
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)

    def show_losses(self, lost_files: int, lost_bytes: int, spool: Spool | None) -> None:
        """Bring pyforward_lost_{files,bytes}_total up to the tailer's counts (retention) and the spool's
        (spool_budget): plain counters of theirs, whole since the start."""
        for counter, reason, current in (
            (self.lost_files, "retention", lost_files),
            (self.lost_bytes, "retention", lost_bytes),
            (self.lost_files, "spool_budget", spool.released_files if spool else 0),
            (self.lost_bytes, "spool_budget", spool.released_bytes if spool else 0),
        ):
            key = (counter is self.lost_files, reason)
            grown = current - self._losses_shown.get(key, 0)
            if grown > 0:
                counter.labels(reason=reason).inc(grown)
                self._losses_shown[key] = current

    def show_spool(self, status: SpoolStatus) -> None:
        self.spool_active.set(1 if status.active else 0)
        self.spool_files.set(status.files)
        self.spool_bytes.set(status.bytes)
        self.spool_linked_bytes.set(status.linked_bytes)
        self.spool_budget_bytes.set(status.budget)
        self.spool_free_bytes.set(status.free or 0)
        self.spool_min_free_bytes.set(status.floor or 0)


@dataclass
class HealthState:
    """What /healthz and /readyz read. The pipeline sets the fields from the event loop; the HTTP thread only reads
    them (single attribute reads and writes are atomic, no lock needed).

    Nothing runs periodically for it (issue 11: idle must cost nothing): /healthz asks the loop to answer (a callback
    scheduled from the HTTP thread), and /metrics and /readyz run ``refresh`` on the loop first (backlog, certificate
    expiry, ...), so values are computed when someone looks.
    """

    connected: bool = False
    backlog_bytes: int = 0
    ready_max_backlog_bytes: int = 64 << 20
    loop_heartbeat: float = field(default_factory=time.monotonic)  # when the loop last answered (or was told to be ok)
    loop: asyncio.AbstractEventLoop | None = None  # the loop to ask; None: only loop_heartbeat is looked at
    refresh: Callable[[], Coroutine[Any, Any, None]] | None = None  # run on the loop before /metrics and /readyz
    _asked: float | None = None  # when the question still unanswered was scheduled
    _answered: threading.Event = field(default_factory=threading.Event)


def _ask_loop(health: HealthState, wait: float) -> float:
    """How long the loop has not answered: schedule a callback on it (unless one is still pending) and wait up to
    `wait` for it. 0.0 when it answered. From the HTTP thread."""
    loop = health.loop
    if loop is None or loop.is_closed():
        return time.monotonic() - health.loop_heartbeat
    if health._asked is None:
        answered = threading.Event()
        health._answered = answered
        health._asked = time.monotonic()

        def answer() -> None:
            health.loop_heartbeat = time.monotonic()
            health._asked = None
            answered.set()

        try:
            loop.call_soon_threadsafe(answer)
        except RuntimeError:  # the loop closed meanwhile
            health._asked = None
            return 0.0
    asked = health._asked
    if health._answered.wait(wait) or asked is None:
        return 0.0
    return time.monotonic() - asked


def healthz(health: HealthState, loop_stall_seconds: float) -> tuple[int, str]:
    stale = _ask_loop(health, min(1.0, loop_stall_seconds / 2))
    if stale > loop_stall_seconds:
        return 503, f"event loop stalled: no heartbeat for {stale:.1f} s (limit {loop_stall_seconds:g} s)"
    return 200, "ok"


def _refresh(health: HealthState, timeout: float = 2.0) -> None:
    """Run ``health.refresh`` on the loop and wait (bounded) for it: a stalled loop leaves the last values."""
    loop, refresh = health.loop, health.refresh
    if loop is None or refresh is None or loop.is_closed():
        return
    try:
        future = asyncio.run_coroutine_threadsafe(refresh(), loop)
    except RuntimeError:  # the loop closed meanwhile
        return
    try:
        future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
    except Exception:
        log.exception("refreshing the metrics failed")


def readyz(health: HealthState) -> tuple[int, str]:
    if health.connected:
        return 200, "ok: connected to the receiver"
    if health.backlog_bytes < health.ready_max_backlog_bytes:
        return 200, f"ok: not connected, backlog {health.backlog_bytes} bytes below {health.ready_max_backlog_bytes}"
    return (
        503,
        f"not ready: not connected to the receiver and backlog {health.backlog_bytes} bytes "
        f">= {health.ready_max_backlog_bytes} (PYFORWARD_READY_MAX_BACKLOG_BYTES)",
    )


def make_app(metrics: Served, health: HealthState, loop_stall_seconds: float = 5.0) -> WSGIApp:
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            _refresh(health)
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            status, text = healthz(health, loop_stall_seconds)
        elif path == "/readyz":
            _refresh(health)
            status, text = readyz(health)
        elif path == "/":
            status, text = 200, "pyforward: /metrics /healthz /readyz"
        else:
            status, text = 404, f"not found: {path}"
        body = (text + "\n").encode()
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        start_response(
            f"{status} {reason}",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    return app


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # One thread per request: a slow scraper must not hold up the kubelet's probes.
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints the traceback to stderr, outside the JSON logs.
        log.error("metrics: handling a request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    # A client that connects and sends nothing would hold its thread forever: bound every socket read.
    timeout = 10.0

    # wsgiref writes an access line per request to stderr, outside our JSON logs; probes come every few seconds.
    def log_message(self, format: str, *args: Any) -> None:
        pass


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port). Port 0 picks a free port."""
    host, sep, port_text = bind.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"PYFORWARD_METRICS_BIND: not HOST:PORT: {bind!r} (examples: 0.0.0.0:9090, [::]:9090)")
    host = host.removeprefix("[").removesuffix("]")
    return host or "0.0.0.0", int(port_text)


def _serve(httpd: WSGIServer, stop: int, on_restart: Callable[[], None] | None = None) -> None:
    """Serve until `stop` is written. If the serving loop fails, it is logged and started again after a capped backoff
    (a daemon thread that dies is silent, and /healthz with it: issue 12); the socket stays bound meanwhile."""
    delay = RESTART_INITIAL
    while True:
        try:
            _serve_until(httpd, stop)
            return
        except Exception as exc:
            log.error(
                "task metrics failed: %s; restarting it in %.1fs", exc, delay, exc_info=True, extra={"task": "metrics"}
            )
            if on_restart is not None:
                on_restart()
            if select.select([stop], [], [], delay)[0]:
                return
            delay = min(delay * 2, RESTART_MAX)


def _serve_until(httpd: WSGIServer, stop: int) -> None:
    """serve_forever without its poll: socketserver wakes every poll_interval to look for a shutdown request (10 times
    a second, a cost at idle: issue 11). Here the thread sleeps in select until a request comes or `stop` is written."""
    with selectors.DefaultSelector() as selector:
        selector.register(httpd, selectors.EVENT_READ)
        selector.register(stop, selectors.EVENT_READ)
        while True:
            ready = selector.select()
            if any(key.fileobj == stop for key, _ in ready):
                return
            httpd.handle_request()  # the socket is readable: accepts without blocking, handles in a thread


class Server:
    """The metrics and health endpoint, served from a daemon thread."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, stop_r: int, stop_w: int) -> None:
        self._httpd = httpd
        self._thread = thread
        self._stop_r = stop_r
        self._stop_w = stop_w
        address = httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
        if self._stop_w >= 0:
            for fd in (self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._stop_r = self._stop_w = -1
        self._httpd.server_close()


def start_server(bind: str, metrics: Served, health: HealthState, loop_stall_seconds: float = 5.0) -> Server:
    """Serve /metrics, /healthz and /readyz on ``bind`` (HOST:PORT, port 0 allowed) from a daemon thread."""
    host, port = parse_bind(bind)
    server_class: type[WSGIServer] = _ThreadingWSGIServer
    if _is_ipv6(host):

        class _V6(_ThreadingWSGIServer):
            address_family = socket.AF_INET6

        server_class = _V6
    try:
        httpd = make_server(
            host,
            port,
            make_app(metrics, health, loop_stall_seconds),
            server_class=server_class,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {bind}: {exc.strerror}") from None
    stop_r, stop_w = os.pipe()

    def restarted() -> None:
        metrics.task_restarts.labels(task="metrics").inc()

    thread = threading.Thread(target=_serve, args=(httpd, stop_r, restarted), name="pyforward-metrics")
    thread.daemon = True
    thread.start()
    server = Server(httpd, thread, stop_r, stop_w)
    log.debug("serving /metrics, /healthz and /readyz on %s", server.url, extra={"bind": bind})
    return server


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        # A name: follow what it resolves to first.
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            return False
        return bool(infos) and infos[0][0] == socket.AF_INET6
