"""The monitoring kit's files (docs/monitoring/): generated files are fresh, the rules pass `promtool check rules`
and their unit tests (`promtool test rules`), every alert is unit-tested firing and quiet, carries a summary, a
description and a runbook link that resolves in docs/operations.md, and every metric the rules and the dashboard
name is one pyforward exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyforward.metrics import Metrics
from tests.monitoring.prom import (
    DASHBOARD,
    OPERATIONS,
    PROMETHEUSRULE,
    RULES,
    RULES_TESTS,
    alert_rules,
    binary,
    load_generator,
)

pytestmark = pytest.mark.monitoring

METRIC = re.compile(r"\b(?:pyforward|process)_[a-z0-9_]+\b")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def exported_names() -> set[str]:
    """Sample names pyforward's registry exports (labelled families without children included)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of the committed dashboard."""
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    generator = load_generator()
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in generator.panels(doc)
        for target in panel.get("targets", [])
    ]
    found += [
        (f"variable {var['name']!r}", var["query"]) for var in doc["templating"]["list"] if var["type"] == "query"
    ]
    return found


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes for the headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


# --- generated files ------------------------------------------------------------------------------------------


def test_generated_files_are_fresh() -> None:
    generator = load_generator()
    for path, text in generator.outputs().items():
        assert path.exists(), f"{path.name} is missing: run python docs/monitoring/generate.py"
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is stale: run python docs/monitoring/generate.py"
        )


def test_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    generator = load_generator()
    stale = tmp_path / "grafana-dashboard.json"
    stale.write_text("{}\n", encoding="utf-8")
    monkeypatch.setattr(generator, "DASHBOARD", stale)
    monkeypatch.setattr(generator, "PROMETHEUSRULE", tmp_path / "prometheusrule.yaml")
    monkeypatch.setattr(generator, "HERE", tmp_path / "docs" / "monitoring")
    assert generator.main(["--check"]) == 1
    assert "stale: prometheusrule.yaml, grafana-dashboard.json" in capsys.readouterr().err
    (tmp_path / "docs" / "monitoring").mkdir(parents=True)
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    assert json.loads(stale.read_text(encoding="utf-8"))["uid"] == "pyforward"


def test_prometheusrule_carries_exactly_the_rules() -> None:
    manifest = yaml.safe_load(PROMETHEUSRULE.read_text(encoding="utf-8"))
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"] == "pyforward"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]


def test_prometheusrule_refuses_a_rules_file_it_cannot_wrap() -> None:
    generator = load_generator()
    with pytest.raises(ValueError, match="expected one top-level 'groups:' line, found 0"):
        generator.render_prometheusrule("rules: []\n")


# --- the rules with promtool -----------------------------------------------------------------------------------


def test_promtool_check_rules(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
    # The manifest's spec is itself a rules file: check what the operator would load.
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(PROMETHEUSRULE.read_text(encoding="utf-8"))["spec"]))
    result = promtool("check", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULES_TESTS.name, cwd=RULES_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("alert", "original", "broken"),
    [
        # a `for:` too short: the "stays quiet for 4 minutes" case catches it
        ("PyforwardDown", '} == 0\n        for: 5m', '} == 0\n        for: 1m'),
        # a renamed metric: the rule never fires
        ("PyforwardEventsLost", "increase(pyforward_lost_files_total[1h])", "increase(pyforward_lost_file_total[1h])"),
        # a threshold that lets the single live file through
        ("PyforwardBacklogNearRetention", "pyforward_log_files > 1", "pyforward_log_files > 0"),
    ],
    ids=["for-too-short", "renamed-metric", "loose-threshold"],
)
def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, original: str, broken: str) -> None:
    rules = RULES.read_text(encoding="utf-8")
    assert rules.count(original) == 1, f"the mutation's anchor is not in the rules: {original!r}"
    (tmp_path / RULES.name).write_text(rules.replace(original, broken), encoding="utf-8")
    shutil.copy(RULES_TESTS, tmp_path / RULES_TESTS.name)
    result = promtool("test", "rules", RULES_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"promtool's unit tests did not notice a broken {alert}"
    assert f"alertname: {alert}," in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(RULES_TESTS.read_text(encoding="utf-8"))["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts without a unit test where they fire"
    assert names - quiet == set(), "alerts without a unit test where they stay quiet (exp_alerts: [])"


# --- annotations and names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alert_has_summary_description_severity_and_runbook(rule: dict[str, Any]) -> None:
    annotations = rule.get("annotations", {})
    assert {"summary", "description", "runbook_url"} <= annotations.keys()
    assert rule["labels"]["severity"] in ("critical", "warning", "info")
    page, _, anchor = annotations["runbook_url"].partition("#")
    assert page == "docs/operations.md"
    assert anchor == rule["alert"].lower(), "the runbook section is named after the alert"
    assert anchor in github_anchors(OPERATIONS.read_text(encoding="utf-8")), (
        f"docs/operations.md has no heading for #{anchor}"
    )


def test_rules_and_dashboard_name_only_metrics_pyforward_exports() -> None:
    exported = exported_names()
    used: dict[str, str] = {}
    for rule in alert_rules():
        for text in (rule["expr"], *rule["annotations"].values()):
            used.update((name, f"alert {rule['alert']}") for name in METRIC.findall(text))
    for where, expr in dashboard_queries():
        used.update((name, where) for name in METRIC.findall(expr))
    unknown = {name: where for name, where in used.items() if name not in exported}
    assert not unknown, f"names pyforward does not export (renamed?): {unknown}"
    # The dashboard shows what the issue asks for (issue 14, item 4).
    for name in (
        "pyforward_lines_read_total",
        "pyforward_records_acked_total",
        "pyforward_ack_latency_seconds_bucket",
        "pyforward_backlog_bytes",
        "pyforward_backlog_seconds",
        "pyforward_connected",
        "pyforward_reconnects_total",
        "pyforward_checkpoint_writes_total",
        "pyforward_lost_files_total",
        "pyforward_certificate_expiry_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert any(name in expr for _, expr in dashboard_queries()), f"the dashboard does not show {name}"
