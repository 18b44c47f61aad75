"""Prometheus metrics, /healthz and /readyz for one pyforward process.

The pipeline updates the metrics once per batch of lines or per chunk, never per line: a counter increment takes a
lock, and the hot path reads tens of thousands of lines a second.

The HTTP server runs in its own daemon thread (wsgiref + prometheus_client's WSGI app), not on the event loop, so
that a stuck loop is still visible: /healthz compares the loop's heartbeat with the clock and answers 503 when the
loop has not run for ``loop_stall_seconds``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from pyforward import __version__

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 0.5  # seconds between two refreshes of HealthState.loop_heartbeat

# Ack latency spans a loopback receiver (< 1 ms) to a congested fluentd behind a tunnel (tens of seconds); the
# client's ack timeout defaults to 30 s, so the top bucket is above it.
ACK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

PARSE_ERROR_KINDS = ("json", "not_object", "invalid_utf8", "bad_time")
CHECKPOINT_RESULTS = ("ok", "error")
CERT_KINDS = ("receiver", "proxy")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


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
            "Seconds from writing a chunk to receiving its ack.",
            buckets=ACK_LATENCY_BUCKETS,
            registry=r,
        )
        # --- checkpoint ---------------------------------------------------------------------------------------
        self.checkpoint_writes = counter("checkpoint_writes", "Checkpoint writes, by result (ok, error).", ("result",))
        # --- state --------------------------------------------------------------------------------------------
        self.backlog_bytes = gauge(
            "backlog_bytes", "Bytes in the audit log and its rotated files not yet acked (the file is the buffer)."
        )
        self.backlog_seconds = gauge(
            "backlog_seconds", "Age in seconds of the oldest line not yet acked; 0 when caught up."
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
        self.build_info = gauge("build_info", "Always 1; the labels name the running version.", ("version",))

        # Label values known in advance are created at 0, so that rate() and absent() work from the first scrape.
        # Certificate expiry is left unset until a certificate is loaded: a 0 would read as "expired".
        for kind in PARSE_ERROR_KINDS:
            self.parse_errors.labels(kind=kind)
        for result in CHECKPOINT_RESULTS:
            self.checkpoint_writes.labels(result=result)
        self.build_info.labels(version=__version__).set(1)


@dataclass
class HealthState:
    """What /healthz and /readyz read. The pipeline sets the fields from the event loop; the HTTP thread only reads
    them (single attribute reads and writes are atomic, no lock needed)."""

    connected: bool = False
    backlog_bytes: int = 0
    ready_max_backlog_bytes: int = 64 << 20
    loop_heartbeat: float = field(default_factory=time.monotonic)


async def heartbeat(health: HealthState) -> None:
    """Refresh ``health.loop_heartbeat`` every HEARTBEAT_INTERVAL seconds, forever: run it as a task on the loop."""
    while True:
        health.loop_heartbeat = time.monotonic()
        await asyncio.sleep(HEARTBEAT_INTERVAL)


def healthz(health: HealthState, loop_stall_seconds: float) -> tuple[int, str]:
    stale = time.monotonic() - health.loop_heartbeat
    if stale > loop_stall_seconds:
        return 503, f"event loop stalled: no heartbeat for {stale:.1f} s (limit {loop_stall_seconds:g} s)"
    return 200, "ok"


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


def make_app(metrics: Metrics, health: HealthState, loop_stall_seconds: float = 5.0) -> WSGIApp:
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            status, text = healthz(health, loop_stall_seconds)
        elif path == "/readyz":
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


class Server:
    """The metrics and health endpoint, served from a daemon thread."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
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
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


def start_server(bind: str, metrics: Metrics, health: HealthState, loop_stall_seconds: float = 5.0) -> Server:
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
    # poll_interval bounds how long close() waits for serve_forever to notice the shutdown request.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="pyforward-metrics")
    thread.daemon = True
    thread.start()
    server = Server(httpd, thread)
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
