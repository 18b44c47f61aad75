"""Metrics, /healthz and /readyz over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import platform
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyforward import __version__
from pyforward.metrics import (
    ACK_LATENCY_BUCKETS,
    HealthState,
    Metrics,
    Server,
    parse_bind,
    start_server,
)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
            if response.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            return response.status, raw.decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def health() -> HealthState:
    return HealthState(ready_max_backlog_bytes=1000)


@pytest.fixture
def server(metrics: Metrics, health: HealthState) -> Iterator[Server]:
    srv = start_server("127.0.0.1:0", metrics, health, loop_stall_seconds=5.0)
    yield srv
    srv.close()


COUNTERS = (
    "lines_read",
    "read_bytes",
    "records_sent",
    "records_acked",
    "chunks_sent",
    "chunks_acked",
    "chunks_retried",
    "reconnects",
    "truncated_lines",
    "truncation_lost_bytes",
    "destination_changes",
    "rotations",
    "checkpoint_misses",
    "unreadable_files",
)


def test_scrape_names_and_values(metrics: Metrics, server: Server) -> None:
    for i, name in enumerate(COUNTERS, start=1):
        getattr(metrics, name).inc(i)
    metrics.parse_errors.labels(kind="json").inc(3)
    metrics.checkpoint_writes.labels(result="ok").inc(7)
    metrics.lost_files.labels(reason="spool_budget").inc(2)
    metrics.lost_bytes.labels(reason="spool_budget").inc(4096)
    metrics.ack_latency.observe(0.002)
    metrics.ack_latency.observe(45.0)
    metrics.backlog_bytes.set(12345)
    metrics.backlog_seconds.set(1.5)
    metrics.inflight_bytes.set(4096)
    metrics.connected.set(1)
    metrics.certificate_expiry_seconds.labels(cert="receiver").set(86400)
    metrics.last_ack_timestamp_seconds.set(1_700_000_000)

    status, text, headers = get(f"{server.url}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    values = samples(text)
    for i, name in enumerate(COUNTERS, start=1):
        assert values[(f"pyforward_{name}_total", ())] == i, name
    assert values[("pyforward_parse_errors_total", (("kind", "json"),))] == 3
    assert values[("pyforward_checkpoint_writes_total", (("result", "ok"),))] == 7
    assert values[("pyforward_lost_files_total", (("reason", "spool_budget"),))] == 2
    assert values[("pyforward_lost_bytes_total", (("reason", "spool_budget"),))] == 4096
    assert values[("pyforward_ack_latency_seconds_count", ())] == 2
    assert values[("pyforward_ack_latency_seconds_bucket", (("le", "0.0025"),))] == 1
    assert values[("pyforward_ack_latency_seconds_bucket", (("le", "60.0"),))] == 2
    assert values[("pyforward_backlog_bytes", ())] == 12345
    assert values[("pyforward_backlog_seconds", ())] == 1.5
    assert values[("pyforward_inflight_bytes", ())] == 4096
    assert values[("pyforward_connected", ())] == 1
    assert values[("pyforward_certificate_expiry_seconds", (("cert", "receiver"),))] == 86400
    assert values[("pyforward_last_ack_timestamp_seconds", ())] == 1_700_000_000
    assert values[("pyforward_build_info", (("python", platform.python_version()), ("version", __version__)))] == 1


def test_known_labels_start_at_zero_and_expiry_stays_unset(metrics: Metrics, server: Server) -> None:
    values = samples(get(f"{server.url}/metrics")[1])
    for kind in ("json", "not_object", "invalid_utf8", "bad_time"):
        assert values[("pyforward_parse_errors_total", (("kind", kind),))] == 0
    for result in ("ok", "error"):
        assert values[("pyforward_checkpoint_writes_total", (("result", result),))] == 0
    # The loss counters and the restart counter of each restartable task: the monitoring's alerts use these names.
    for name in ("lost_files", "lost_bytes"):  # by reason (issue 21)
        for reason in ("retention", "spool_budget"):
            assert values[(f"pyforward_{name}_total", (("reason", reason),))] == 0, (name, reason)
    for name in ("checkpoint_misses", "unreadable_files"):
        assert values[(f"pyforward_{name}_total", ())] == 0, name
    for task in ("discovery", "metrics"):
        assert values[("pyforward_task_restarts_total", (("task", task),))] == 0, task
    for gauge in ("backlog_bytes", "backlog_files", "log_files"):
        assert (f"pyforward_{gauge}", ()) in values, gauge
    # A certificate expiry of 0 would read as "expired": no sample until a certificate is loaded.
    assert not [key for key in values if key[0] == "pyforward_certificate_expiry_seconds"]


def test_histogram_buckets_span_1ms_to_60s() -> None:
    assert ACK_LATENCY_BUCKETS[0] == 0.001
    assert ACK_LATENCY_BUCKETS[-1] == 60.0
    assert list(ACK_LATENCY_BUCKETS) == sorted(ACK_LATENCY_BUCKETS)


def test_instances_have_separate_registries() -> None:
    first, second = Metrics(), Metrics()
    first.lines_read.inc(5)
    assert first.registry.get_sample_value("pyforward_lines_read_total") == 5
    assert second.registry.get_sample_value("pyforward_lines_read_total") == 0


def test_openmetrics_and_gzip_negotiation(metrics: Metrics, server: Server) -> None:
    metrics.lines_read.inc()
    status, text, headers = get(
        f"{server.url}/metrics",
        {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert headers.get("Content-Encoding") == "gzip"
    assert text.rstrip().endswith("# EOF")
    assert "pyforward_lines_read_total 1.0" in text


def test_healthz_ok_then_stale(health: HealthState, server: Server) -> None:
    health.loop_heartbeat = time.monotonic()
    assert get(f"{server.url}/healthz")[:2] == (200, "ok\n")
    health.loop_heartbeat = time.monotonic() - 12.0
    status, text, _ = get(f"{server.url}/healthz")
    assert status == 503
    assert "event loop stalled" in text
    stale = float(text.split("no heartbeat for ")[1].split(" s")[0])
    assert 12.0 <= stale < 60.0
    health.loop_heartbeat = time.monotonic()
    assert get(f"{server.url}/healthz")[0] == 200


def test_healthz_honours_the_stall_limit(metrics: Metrics, health: HealthState) -> None:
    srv = start_server("127.0.0.1:0", metrics, health, loop_stall_seconds=60.0)
    try:
        health.loop_heartbeat = time.monotonic() - 30.0
        assert get(f"{srv.url}/healthz")[0] == 200
        health.loop_heartbeat = time.monotonic() - 61.0
        assert get(f"{srv.url}/healthz")[0] == 503
    finally:
        srv.close()


async def test_healthz_asks_the_loop_and_sees_it_blocked(metrics: Metrics, health: HealthState) -> None:
    # Nothing refreshes a heartbeat periodically (an idle sidecar does no periodic work): /healthz schedules a callback
    # on the loop and says "stalled" once that callback has waited longer than the limit.
    health.loop = asyncio.get_running_loop()
    health.loop_heartbeat = time.monotonic() - 3600.0  # long idle: must not count as stalled while the loop answers
    srv = start_server("127.0.0.1:0", metrics, health, loop_stall_seconds=0.5)
    try:
        assert (await asyncio.to_thread(get, f"{srv.url}/healthz"))[:2] == (200, "ok\n")
        # Blocked from here on, for as long as this synchronous code runs: the question goes unanswered.
        status, _, _ = get(f"{srv.url}/healthz")
        assert status == 200  # asked 0.25 s ago: within the limit
        threading.Event().wait(0.5)  # blocking the loop is the point of this test, not synchronisation
        status, text, _ = get(f"{srv.url}/healthz")
        assert status == 503
        assert "stalled" in text
        stale = float(text.split("no heartbeat for ")[1].split(" s")[0])
        assert 0.5 < stale < 5.0
        # Let the loop run: it answers the pending question, and /healthz is ok again.
        status, _, _ = await asyncio.to_thread(get, f"{srv.url}/healthz")
        assert status == 200
    finally:
        srv.close()


async def test_metrics_and_readyz_refresh_on_the_loop(metrics: Metrics, health: HealthState) -> None:
    refreshed = 0

    async def refresh() -> None:
        nonlocal refreshed
        refreshed += 1
        health.backlog_bytes = 5000  # above ready_max_backlog_bytes (1000): not ready while disconnected
        metrics.backlog_bytes.set(5000)

    health.loop = asyncio.get_running_loop()
    health.refresh = refresh
    srv = start_server("127.0.0.1:0", metrics, health)
    try:
        status, text, _ = await asyncio.to_thread(get, f"{srv.url}/metrics")
        assert status == 200
        assert samples(text)[("pyforward_backlog_bytes", ())] == 5000
        status, text, _ = await asyncio.to_thread(get, f"{srv.url}/readyz")
        assert status == 503
        assert "5000" in text
        assert refreshed == 2
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("connected", "backlog", "expected", "words"),
    [
        (True, 0, 200, "connected"),
        (True, 10_000, 200, "connected"),  # connected: a large backlog is being worked off
        (False, 999, 200, "below"),
        (False, 1000, 503, "not connected"),
        (False, 50_000, 503, "PYFORWARD_READY_MAX_BACKLOG_BYTES"),
    ],
)
def test_readyz(health: HealthState, server: Server, connected: bool, backlog: int, expected: int, words: str) -> None:
    health.connected = connected
    health.backlog_bytes = backlog
    status, text, _ = get(f"{server.url}/readyz")
    assert status == expected
    assert words in text


def test_a_silent_client_does_not_block_the_probes(server: Server) -> None:
    # One thread per request: a scraper that connects and sends nothing must not hold up the kubelet.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        assert get(f"{server.url}/healthz")[0] == 200
        assert get(f"{server.url}/readyz")[0] == 200


def test_unknown_path_is_404(server: Server) -> None:
    assert get(f"{server.url}/nope")[0] == 404


def test_busy_port_is_a_clear_error(metrics: Metrics, health: HealthState) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_server(f"127.0.0.1:{port}", metrics, health)


def test_close_releases_the_port(metrics: Metrics, health: HealthState) -> None:
    srv = start_server("127.0.0.1:0", metrics, health)
    port = srv.port
    assert get(f"{srv.url}/healthz")[0] == 200
    srv.close()
    srv.close()  # idempotent
    again = start_server(f"127.0.0.1:{port}", metrics, health)
    try:
        assert again.port == port
    finally:
        again.close()


def test_ipv6_loopback(metrics: Metrics, health: HealthState) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        srv = start_server("[::1]:0", metrics, health)
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    try:
        assert srv.url.startswith("http://[::1]:")
        assert get(f"{srv.url}/healthz")[0] == 200
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        (":9090", ("0.0.0.0", 9090)),
        ("[::]:0", ("::", 0)),
        ("localhost:8080", ("localhost", 8080)),
    ],
)
def test_parse_bind(bind: str, expected: tuple[str, int]) -> None:
    assert parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["9090", "host:", "host:http", "host:70000"])
def test_parse_bind_rejects(bind: str) -> None:
    with pytest.raises(ValueError, match="PYFORWARD_METRICS_BIND"):
        parse_bind(bind)


def test_the_server_thread_is_restarted_after_a_failure_and_counted(
    metrics: Metrics, health: HealthState, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon thread that dies is silent (issue 12): its serving loop failing is logged and restarted."""
    import pyforward.metrics as module

    real = module._ThreadingWSGIServer.handle_request
    failures = [1]

    def handle_request(self: module._ThreadingWSGIServer) -> None:
        if failures:
            failures.pop()
            raise OSError("injected: accept failed")
        real(self)

    monkeypatch.setattr(module._ThreadingWSGIServer, "handle_request", handle_request)
    monkeypatch.setattr(module, "RESTART_INITIAL", 0.01)
    with caplog.at_level("ERROR", "pyforward.metrics"):
        srv = start_server("127.0.0.1:0", metrics, health)
        try:
            # The first request makes the loop fail; it is still in the socket's backlog, served after the restart.
            status, text, _ = get(f"{srv.url}/metrics")
        finally:
            srv.close()
    assert status == 200
    assert samples(text)[("pyforward_task_restarts_total", (("task", "metrics"),))] == 1
    [record] = caplog.records
    assert record.getMessage().startswith("task metrics failed: injected: accept failed; restarting it in")
    assert record.exc_info is not None
