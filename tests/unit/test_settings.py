"""Settings: env vars, flags, precedence, one-line errors, redaction, provenance."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyforward.cli import build_parser, settings_overrides
from pyforward.settings import Settings, SettingsError, load_settings, redacted, sources


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("PYFORWARD_", "AUDIT_")):
            monkeypatch.delenv(name)


def test_defaults_match_the_issue() -> None:
    s = load_settings()
    assert s.log_path == Path("/auditlog/audit.log")
    assert s.effective_checkpoint_path == Path("/auditlog/.audit.log.pyforward-checkpoint")
    assert (s.tag, s.time_key, s.compress, s.tls, s.port) == ("audit", "stageTimestamp", "gzip", True, 24224)
    assert s.discovery_enabled


def test_env_and_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYFORWARD_HOST", "from-env")
    monkeypatch.setenv("PYFORWARD_PORT", "1234")
    ns = build_parser().parse_args(["run", "--port", "4321", "--no-tls"])
    overrides = settings_overrides(ns)
    s = load_settings(overrides)
    assert (s.host, s.port, s.tls) == ("from-env", 4321, False)
    origin = sources(s, overrides)
    assert origin["host"] == "env PYFORWARD_HOST"
    assert origin["port"] == "flag --port"
    assert origin["tag"] == "default"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PYFORWARD_PORT": "eighty"}, "PYFORWARD_PORT (--port)"),
        ({"PYFORWARD_PORT": "70000"}, "PYFORWARD_PORT (--port)"),
        ({"PYFORWARD_COMPRESS": "zstd"}, "PYFORWARD_COMPRESS"),
        ({"PYFORWARD_MAX_INFLIGHT_BYTES": "lots"}, "not a byte size"),
        ({"PYFORWARD_PROXY_UDS": "/run/k.sock", "PYFORWARD_PROXY_HOST": "vpn"}, "both set"),
        ({"PYFORWARD_TLS_CERT_FILE": "/x.crt"}, "go together"),
        ({"PYFORWARD_MAX_INFLIGHT_BYTES": "1Mi", "PYFORWARD_MAX_LINE_BYTES": "4Mi"}, "must be at least"),
    ],
)
def test_bad_settings_are_one_clear_line(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_byte_sizes() -> None:
    s = load_settings({"max_inflight_bytes": "200M", "chunk_max_bytes": "512Ki"})
    assert s.max_inflight_bytes == 200_000_000
    assert s.chunk_max_bytes == 512 * 1024


def test_secrets_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYFORWARD_SHARED_KEY", "s3cr3t-key")
    monkeypatch.setenv("PYFORWARD_PROXY_PASSWORD", "pr0xy-pass")
    s = load_settings()
    shown = redacted(s)
    assert shown["shared_key"] == "********"
    assert "s3cr3t-key" not in repr(s)
    assert "s3cr3t-key" not in str(shown)
    assert "pr0xy-pass" not in str(shown)


def test_every_setting_is_a_run_flag() -> None:
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    help_text = sub.choices["run"].format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert "PYFORWARD_" + name.upper() in help_text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYFORWARD_", "AUDIT_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pyforward", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_cli_bad_value_exits_2_with_one_line() -> None:
    result = run_cli("run", "--port", "nope")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "PYFORWARD_PORT" in result.stderr


def test_cli_unknown_option_exits_2() -> None:
    result = run_cli("run", "--no-such-option")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-option" in result.stderr


def test_config_shows_sources_and_hides_secrets() -> None:
    result = run_cli("config", "--port", "9999", env={"PYFORWARD_SHARED_KEY": "hunter2", "AUDIT_NAMESPACE": "audit"})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("PYFORWARD_")}
    assert "flag --port" in lines["PYFORWARD_PORT"]
    assert "env AUDIT_NAMESPACE" in lines["PYFORWARD_NAMESPACE"]
    assert "********" in lines["PYFORWARD_SHARED_KEY"]
