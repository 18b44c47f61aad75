"""`pyforward receive --metrics-bind`: the receiver's counters as Prometheus metrics (issue 22: the duplicates it
dropped and the sources it tracks), served by the same endpoint as `pyforward run`'s (metrics.start_server).

The counters are the plain ReceiverStats and SourceMarks fields, read when /metrics is scraped (a collector): the
request path increments ints, never a Prometheus counter (its lock per increment is measurable at 50k events/s).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pyforward.receiver.server import Receiver

__all__ = ["ReceiverMetrics"]


class _ReceiverCollector(Collector):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def collect(self) -> Iterator[Metric]:
        stats = self._receiver.stats
        marks = self._receiver.marks

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"pyforward_receiver_{name}", doc, value=value)

        yield counter("requests", "Requests received (a chunk of a pyforward or fluent-bit sender).", stats.requests)
        yield counter("records", "Records written to the output.", stats.records)
        yield counter("acks", "Acks sent.", stats.acks)
        yield counter("connections", "Connections accepted.", stats.connections)
        yield counter(
            "duplicate_chunks", "Requests with a chunk id acked recently, acked again without writing them.",
            stats.duplicate_chunks,
        )  # fmt: skip
        yield counter(
            "bad_requests", "Requests refused as malformed (the connection is closed, no ack).", stats.bad_requests
        )
        yield counter(
            "bad_ranges", "Requests whose pyforward.* record ranges made no sense (the connection is closed).",
            stats.bad_ranges,
        )  # fmt: skip
        yield counter("write_errors", "Output writes that failed (not acked).", stats.write_errors)
        dropped = CounterMetricFamily(
            "pyforward_receiver_duplicates_dropped",
            "Records (unit=records) and their source bytes (unit=bytes) a sender sent again that were written "
            "already (their range ends at or before the source's mark): acked, not written again.",
            labels=["unit"],
        )
        dropped.add_metric(["records"], marks.dropped_records if marks is not None else 0)
        dropped.add_metric(["bytes"], marks.dropped_bytes if marks is not None else 0)
        yield dropped
        yield counter(
            "sources_forgotten", "Sources forgotten (idle too long, or the idlest over the cap): a later re-send of "
            "one of them is written again.", marks.forgotten if marks is not None else 0,
        )  # fmt: skip
        yield counter(
            "state_write_errors", "Writes of the exactly-once state that failed (a restart may duplicate).",
            marks.save_errors if marks is not None else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pyforward_receiver_sources_tracked",
            "Sources (files of pyforward senders) whose written end is remembered.",
            value=marks.tracked if marks is not None else 0,
        )
        yield GaugeMetricFamily(
            "pyforward_receiver_active_connections", "Connections open now.", value=stats.active_connections
        )


class ReceiverMetrics:
    """The receiver's registry (metrics.Served)."""

    def __init__(self, receiver: Receiver) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.registry.register(_ReceiverCollector(receiver))
        self.task_restarts = Counter(
            "pyforward_task_restarts", "The metrics server restarted after an error.", ["task"], registry=self.registry
        )
