"""A real Prometheus (Debian's ``prometheus`` package) for the monitoring kit's tests, and the kit's files.

:class:`PrometheusProcess` writes a config scraping the given targets every second and evaluating the given rule
files every second, starts ``prometheus`` on 127.0.0.1 with its own storage under the test's directory, waits for
``/-/ready``, and answers through the HTTP API (``/api/v1/query``, ``/api/v1/alerts``, ...). Every wait is a
condition polled with a deadline (tests/harness.py's :func:`wait_for`), never a sleep.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.harness import _popen, _stop_proc, wait_for

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "docs" / "monitoring"
RULES = KIT / "prometheus-rules.yaml"
RULES_TESTS = KIT / "prometheus-rules.test.yaml"
PROMETHEUSRULE = KIT / "prometheusrule.yaml"
DASHBOARD = KIT / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

#: The scrape job of the tests' Prometheus: the name PyforwardDown selects (prometheus-rules.yaml).
JOB = "pyforward"
#: Target labels as Kubernetes service discovery would add them, so that the templates' pod/namespace branch runs.
TARGET_LABELS = {"namespace": "shoot--e2e", "pod": "kube-apiserver-e2e"}


def binary(name: str) -> str:
    """The path of a Prometheus tool; a clear failure when it is missing (tests/run.sh installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install prometheus (tests/run.sh does)")
    return path


@functools.cache
def load_generator() -> ModuleType:
    """docs/monitoring/generate.py as a module (it is a script beside the files it writes, not a package)."""
    spec = importlib.util.spec_from_file_location("pyforward_monitoring_generate", KIT / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of prometheus-rules.yaml."""
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


class PrometheusError(Exception):
    """The API answered with status "error" (a bad query, say): the message is Prometheus's own."""


class PrometheusProcess:
    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        rule_files: Sequence[Path] = (RULES,),
        target_labels: Mapping[str, str] = TARGET_LABELS,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        config = {
            # 1 s so that a test sees a scrape, a rule evaluation and a pending alert within seconds.
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [{"targets": list(targets), "labels": dict(target_labels)}],
                }
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusProcess:
        with self.log_path.open("ab") as log:
            self.proc = _popen(
                [
                    binary("prometheus"),
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        wait_for(self._ready, timeout, what="prometheus to be ready", diagnostics=self.describe)
        return self

    def _ready(self) -> bool:
        self.check_alive()
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.describe()}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_proc(self.proc, signal.SIGTERM, 10)

    def describe(self) -> str:
        try:
            log = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            log = ""
        return f"prometheus on {self.url}; log tail:\n" + "\n".join(log.splitlines()[-15:])

    # --- the HTTP API ---------------------------------------------------------------------------------------------
    def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """GET /api/v1/<path>; the ``data`` of a success, :class:`PrometheusError` for an error answer."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(list(params))
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with Prometheus's explanation
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType', '?')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the vector's samples (a scalar comes as one sample without labels)."""
        data = self.api("query", [("query", expr)])
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a query that selects one series, None when it selects none."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} selects {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> list[dict[str, Any]]:
        """The active (pending or firing) alerts."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def alert(self, name: str) -> dict[str, Any] | None:
        found = [a for a in self.alerts() if a["labels"].get("alertname") == name]
        assert len(found) <= 1, f"{name} is active {len(found)} times: {found}"
        return found[0] if found else None

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 30.0, *, what: str) -> Any:
        def check() -> Any:
            self.check_alive()
            return predicate()

        return wait_for(check, timeout, what=what, interval=0.1, diagnostics=self.describe)

    def wait_alert(self, name: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until alert ``name`` is active in ``state`` ("pending" or "firing"); returns it."""

        def found() -> dict[str, Any] | None:
            alert = self.alert(name)
            return alert if alert is not None and alert["state"] == state else None

        result: dict[str, Any] = self.wait_until(found, timeout, what=f"alert {name} to be {state}")
        return result
