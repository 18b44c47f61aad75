"""Generate the monitoring kit's derived files from code, never by hand:

* ``prometheusrule.yaml``: prometheus-rules.yaml (the source, a plain Prometheus rules file) wrapped as a
  prometheus-operator ``PrometheusRule``;
* ``grafana-dashboard.json``: the Grafana dashboard, built with Grafana's grafana-foundation-sdk (the typed
  builders of the dashboard schema, so a misspelt option is a type error, not a silently ignored JSON key).

Usage: ``python docs/monitoring/generate.py`` writes both; ``--check`` only compares and exits 1 when one is stale
(tests/monitoring/test_kit_files.py does the same). Needs the ``monitoring`` extra
(``pip install -e '.[monitoring]'``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

HERE = Path(__file__).resolve().parent
RULES = HERE / "prometheus-rules.yaml"
PROMETHEUSRULE = HERE / "prometheusrule.yaml"
DASHBOARD = HERE / "grafana-dashboard.json"

# ------------------------------------------------------------------------------------------------ PrometheusRule


def render_prometheusrule(rules_text: str) -> str:
    """The PrometheusRule manifest carrying the groups of the plain rules file ``rules_text``.

    Built from the text, not by a YAML round trip: the rules keep their layout and their comments (the reasons
    for each threshold), which a dump would drop. The result is checked by loading it back.
    """
    lines = rules_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("groups:")]
    if len(starts) != 1:
        raise ValueError(f"{RULES.name}: expected one top-level 'groups:' line, found {len(starts)}")
    body = "\n".join(f"  {line}" if line.strip() else "" for line in lines[starts[0] :])
    text = (
        "# GENERATED from prometheus-rules.yaml by `python docs/monitoring/generate.py`: do not edit here, edit the\n"
        "# rules file and re-generate. The same alerts as a prometheus-operator PrometheusRule; unit tests:\n"
        "# prometheus-rules.test.yaml; runbook: docs/operations.md#alerts.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: pyforward\n"
        "  labels:\n"
        "    # Label it the way the ruleSelector of your Prometheus expects (kube-prometheus: release: <name>).\n"
        "    app.kubernetes.io/name: pyforward\n"
        "    app.kubernetes.io/component: alerting-rules\n"
        "spec:\n"
        f"{body}\n"
    )
    loaded = yaml.safe_load(text)
    if loaded["spec"]["groups"] != yaml.safe_load(rules_text)["groups"]:
        raise ValueError(f"{RULES.name}: the rules do not survive being indented under spec: (a multi-line string?)")
    return text


# ------------------------------------------------------------------------------------------------ dashboard

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Every query selects through the dashboard's variables; ".*" (the "All" value) also matches a missing label, so
#: static scrape configs without namespace work too.
SELECTOR = 'job=~"$job", namespace=~"$namespace", instance=~"$instance"'
LEGEND = "{{namespace}} {{instance}}"


def sel(metric: str, extra: str = "") -> str:
    """``metric{<the dashboard's selector>[, extra]}``."""
    return f"{metric}{{{SELECTOR}{', ' + extra if extra else ''}}}"


def rate(metric: str, extra: str = "") -> str:
    return f"rate({sel(metric, extra)}[$__rate_interval])"


def increase(metric: str, extra: str = "") -> str:
    return f"increase({sel(metric, extra)}[$__rate_interval])"


def query(expr: str, legend: str = LEGEND, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _targets(panel: Any, queries: Sequence[tuple[str, str]]) -> None:
    for i, (expr, legend) in enumerate(queries):
        panel.with_target(query(expr, legend, ref=chr(ord("A") + i)))


class Layout:
    """Hands out panel and row ids in order: unique and stable (links to a panel name its id)."""

    def __init__(self) -> None:
        self.next_id = 1

    def take(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def graph(
    layout: Layout,
    title: str,
    description: str,
    unit: str,
    queries: Sequence[tuple[str, str]],
    *,
    width: int = 12,
    bars: bool = False,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .id(layout.take())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if bars:
        panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    _targets(panel, queries)
    return panel


def big_number(
    layout: Layout,
    title: str,
    description: str,
    unit: str,
    expr: str,
    steps: list[Threshold],
    *,
    width: int = 4,
) -> stat.Panel:
    return (
        stat.Panel()
        .id(layout.take())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(builders.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
        .with_target(query(expr, ""))
    )


def build_dashboard() -> builders.Dashboard:
    layout = Layout()
    green, orange, red = "green", "orange", "red"
    s = SELECTOR
    day = 86400.0

    def variable(name: str, label: str, query_text: str) -> builders.QueryVariable:
        return (
            builders.QueryVariable(name)
            .label(label)
            .datasource(DATASOURCE)
            .query(query_text)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )

    dash = (
        builders.Dashboard("pyforward")
        .uid("pyforward")
        .description(
            "pyforward, the audit log shipper: throughput, acks, backlog, connection, checkpoint, losses, "
            "certificates and the process. Generated by docs/monitoring/generate.py; alerts in "
            "docs/monitoring/prometheus-rules.yaml, runbook in docs/operations.md."
        )
        .tags(["pyforward", "audit", "logging"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("1m")
        .time("now-6h", "now")
        .timezone(common.TimeZoneBrowser)
        .with_variable(
            builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(variable("job", "Job", "label_values(pyforward_build_info, job)"))
        .with_variable(
            variable("namespace", "Namespace", 'label_values(pyforward_build_info{job=~"$job"}, namespace)')
        )
        .with_variable(
            variable(
                "instance",
                "Instance",
                'label_values(pyforward_build_info{job=~"$job", namespace=~"$namespace"}, instance)',
            )
        )
    )

    # --- overview: one number each, summed over the selection ----------------------------------------------------
    dash.with_row(builders.Row("Overview").id(layout.take()))
    dash.with_panel(
        big_number(
            layout, "Up", "Processes scraped successfully (up == 1).", "short",
            f"sum(up{{{s}}})", [Threshold(None, red), Threshold(1, green)],
        )
    )
    dash.with_panel(
        big_number(
            layout, "Connected", "Processes with a connection to the receiver (handshake done).", "short",
            f"sum({sel('pyforward_connected')})", [Threshold(None, red), Threshold(1, green)],
        )
    )
    dash.with_panel(
        big_number(
            layout, "Backlog", "Audit log bytes not yet acked, summed.", "bytes",
            f"sum({sel('pyforward_backlog_bytes')})",
            [Threshold(None, green), Threshold(64 * 2**20, orange), Threshold(256 * 2**20, red)],
        )
    )
    dash.with_panel(
        big_number(
            layout, "Behind", "Largest time since the last ack while there is a backlog (0 when caught up).", "s",
            f"max({sel('pyforward_backlog_seconds')})",
            [Threshold(None, green), Threshold(300, orange), Threshold(600, red)],
        )
    )
    dash.with_panel(
        big_number(
            layout, "Files lost",
            "Rotated log files deleted (retention) or released (spool guard) before they were read, in the time range.",
            "short",
            f"sum(increase({sel('pyforward_lost_files_total')}[$__range]))",
            [Threshold(None, green), Threshold(1, red)],
        )
    )
    dash.with_panel(
        big_number(
            layout, "First certificate expiry", "Soonest expiry of a client certificate in use.", "s",
            f"min({sel('pyforward_certificate_expiry_seconds')})",
            [Threshold(None, red), Threshold(7 * day, orange), Threshold(14 * day, green)],
        )
    )

    # --- throughput ----------------------------------------------------------------------------------------------
    dash.with_row(builders.Row("Throughput").id(layout.take()))
    dash.with_panel(
        graph(
            layout, "Lines read and records acked", "Audit lines read from the log, records the receiver acked.",
            "cps",
            [
                (rate("pyforward_lines_read_total"), "read " + LEGEND),
                (rate("pyforward_records_acked_total"), "acked " + LEGEND),
            ],
        )
    )
    dash.with_panel(
        graph(
            layout, "Bytes read", "Audit log bytes read, newlines included.", "binBps",
            [(rate("pyforward_read_bytes_total"), LEGEND)],
        )
    )
    dash.with_panel(
        graph(
            layout, "Chunks", "Forward requests written (retries included), acked, and sent again.", "reqps",
            [
                (rate("pyforward_chunks_sent_total"), "sent " + LEGEND),
                (rate("pyforward_chunks_acked_total"), "acked " + LEGEND),
                (rate("pyforward_chunks_retried_total"), "retried " + LEGEND),
            ],
            width=24,
        )
    )

    # --- acks ------------------------------------------------------------------------------------------------------
    dash.with_row(builders.Row("Ack latency").id(layout.take()))
    bucket = rate("pyforward_ack_latency_seconds_bucket")
    dash.with_panel(
        graph(
            layout, "Ack latency", "Chunk written to ack received: quantiles from the histogram.", "s",
            [
                (f"histogram_quantile(0.5, {bucket})", "p50 " + LEGEND),
                (f"histogram_quantile(0.9, {bucket})", "p90 " + LEGEND),
                (f"histogram_quantile(0.99, {bucket})", "p99 " + LEGEND),
            ],
        )
    )
    dash.with_panel(
        graph(
            layout, "Mean ack latency", "Sum of latencies / acks, per process.", "s",
            [
                (
                    f"{rate('pyforward_ack_latency_seconds_sum')} / {rate('pyforward_ack_latency_seconds_count')}",
                    LEGEND,
                )
            ],
        )
    )

    # --- backlog -------------------------------------------------------------------------------------------------
    dash.with_row(builders.Row("Backlog").id(layout.take()))
    dash.with_panel(
        graph(
            layout, "Backlog and in flight",
            "Bytes of the log files not yet acked (the file is the buffer), and of those the bytes read and in flight.",
            "bytes",
            [
                (sel("pyforward_backlog_bytes"), "backlog " + LEGEND),
                (sel("pyforward_inflight_bytes"), "in flight " + LEGEND),
            ],
        )
    )
    dash.with_panel(
        graph(
            layout, "Behind (seconds since the last ack)", "While there is a backlog: seconds since the last ack.",
            "s",
            [(sel("pyforward_backlog_seconds"), LEGEND)],
        )
    )
    dash.with_panel(
        graph(
            layout, "Log files: present and not yet read",
            "The live log and its rotated files present, and of those the ones not yet read to their end. When all "
            "of them are unread, the next rotation of the API server may delete unread events.",
            "short",
            [
                (sel("pyforward_log_files"), "present " + LEGEND),
                (sel("pyforward_backlog_files"), "unread " + LEGEND),
            ],
            width=24,
        )
    )

    # --- connection --------------------------------------------------------------------------------------------------
    dash.with_row(builders.Row("Connection").id(layout.take()))
    dash.with_panel(
        statetimeline.Panel()
        .id(layout.take())
        .title("Connection to the receiver")
        .description("1 while a connection to the receiver is up (handshake done).")
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .show_value(common.VisibilityMode.NEVER)
        .mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text="disconnected", color=red, index=0),
                        "1": ValueMappingResult(text="connected", color=green, index=1),
                    }
                )
            ]
        )
        .with_target(query(sel("pyforward_connected"), LEGEND))
    )
    dash.with_panel(
        graph(
            layout, "Reconnects and destination changes",
            "Connections opened after the first one; receiver address or TLS material changes.", "short",
            [
                (increase("pyforward_reconnects_total"), "reconnects " + LEGEND),
                (increase("pyforward_destination_changes_total"), "destination changes " + LEGEND),
            ],
            bars=True,
        )
    )

    # --- checkpoint --------------------------------------------------------------------------------------------
    dash.with_row(builders.Row("Checkpoint").id(layout.take()))
    dash.with_panel(
        graph(
            layout, "Checkpoint writes", "Checkpoint writes by result; errors keep the last good checkpoint.", "ops",
            [(rate("pyforward_checkpoint_writes_total"), "{{result}} " + LEGEND)],
            width=24,
        )
    )

    # --- the spool (issue 21) ---------------------------------------------------------------------------------------
    dash.with_row(builders.Row("Spool").id(layout.take()))
    dash.with_panel(
        graph(
            layout, "Spool against its budget",
            "Bytes of rotated files only the spool keeps (the API server's retention deleted its names), against "
            "PYFORWARD_SPOOL_MAX_BYTES; beyond it the oldest unread is released (lost). Alert at 80 %.",
            "bytes",
            [
                (sel("pyforward_spool_bytes"), "kept only by the spool " + LEGEND),
                (sel("pyforward_spool_linked_bytes"), "linked " + LEGEND),
                (sel("pyforward_spool_budget_bytes"), "budget " + LEGEND),
            ],
            width=8,
        )
    )
    dash.with_panel(
        graph(
            layout, "Spool files and active",
            "Backups the spool holds a link to; active 0: the spool is off (the WARNING at start says why).",
            "short",
            [(sel("pyforward_spool_files"), "files " + LEGEND), (sel("pyforward_spool_active"), "active " + LEGEND)],
            width=8,
        )
    )
    dash.with_panel(
        graph(
            layout, "Free space of the log volume",
            "Free bytes of the log's file system and the floor below which the spool releases files.",
            "bytes",
            [
                (sel("pyforward_spool_free_bytes"), "free " + LEGEND),
                (sel("pyforward_spool_min_free_bytes"), "floor " + LEGEND),
            ],
            width=8,
        )
    )

    # --- losses --------------------------------------------------------------------------------------------------
    dash.with_row(builders.Row("Losses and input problems").id(layout.take()))
    dash.with_panel(
        graph(
            layout, "Files lost",
            "Rotated files gone before they were read, by reason (retention: deleted by the API server; spool_budget: "
            "released by the spool's guard); checkpoints whose file was gone; unreadable files.",
            "short",
            [
                (increase("pyforward_lost_files_total"), "{{reason}} " + LEGEND),
                (increase("pyforward_checkpoint_misses_total"), "checkpoint file gone " + LEGEND),
                (increase("pyforward_unreadable_files_total"), "unreadable " + LEGEND),
            ],
            bars=True,
        )
    )
    dash.with_panel(
        graph(
            layout, "Bytes lost",
            "Unread bytes of rotated files gone, by reason; bytes never read because the live log was truncated in "
            "place.",
            "bytes",
            [
                (increase("pyforward_lost_bytes_total"), "{{reason}} " + LEGEND),
                (increase("pyforward_truncation_lost_bytes_total"), "truncated " + LEGEND),
            ],
            bars=True,
        )
    )
    dash.with_panel(
        graph(
            layout, "Lines cut or with parse problems (shipped all the same)",
            "Lines over PYFORWARD_MAX_LINE_BYTES shipped cut, and lines shipped with a parse problem, by kind.",
            "short",
            [
                (increase("pyforward_truncated_lines_total"), "cut " + LEGEND),
                (increase("pyforward_parse_errors_total"), "{{kind}} " + LEGEND),
            ],
            width=24,
            bars=True,
        )
    )

    # --- certificates and the process -----------------------------------------------------------------------------
    dash.with_row(builders.Row("Certificates and process").id(layout.take()))
    dash.with_panel(
        graph(
            layout, "Client certificate expiry", "Seconds until the client certificate in use expires, by cert.", "s",
            [(sel("pyforward_certificate_expiry_seconds"), "{{cert}} " + LEGEND)],
            width=8,
        )
    )
    dash.with_panel(
        graph(
            layout, "CPU", "CPU time of the process per second (1 = one core).", "percentunit",
            [(rate("process_cpu_seconds_total"), LEGEND)],
            width=8,
        )
    )
    dash.with_panel(
        graph(
            layout, "Resident memory", "RSS of the process.", "bytes",
            [(sel("process_resident_memory_bytes"), LEGEND)],
            width=8,
        )
    )
    dash.with_panel(
        graph(
            layout, "Task restarts", "Background tasks restarted by the supervisor after a crash (a bug to report).",
            "short",
            [(increase("pyforward_task_restarts_total"), "{{task}} " + LEGEND)],
            width=24,
            bars=True,
        )
    )
    return dash


def render_dashboard() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build_dashboard().build()) + "\n"


# ------------------------------------------------------------------------------------------------ main


def outputs() -> dict[Path, str]:
    """Every generated file and what it must contain now."""
    return {
        PROMETHEUSRULE: render_prometheusrule(RULES.read_text(encoding="utf-8")),
        DASHBOARD: render_dashboard(),
    }


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard JSON document, rows' nested panels included, rows excluded."""
    found: list[dict[str, Any]] = []
    for panel in doc.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parents[1])}")
    if stale:
        print(f"stale: {', '.join(stale)}: run python docs/monitoring/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
