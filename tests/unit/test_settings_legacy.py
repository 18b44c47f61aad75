"""audit-forwarder's AUDIT_* variables: same meaning and defaults as in v0.2.5 (shared/reference/audit-forwarder.md),
PYFORWARD_* wins on conflict (reported), variables without a meaning any more are reported as ignored."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pyforward.envnames import LEGACY_ENV, LEGACY_IGNORED, read_legacy_env
from pyforward.settings import (
    Settings,
    SettingsError,
    load_settings,
    sources,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PYFORWARD_*, AUDIT_* or KUBECONFIG from the outside; HOME without a kubeconfig."""
    for name in list(os.environ):
        if name.upper().startswith(("PYFORWARD_", "AUDIT_")) or name.upper() == "KUBECONFIG":
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def setenv(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


# The reference's table: the default of every AUDIT_* variable, as the pyforward setting it becomes.
AUDIT_FORWARDER_DEFAULTS: dict[str, Any] = {
    "namespace": "kube-system",
    "service_name": "kubernetes-audit-tailer",
    "secret_name": "audittailer-client",
    "log_path": Path("/auditlog/audit.log"),
    "tls_dir": Path("/fluent-bit/etc/ssl"),
    "secret_ca_key": "ca.crt",
    "secret_cert_key": "audittailer-client.crt",
    "secret_key_key": "audittailer-client.key",
    "tls_server_name": "kubernetes-audit-tailer",
    "log_level": "info",
    "proxy_uds": None,
    "proxy_host": None,
    "proxy_port": 9443,
    "tls": True,  # its fluent-bit always used TLS with verification
    "host": None,  # it always discovered the Service
}


def test_defaults_are_audit_forwarders_when_its_env_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pod spec that sets one variable still gets every other default of audit-forwarder.
    setenv(monkeypatch, {"AUDIT_LOG_LEVEL": "info"})
    settings = load_settings()
    for name, expected in AUDIT_FORWARDER_DEFAULTS.items():
        assert getattr(settings, name) == expected, name
    assert settings.discovery_enabled
    assert settings.kubeconfig is None  # $HOME/.kube/config does not exist: in-cluster config
    assert settings.effective_server_name == "kubernetes-audit-tailer"
    assert settings.receiver_tls_files == (
        Path("/fluent-bit/etc/ssl/ca.crt"),
        Path("/fluent-bit/etc/ssl/audittailer-client.crt"),
        Path("/fluent-bit/etc/ssl/audittailer-client.key"),
    )
    origin = sources(settings)
    assert origin["tls_dir"] == "env AUDIT_TLS_BASEDIR (default)"
    assert origin["tls_server_name"] == "env AUDIT_TLS_VHOST (default)"


def test_without_audit_env_pyforwards_own_defaults_apply() -> None:
    report = read_legacy_env(os.environ)
    assert not report.used
    assert report.values == {}
    settings = load_settings()
    assert settings.tls_dir == Path("/tmp/pyforward-tls")
    assert settings.tls_server_name is None
    assert settings.effective_server_name == settings.service_name  # the same name, by another route


@pytest.mark.parametrize(
    ("variable", "raw", "setting", "expected"),
    [
        ("AUDIT_KUBECFG", "/shoot/kubeconfig", "kubeconfig", Path("/shoot/kubeconfig")),
        ("AUDIT_NAMESPACE", "audit", "namespace", "audit"),
        ("AUDIT_SERVICE_NAME", "audittailer", "service_name", "audittailer"),
        ("AUDIT_SECRET_NAME", "my-client", "secret_name", "my-client"),
        ("AUDIT_AUDIT_LOG_PATH", "/var/log/kube/audit.log", "log_path", Path("/var/log/kube/audit.log")),
        ("AUDIT_MEM_BUF_LIMIT", "200M", "max_inflight_bytes", 200_000_000),
        ("AUDIT_TLS_BASEDIR", "/certs", "tls_dir", Path("/certs")),
        ("AUDIT_TLS_CA_FILE", "bundle.crt", "secret_ca_key", "bundle.crt"),
        ("AUDIT_TLS_CRT_FILE", "tls.crt", "secret_cert_key", "tls.crt"),
        ("AUDIT_TLS_KEY_FILE", "tls.key", "secret_key_key", "tls.key"),
        ("AUDIT_TLS_VHOST", "audittailer", "tls_server_name", "audittailer"),
        ("AUDIT_LOG_LEVEL", "debug", "log_level", "debug"),
        ("AUDIT_KONNECTIVITY_UDS_SOCKET", "/konnectivity/uds", "proxy_uds", "/konnectivity/uds"),
        ("AUDIT_PROXY_HOST", "vpn-seed-server", "proxy_host", "vpn-seed-server"),
        ("AUDIT_PROXY_PORT", "9444", "proxy_port", 9444),
        ("AUDIT_PROXY_CA_FILE", "/proxy/ca/bundle.crt", "proxy_ca_file", Path("/proxy/ca/bundle.crt")),
        ("AUDIT_PROXY_CLIENT_CRT_FILE", "/p/tls.crt", "proxy_cert_file", Path("/p/tls.crt")),
        ("AUDIT_PROXY_CLIENT_KEY_FILE", "/p/tls.key", "proxy_key_file", Path("/p/tls.key")),
    ],
)
def test_each_variable_keeps_its_meaning(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, setting: str, expected: Any
) -> None:
    setenv(monkeypatch, {variable: raw})
    if variable in ("AUDIT_PROXY_CLIENT_CRT_FILE", "AUDIT_PROXY_CLIENT_KEY_FILE"):
        other = "AUDIT_PROXY_CLIENT_KEY_FILE" if variable.endswith("CRT_FILE") else "AUDIT_PROXY_CLIENT_CRT_FILE"
        setenv(monkeypatch, {other: "/p/other"})  # they go together
    settings = load_settings()
    assert getattr(settings, setting) == expected
    assert sources(settings)[setting] == f"env {variable}"


def test_every_mapped_variable_is_tested() -> None:
    # The parametrized table above covers LEGACY_ENV completely (a new mapping needs a test line).
    marks = test_each_variable_keeps_its_meaning.pytestmark
    tested = {args[0] for mark in marks if mark.name == "parametrize" for args in mark.args[1]}
    assert tested == {name for name, _, _ in LEGACY_ENV}


def test_production_pod_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values Gardener provider-metal used (reference: 'In production')."""
    setenv(
        monkeypatch,
        {
            "AUDIT_KUBECFG": "/shootconfig/kubeconfig",
            "AUDIT_NAMESPACE": "audit",
            "AUDIT_SERVICE_NAME": "audittailer",
            "AUDIT_SECRET_NAME": "audittailer-client",
            "AUDIT_TLS_CA_FILE": "ca.crt",
            "AUDIT_TLS_CRT_FILE": "tls.crt",
            "AUDIT_TLS_KEY_FILE": "tls.key",
            "AUDIT_TLS_VHOST": "audittailer",
            "AUDIT_PROXY_HOST": "vpn-seed-server",
            "AUDIT_PROXY_PORT": "9443",
            "AUDIT_PROXY_CA_FILE": "/proxy/ca/bundle.crt",
            "AUDIT_AUDIT_LOG_PATH": "/auditlog/audit.log",
        },
    )
    settings = load_settings()
    assert settings.namespace == "audit"
    assert settings.service_name == "audittailer"
    assert settings.effective_server_name == "audittailer"
    assert settings.receiver_tls_files == (
        Path("/fluent-bit/etc/ssl/ca.crt"),
        Path("/fluent-bit/etc/ssl/tls.crt"),
        Path("/fluent-bit/etc/ssl/tls.key"),
    )
    assert settings.kubeconfig == Path("/shootconfig/kubeconfig")
    # The proxy: mTLS to vpn-seed-server:9443 with audit-forwarder's default client certificate paths.
    assert (settings.proxy_host, settings.proxy_port) == ("vpn-seed-server", 9443)
    assert settings.proxy_ca_file == Path("/proxy/ca/bundle.crt")
    assert settings.proxy_cert_file == Path("/proxy/client/tls.crt")
    assert settings.proxy_key_file == Path("/proxy/client/tls.key")
    assert settings.effective_proxy_tls
    assert settings.max_inflight_bytes == Settings.model_fields["max_inflight_bytes"].default  # not set there


def test_proxy_defaults_only_for_audit_proxy_host(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, {"AUDIT_PROXY_HOST": "vpn-seed-server"})
    settings = load_settings()
    assert settings.proxy_ca_file == Path("/proxy/ca/ca.crt")
    assert settings.proxy_cert_file == Path("/proxy/client/tls.crt")
    assert settings.proxy_key_file == Path("/proxy/client/tls.key")
    assert sources(settings)["proxy_ca_file"] == "env AUDIT_PROXY_CA_FILE (default)"
    monkeypatch.delenv("AUDIT_PROXY_HOST")
    setenv(monkeypatch, {"PYFORWARD_PROXY_HOST": "proxy.example"})
    settings = load_settings()
    assert (settings.proxy_ca_file, settings.proxy_cert_file, settings.proxy_key_file) == (None, None, None)
    assert not settings.effective_proxy_tls


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("200M", 200_000_000),  # fluent-bit: M = 1,000,000 bytes
        ("200MB", 200_000_000),
        ("64m", 64_000_000),
        ("512000k", 512_000_000),
        ("1G", 1_000_000_000),
        ("52428800", 52_428_800),
        ("64Mi", 64 << 20),
    ],
)
def test_mem_buf_limit_becomes_max_inflight_bytes(monkeypatch: pytest.MonkeyPatch, raw: str, expected: int) -> None:
    setenv(monkeypatch, {"AUDIT_MEM_BUF_LIMIT": raw})
    assert load_settings().max_inflight_bytes == expected


def test_mem_buf_limit_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, {"AUDIT_MEM_BUF_LIMIT": "lots"})
    with pytest.raises(SettingsError) as bad:
        load_settings()
    assert "AUDIT_MEM_BUF_LIMIT" in str(bad.value)
    assert "'lots'" in str(bad.value)
    # Too small for one chunk or line: the cross-setting check says where the value came from.
    setenv(monkeypatch, {"AUDIT_MEM_BUF_LIMIT": "1M"})
    with pytest.raises(SettingsError) as small:
        load_settings()
    assert "PYFORWARD_MAX_INFLIGHT_BYTES comes from AUDIT_MEM_BUF_LIMIT" in str(small.value)
    assert len(str(small.value).splitlines()) == 1


def test_invalid_audit_value_names_the_audit_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, {"AUDIT_PROXY_PORT": "ninety"})
    with pytest.raises(SettingsError) as exc:
        load_settings()
    message = str(exc.value)
    assert message.startswith("invalid setting AUDIT_PROXY_PORT ")
    assert "(audit-forwarder name of PYFORWARD_PROXY_PORT, --proxy-port)" in message
    assert "'ninety'" in message
    # A flag overrides the variable: then the flag's value is the one reported.
    with pytest.raises(SettingsError) as flagged:
        load_settings({"proxy_port": "nine"})
    assert "AUDIT_PROXY_PORT" not in str(flagged.value)
    assert "'nine'" in str(flagged.value)


@pytest.mark.parametrize("pyforward_name", ["PYFORWARD_NAMESPACE", "pyforward_namespace"])
def test_pyforward_wins_and_the_conflict_is_reported(monkeypatch: pytest.MonkeyPatch, pyforward_name: str) -> None:
    setenv(monkeypatch, {"AUDIT_NAMESPACE": "old", pyforward_name: "new"})
    settings = load_settings()
    assert settings.namespace == "new"
    report = read_legacy_env(os.environ)
    assert "namespace" not in report.values
    assert len(report.conflicts) == 1
    assert "AUDIT_NAMESPACE" in report.conflicts[0]
    assert "PYFORWARD_NAMESPACE wins" in report.conflicts[0]
    assert sources(settings)["namespace"] == "env PYFORWARD_NAMESPACE"


def test_flag_wins_over_both(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, {"AUDIT_SERVICE_NAME": "old", "PYFORWARD_SERVICE_NAME": "newer"})
    settings = load_settings({"service_name": "newest"})
    assert settings.service_name == "newest"
    assert sources(settings, {"service_name": "newest"})["service_name"] == "flag --service-name"


def test_pyforward_default_setting_beats_legacy_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # audit-forwarder's defaults (tls_dir, vhost) apply only where no PYFORWARD_ variable says otherwise.
    setenv(monkeypatch, {"AUDIT_NAMESPACE": "audit", "PYFORWARD_TLS_DIR": "/run/tls"})
    settings = load_settings()
    assert settings.tls_dir == Path("/run/tls")
    assert settings.tls_server_name == "kubernetes-audit-tailer"
    assert read_legacy_env(os.environ).conflicts == []  # a default is no conflict


def test_ignored_variables_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(
        monkeypatch,
        {"AUDIT_CHECK_SCHEDULE": "*/1 * * * *", "AUDIT_BACKOFF_TIMER": "10s", "AUDIT_FLUENT_LOG_LEVEL": "info"},
    )
    report = read_legacy_env(os.environ)
    assert report.used
    assert sorted(line.split()[0] for line in report.ignored) == sorted(LEGACY_IGNORED)
    assert all(" is ignored: " in line for line in report.ignored)
    assert report.conflicts == []
    load_settings()  # accepted


def test_empty_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # audit-forwarder's pod specs set optional variables to "" (e.g. no konnectivity socket).
    setenv(monkeypatch, {"AUDIT_KONNECTIVITY_UDS_SOCKET": "", "AUDIT_PROXY_HOST": "", "AUDIT_NAMESPACE": "audit"})
    settings = load_settings()
    assert settings.proxy_uds is None
    assert settings.proxy_host is None
    assert settings.proxy_ca_file is None  # no proxy defaults without a proxy
    assert "proxy_uds" not in read_legacy_env(os.environ).origin


@pytest.mark.parametrize(("raw", "expected"), [("WARN", "warning"), ("warn", "warning"), ("INFO", "info")])
def test_log_level_spellings(monkeypatch: pytest.MonkeyPatch, raw: str, expected: str) -> None:
    setenv(monkeypatch, {"AUDIT_LOG_LEVEL": raw})
    assert load_settings().log_level == expected


def test_kubeconfig_default_is_home_kube_config_where_it_exists(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    setenv(monkeypatch, {"AUDIT_NAMESPACE": "audit"})
    assert load_settings().kubeconfig is None  # absent: in-cluster config, as client-go falls back
    config = clean_env / ".kube" / "config"
    config.parent.mkdir()
    config.write_text("{}")
    settings = load_settings()
    assert settings.kubeconfig == config
    assert sources(settings)["kubeconfig"] == "env AUDIT_KUBECFG (default)"
    # KUBECONFIG or PYFORWARD_KUBECONFIG take over; without any AUDIT_* variable there is no such default.
    setenv(monkeypatch, {"KUBECONFIG": "/elsewhere"})
    assert load_settings().kubeconfig is None
    monkeypatch.delenv("KUBECONFIG")
    setenv(monkeypatch, {"PYFORWARD_KUBECONFIG": "/mine"})
    assert load_settings().kubeconfig == Path("/mine")
    monkeypatch.delenv("PYFORWARD_KUBECONFIG")
    monkeypatch.delenv("AUDIT_NAMESPACE")
    assert load_settings().kubeconfig is None
