"""How the settings are named in the environment: ``PYFORWARD_<SETTING>``, and audit-forwarder's ``AUDIT_*`` names,
read beside them at a lower precedence so that its pod spec works unchanged (the table in
shared/reference/audit-forwarder.md; when both names are set the ``PYFORWARD_`` one wins and the conflict is
reported). Below settings.py, which reads the environment through LegacyEnvSource."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

ENV_PREFIX = "PYFORWARD_"


def env_name(setting: str) -> str:
    return f"{ENV_PREFIX}{setting.upper()}"


# (old name, setting, note). Same meaning and default as audit-forwarder v0.2.5 (shared/reference).
LEGACY_ENV: tuple[tuple[str, str, str], ...] = (
    ("AUDIT_KUBECFG", "kubeconfig", ""),
    ("AUDIT_NAMESPACE", "namespace", ""),
    ("AUDIT_SERVICE_NAME", "service_name", ""),
    ("AUDIT_SECRET_NAME", "secret_name", ""),
    ("AUDIT_AUDIT_LOG_PATH", "log_path", ""),
    (
        "AUDIT_MEM_BUF_LIMIT",
        "max_inflight_bytes",
        "fluent-bit's tail memory limit becomes the bound on bytes in flight",
    ),
    ("AUDIT_TLS_BASEDIR", "tls_dir", ""),
    ("AUDIT_TLS_CA_FILE", "secret_ca_key", "Secret key and file name"),
    ("AUDIT_TLS_CRT_FILE", "secret_cert_key", "Secret key and file name"),
    ("AUDIT_TLS_KEY_FILE", "secret_key_key", "Secret key and file name"),
    ("AUDIT_TLS_VHOST", "tls_server_name", ""),
    ("AUDIT_LOG_LEVEL", "log_level", ""),
    ("AUDIT_KONNECTIVITY_UDS_SOCKET", "proxy_uds", ""),
    ("AUDIT_PROXY_HOST", "proxy_host", ""),
    ("AUDIT_PROXY_PORT", "proxy_port", ""),
    ("AUDIT_PROXY_CA_FILE", "proxy_ca_file", ""),
    ("AUDIT_PROXY_CLIENT_CRT_FILE", "proxy_cert_file", ""),
    ("AUDIT_PROXY_CLIENT_KEY_FILE", "proxy_key_file", ""),
)
# Settings with no meaning any more: accepted, logged once as ignored.
LEGACY_IGNORED: dict[str, str] = {
    "AUDIT_CHECK_SCHEDULE": "pyforward watches the Service and Secret instead of polling",
    "AUDIT_BACKOFF_TIMER": "there is no fluent-bit to restart; reconnects use PYFORWARD_BACKOFF_*",
    "AUDIT_FLUENT_LOG_LEVEL": "there is no fluent-bit; use PYFORWARD_LOG_LEVEL",
}
# audit-forwarder's proxy defaults, used only when the proxy host comes from AUDIT_PROXY_HOST.
LEGACY_PROXY_DEFAULTS = {
    "proxy_ca_file": "/proxy/ca/ca.crt",
    "proxy_cert_file": "/proxy/client/tls.crt",
    "proxy_key_file": "/proxy/client/tls.key",
}
# audit-forwarder always spoke TLS with its vhost defaulting to the service name.
LEGACY_DEFAULTS = {"tls_server_name": "kubernetes-audit-tailer", "tls_dir": "/fluent-bit/etc/ssl"}


@dataclass
class LegacyReport:
    values: dict[str, str] = field(default_factory=dict)  # setting -> raw value
    origin: dict[str, str] = field(default_factory=dict)  # setting -> env var name
    conflicts: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    used: bool = False


def read_legacy_env(environ: Mapping[str, str]) -> LegacyReport:
    report = LegacyReport()
    upper = {k.upper(): v for k, v in environ.items()}
    for name, setting, _ in LEGACY_ENV:
        if name not in environ or environ[name] == "":
            continue
        report.used = True
        if f"{ENV_PREFIX}{setting.upper()}" in upper:
            report.conflicts.append(
                f"{name} and {ENV_PREFIX}{setting.upper()} are both set: {ENV_PREFIX}{setting.upper()} wins"
            )
            continue
        report.values[setting] = environ[name]
        report.origin[setting] = name
    for name, why in LEGACY_IGNORED.items():
        if name in environ:
            report.used = True
            report.ignored.append(f"{name} is ignored: {why}")
    if "AUDIT_KUBECFG" not in environ and report.used and "KUBECONFIG" not in upper:
        # audit-forwarder's default kubeconfig; only where it exists, else in-cluster config.
        home_cfg = Path(environ.get("HOME", "~")).expanduser() / ".kube" / "config"
        if home_cfg.exists() and f"{ENV_PREFIX}KUBECONFIG" not in upper:
            report.values["kubeconfig"] = str(home_cfg)
            report.origin["kubeconfig"] = "AUDIT_KUBECFG (default)"
    if report.origin.get("proxy_host") == "AUDIT_PROXY_HOST":
        for setting, default in LEGACY_PROXY_DEFAULTS.items():
            if setting not in report.values and f"{ENV_PREFIX}{setting.upper()}" not in upper:
                report.values[setting] = default
                report.origin[setting] = f"{legacy_name(setting)} (default)"
    if report.used:
        for setting, default in LEGACY_DEFAULTS.items():
            if setting not in report.values and f"{ENV_PREFIX}{setting.upper()}" not in upper:
                report.values[setting] = default
                report.origin[setting] = f"{legacy_name(setting)} (default)"
    return report


def legacy_name(setting: str) -> str:
    return next(name for name, s, _ in LEGACY_ENV if s == setting)


class LegacyEnvSource(PydanticBaseSettingsSource):
    """audit-forwarder's AUDIT_* variables, below PYFORWARD_* in precedence."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(read_legacy_env(os.environ).values)
