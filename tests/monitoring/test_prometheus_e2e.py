"""The monitoring kit against a real Prometheus (Debian's) scraping a real `pyforward run` every second, with
docs/monitoring/prometheus-rules.yaml loaded as it ships (no shortened `for:`; a 10-minute alert is checked in its
pending state), everything on 127.0.0.1:

* an outage and a loss: the receiver stops -> PyforwardDisconnected goes pending; an unread rotated file is
  deleted -> pyforward_lost_files_total / _bytes_total rise and PyforwardEventsLost fires; the receiver comes back
  -> everything else arrives and the disconnected alert clears;
* the dashboard: every query of docs/monitoring/grafana-dashboard.json, its variables resolved the way Grafana
  would, is valid and returns series after a short healthy run, and no alert is active.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pyforward.auditgen import audit_id
from tests.harness import Harness, assert_delivered, free_port, try_metrics
from tests.monitoring.prom import DASHBOARD, JOB, TARGET_LABELS, PrometheusError, PrometheusProcess, load_generator

pytestmark = pytest.mark.monitoring

StartPrometheus = Callable[[Sequence[str]], PrometheusProcess]

#: How the test fills Grafana's own variables: windows long enough to hold several 1 s scrapes.
GRAFANA_GLOBALS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}
#: Metrics that may legitimately have no series in a healthy run: families labelled at their first increment.
#: For those an empty result is accepted only when Prometheus has the metric's metadata from the scrape (so the
#: name is still checked against what the process exports).
LABELLED_ON_FIRST_USE = {"pyforward_task_restarts_total"}


def backups(log: Path) -> list[Path]:
    """The rotated files beside ``log``, oldest first (lumberjack's names sort by their timestamp)."""
    return sorted(p for p in log.parent.glob(f"{log.stem}-*{log.suffix}*") if p != log)


def test_alerts_follow_a_real_outage_and_a_real_loss(harness: Harness, prometheus: StartPrometheus) -> None:
    receiver = harness.receiver("mtls")
    # Small files and a small in-flight budget: with the receiver gone, rotated files pile up unread.
    writer = harness.audit_log(max_bytes=48 << 10)
    bind = f"127.0.0.1:{free_port()}"
    env = harness.run_env(
        receiver,
        metrics_bind=bind,
        chunk_max_bytes=8 << 10,
        max_line_bytes=16 << 10,
        max_inflight_bytes=32 << 10,
        spool_max_bytes=0,  # the spool would keep the deleted file (issue 21): this test needs a real loss
    )
    run = harness.run(env)
    prom = prometheus([bind])
    output = receiver.received()
    first = writer.write(100)
    harness.wait_delivered(first, output, run=run)
    target = f'job="{JOB}"'
    prom.wait_until(lambda: prom.value(f"pyforward_connected{{{target}}}") == 1, what="Prometheus to see connected=1")
    prom.wait_until(lambda: prom.alerts() == [], what="no active alert while healthy and connected")

    # --- the receiver stops: connected drops to 0 and the 10-minute alert goes pending at the next evaluation
    receiver.stop()
    alert = prom.wait_alert("PyforwardDisconnected", "pending")
    assert alert["labels"] | TARGET_LABELS == alert["labels"], "the alert keeps the target's labels"
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["summary"] == (
        "pyforward kube-apiserver-e2e in shoot--e2e has not been connected to the receiver for 10 minutes"
    )
    assert alert["annotations"]["runbook_url"] == "docs/operations.md#pyforwarddisconnected"

    # --- rotated files pile up unread; one of them is deleted before pyforward could read it
    during = writer.write(600)  # ~0.8 MB: about 15 rotated files, 25 times the in-flight budget
    rotated = backups(harness.log_path)
    assert len(rotated) >= 10, rotated
    present = len(rotated) + 1
    run.wait_until(
        lambda: try_metrics(bind).get("pyforward_log_files") == present,
        what=f"pyforward to see the {present} log files",
    )
    victim = rotated[-1]  # the newest rotated file: far beyond what the in-flight budget let pyforward read
    data = victim.read_bytes()
    lost_ids = [audit_id(line) for line in data.splitlines()]
    victim.unlink()

    prom.wait_until(
        lambda: prom.value(f'pyforward_lost_files_total{{{target},reason="retention"}}') == 1,
        what="Prometheus to see 1 file lost",
    )
    assert prom.value(f'pyforward_lost_bytes_total{{{target},reason="retention"}}') == len(data)
    assert prom.value(f'pyforward_lost_files_total{{{target},reason="spool_budget"}}') == 0
    lost = prom.wait_alert("PyforwardEventsLost", "firing")
    assert lost["labels"]["severity"] == "critical"
    assert f"1 files and {len(data) / 1024:.4g}kiB since the process started" in lost["annotations"]["description"]
    assert prom.alert("PyforwardDisconnected") is not None, "still disconnected"

    # --- the receiver is back: everything but the deleted file arrives, the disconnected alert clears
    receiver.start()
    expected = [i for i in first + during if i not in set(lost_ids)]
    counts = harness.wait_delivered(expected, output, run=run, timeout=60)
    # Nothing was in flight when the receiver stopped (all acked), so no duplicates; an event of the deleted file
    # would show as unexpected.
    assert_delivered(expected, counts, context="after the outage")
    prom.wait_until(lambda: prom.alert("PyforwardDisconnected") is None, what="PyforwardDisconnected to clear")
    assert prom.alert("PyforwardEventsLost") is not None, "a loss alert stays for an hour, also after recovery"
    assert run.terminate() == 0


# --- the dashboard ------------------------------------------------------------------------------------------------


def resolve_variables(doc: dict[str, Any], prom: PrometheusProcess) -> dict[str, str]:
    """Each query variable's values as Grafana gets them (``label_values(selector, label)`` is the series API),
    in the dashboard's order so that later ones see earlier ones; the first value is the one selected."""
    chosen: dict[str, str] = {}
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
        assert match, f"variable {var['name']}: not a label_values() query: {var['query']}"
        selector = substitute(match.group(1), chosen)
        series = prom.api("series", [("match[]", selector)])
        values = sorted({s[match.group(2)] for s in series if match.group(2) in s})
        assert values, f"variable {var['name']}: {var['query']} has no values ({selector})"
        chosen[f"${var['name']}"] = values[0]
    return chosen


def scraped_metadata(prom: PrometheusProcess, name: str) -> bool:
    """Whether the scrape saw the HELP/TYPE of ``name``: a labelled family without children has no sample but
    has its metadata (Prometheus 2 keys a counter's metadata by the family name, without ``_total``)."""
    return any(
        prom.api("targets/metadata", [("match_target", f'{{job="{JOB}"}}'), ("metric", family)])
        for family in {name, name.removesuffix("_total")}
    )


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in sorted({**GRAFANA_GLOBALS, **variables}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def test_every_dashboard_query_returns_series_from_a_real_run(harness: Harness, prometheus: StartPrometheus) -> None:
    receiver = harness.receiver("mtls")  # TLS: the certificate expiry gauge exists
    writer = harness.audit_log(max_bytes=256 << 10)  # a few rotations
    ids = writer.write(2000)
    bind = f"127.0.0.1:{free_port()}"
    run = harness.run(harness.run_env(receiver, metrics_bind=bind))
    prom = prometheus([bind])
    harness.wait_delivered(ids, receiver.received(), run=run)
    target = f'job="{JOB}"'
    prom.wait_until(
        lambda: prom.value(f"pyforward_records_acked_total{{{target}}}") == len(ids)
        and (prom.value(f"count_over_time(pyforward_records_acked_total{{{target}}}[1m])") or 0) >= 5,
        what="Prometheus to hold the final counts and a few samples for rate()",
    )

    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = resolve_variables(doc, prom)
    assert variables == {"$job": JOB, "$namespace": TARGET_LABELS["namespace"], "$instance": bind}
    failures = []
    queries = 0
    for panel in load_generator().panels(doc):
        for query in panel.get("targets", []):
            queries += 1
            expr = substitute(query["expr"], variables)
            where = f"panel {panel['title']!r} query {query['refId']}: {expr}"
            if "$" in expr:
                failures.append(f"{where}: a variable the dashboard does not define")
                continue
            try:
                result = prom.query(expr)
            except PrometheusError as exc:
                failures.append(f"{where}: invalid: {exc}")
                continue
            if result:
                continue
            # No series: a failure, unless every metric of the query is labelled on first use and was scraped.
            names = set(re.findall(r"\b(?:pyforward|process)_\w+", expr))
            if not names or not names <= LABELLED_ON_FIRST_USE:
                failures.append(f"{where}: no series")
            failures.extend(
                f"{where}: no series, and {name} is not among the scraped metrics"
                for name in names & LABELLED_ON_FIRST_USE
                if not scraped_metadata(prom, name)
            )
    assert queries >= 30, f"only {queries} queries found: did the dashboard's layout change?"
    assert not failures, "dashboard queries that would show nothing:\n" + "\n".join(failures)

    # A healthy run that shipped everything: no alert pending or firing.
    prom.wait_until(lambda: prom.alerts() == [], what="no active alert after a healthy run")
    assert run.terminate() == 0
