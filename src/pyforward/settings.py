"""Settings of `pyforward run` (and `check`, `config`): one model, three ways in.

Every setting is an env var with the ``PYFORWARD_`` prefix and the same setting as a ``pyforward run`` flag
(issue: tail the rotated audit log). audit-forwarder's env names (``AUDIT_*``, the table in
shared/reference/audit-forwarder.md) are accepted unchanged so that its pod spec works as it is; when both names
are set the ``PYFORWARD_`` one wins and the conflict is reported (both names: envnames.py). Precedence: flag >
PYFORWARD_ env > AUDIT_ env > default.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# env_name is re-exported: a setting's env var name is asked of the settings module across the package.
from pyforward.envnames import ENV_PREFIX, LegacyEnvSource, read_legacy_env
from pyforward.envnames import env_name as env_name

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(value: object) -> object:
    """Accept 1048576, "1048576", "16Mi", "16MiB", "200M" (Kubernetes style: M = 10**6, Mi = 2**20)."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"not a byte size: {value!r} (examples: 1048576, 16Mi, 200M)")
        number, unit, binary, _ = match.groups()
        base = 1024 if binary else 1000
        return int(float(number) * base ** _POWERS[unit.lower()])
    return value


ByteCount = Annotated[int, BeforeValidator(parse_bytes), Field(ge=1)]


def _empty_to_none(value: object) -> object:
    # Kubernetes pod specs often set a variable to "" to mean "not set" (audit-forwarder's own defaults do).
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


OptPath = Annotated[Path | None, BeforeValidator(_empty_to_none)]
OptStr = Annotated[str | None, BeforeValidator(_empty_to_none)]
OptSecret = Annotated[SecretStr | None, BeforeValidator(_empty_to_none)]

# Setting groups, for --help and the generated configuration reference.
GROUPS: dict[str, str] = {
    "input": "Input: the audit log and the checkpoint",
    "records": "Records and chunks",
    "destination": "Destination: the Forward receiver",
    "proxy": "HTTP CONNECT proxy (konnectivity Unix socket, or mTLS proxy)",
    "discovery": "Kubernetes discovery (used when no host is set)",
    "operations": "Operations: logs, metrics, health",
}


def _group(name: str, **extra: Any) -> dict[str, Any]:
    return {"group": name, **extra}


class Settings(BaseSettings):
    """Everything `pyforward run` needs. Field descriptions are the --help texts and the docs reference."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
        populate_by_name=True,
    )

    # --- input ---------------------------------------------------------------------------------------------
    log_path: Path = Field(
        Path("/auditlog/audit.log"),
        description="The audit log to follow; rotated siblings NAME-<time>.EXT[.gz] beside it are read too.",
        json_schema_extra=_group("input"),
    )
    checkpoint_path: OptPath = Field(
        None,
        description="Where the acked offset is kept. Default: .<log name>.pyforward-checkpoint beside the log "
        "(in the shared volume, so it survives container restarts).",
        json_schema_extra=_group("input"),
    )
    checkpoint_interval: float = Field(
        2.0,
        ge=0,
        description="Seconds between two checkpoint writes at most (each is an fdatasync); sooner when the in-flight "
        "budget runs short or a chunk's worth of acked lines is unsaved, and always on shutdown. A crash re-sends "
        "at most max_inflight_bytes either way.",
        json_schema_extra=_group("input"),
    )
    start_at: Literal["head", "tail"] = Field(
        "head",
        description="Where to start when there is no checkpoint: head of the oldest rotated file, or the end "
        "of the live log.",
        json_schema_extra=_group("input"),
    )
    max_line_bytes: ByteCount = Field(
        4 << 20,
        description="Longer lines are shipped cut to this size, marked and counted (never dropped).",
        json_schema_extra=_group("input"),
    )
    poll_interval: float = Field(
        0.25,
        gt=0,
        description="Seconds between polls when inotify is not available.",
        json_schema_extra=_group("input"),
    )
    spool_dir: OptPath = Field(
        None,
        description="Where hard links keep rotated backups alive until a checkpoint has passed them, so that the API "
        "server's log retention cannot delete them unshipped (no byte is copied). Must be on the log's file system. "
        "Default: .pyforward-spool beside the log.",
        json_schema_extra=_group("input"),
    )
    spool_max_bytes: Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)] = Field(
        1 << 30,
        description="Bytes the spool may keep alone (backups the API server's retention has deleted): beyond it the "
        "oldest unread is released, a loss logged and counted (pyforward_lost_files_total, reason spool_budget). 0 "
        "turns the spool off. Keep it below the volume's room (emptyDir sizeLimit) minus what the API server keeps.",
        json_schema_extra=_group("input"),
    )
    spool_min_free: Annotated[int | None, BeforeValidator(parse_bytes), BeforeValidator(_empty_to_none)] = Field(
        None,
        ge=0,
        description="Free space the spool leaves on the log's file system: below it, files only the spool keeps are "
        "released, the oldest unread first (the API server must never lack room for its log). Default: the larger "
        "of 10 % of the file system and twice the largest backup seen.",
        json_schema_extra=_group("input"),
    )

    # --- records and chunks --------------------------------------------------------------------------------
    tag: str = Field(
        "audit", min_length=1, description="Forward tag of every record.", json_schema_extra=_group("records")
    )
    time_key: str = Field(
        "stageTimestamp",
        description="Record key holding the event time (RFC 3339); the read time is used when it is absent.",
        json_schema_extra=_group("records"),
    )
    chunk_max_bytes: ByteCount = Field(
        1 << 20,
        description="Source bytes per chunk (one acked request). Keep well below 6 MB for fluent-bit.",
        json_schema_extra=_group("records"),
    )
    chunk_max_records: int = Field(
        10_000, ge=1, description="Records per chunk.", json_schema_extra=_group("records")
    )
    flush_interval: float = Field(
        0.09,
        ge=0,
        description="Latency budget: the longest a line waits for its chunk to fill once the log is caught up (a "
        "line after a quiet spell leaves at once). Longer: fewer, larger chunks, less CPU at steady rates.",
        json_schema_extra=_group("records"),
    )
    compress: Literal["gzip", "none"] = Field(
        "gzip",
        description="CompressedPackedForward (gzip) or plain PackedForward.",
        json_schema_extra=_group("records"),
    )
    compress_level: int = Field(
        1, ge=1, le=9, description="gzip level (1 is fastest).", json_schema_extra=_group("records")
    )
    record_ranges: bool = Field(
        True,
        description="Send with each chunk its source file's id and each record's byte range in it (options "
        "pyforward.source, pyforward.offset, pyforward.lengths: docs/protocol.md), so that pyforward receive writes "
        "every event exactly once across crashes and retries; other receivers ignore them (at-least-once). false: "
        "chunks carry only size and chunk, as before.",
        json_schema_extra=_group("records"),
    )
    max_inflight_bytes: ByteCount = Field(
        16 << 20,
        description="Bound on source bytes read but not yet acked: the file is the buffer, memory stays flat.",
        json_schema_extra=_group("records"),
    )
    window: int = Field(
        32,
        ge=1,
        le=1024,
        description="Chunks on the wire awaiting their ack. At steady rates acks are read about once per "
        "checkpoint_interval, or when the window is full.",
        json_schema_extra=_group("records"),
    )

    # --- destination ---------------------------------------------------------------------------------------
    host: OptStr = Field(
        None,
        description="Receiver host. Unset: find it in the cluster (Kubernetes discovery).",
        json_schema_extra=_group("destination"),
    )
    port: int = Field(
        24224, ge=1, le=65535, description="Receiver port.", json_schema_extra=_group("destination")
    )
    tls: bool = Field(
        True,
        description="TLS to the receiver, with verification. Off only when set to false.",
        json_schema_extra=_group("destination"),
    )
    tls_ca_file: OptPath = Field(
        None,
        description="CA bundle for the receiver's certificate (system store when unset).",
        json_schema_extra=_group("destination"),
    )
    tls_cert_file: OptPath = Field(
        None, description="Client certificate for mTLS.", json_schema_extra=_group("destination")
    )
    tls_key_file: OptPath = Field(
        None, description="Client key for mTLS.", json_schema_extra=_group("destination")
    )
    tls_server_name: OptStr = Field(
        None,
        description="Name for SNI and the certificate check (audit-forwarder's vhost). Default: the host "
        "(with discovery: the service name).",
        json_schema_extra=_group("destination"),
    )
    shared_key: OptSecret = Field(
        None,
        description="Forward shared key (HELO/PING/PONG handshake).",
        json_schema_extra=_group("destination", secret=True),
    )
    username: OptStr = Field(
        None, description="User for the receiver's user auth.", json_schema_extra=_group("destination")
    )
    password: OptSecret = Field(
        None,
        description="Password for the receiver's user auth.",
        json_schema_extra=_group("destination", secret=True),
    )
    self_hostname: str = Field(
        default_factory=socket.gethostname,
        description="Hostname sent in the handshake.",
        json_schema_extra=_group("destination"),
    )
    ack_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds to wait for an ack before the connection is "
        "dropped and unacked chunks are sent again.",
        json_schema_extra=_group("destination"),
    )
    connect_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds for connect, proxy, TLS and handshake.",
        json_schema_extra=_group("destination"),
    )
    backoff_initial: float = Field(
        0.5,
        gt=0,
        description="First reconnect delay (seconds); doubles, with jitter.",
        json_schema_extra=_group("destination"),
    )
    backoff_max: float = Field(
        30.0, gt=0, description="Longest reconnect delay (seconds).", json_schema_extra=_group("destination")
    )
    shutdown_timeout: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM, seconds to wait for the acks of what is in flight.",
        json_schema_extra=_group("destination"),
    )
    cert_expiry_warning_days: float = Field(
        30.0,
        ge=0,
        description="Warn about certificates expiring within this many days.",
        json_schema_extra=_group("destination"),
    )

    # --- proxy ---------------------------------------------------------------------------------------------
    proxy_uds: OptStr = Field(
        None,
        description="HTTP CONNECT proxy on a Unix socket (konnectivity).",
        json_schema_extra=_group("proxy"),
    )
    proxy_host: OptStr = Field(
        None, description="HTTP CONNECT proxy host (e.g. vpn-seed-server).", json_schema_extra=_group("proxy")
    )
    proxy_port: int = Field(
        9443, ge=1, le=65535, description="HTTP CONNECT proxy port.", json_schema_extra=_group("proxy")
    )
    proxy_tls: bool | None = Field(
        None,
        description="TLS to the proxy. Default: on when a proxy CA or client certificate is set.",
        json_schema_extra=_group("proxy"),
    )
    proxy_ca_file: OptPath = Field(
        None, description="CA of the proxy's server certificate.", json_schema_extra=_group("proxy")
    )
    proxy_cert_file: OptPath = Field(
        None, description="Client certificate for the proxy (mTLS).", json_schema_extra=_group("proxy")
    )
    proxy_key_file: OptPath = Field(
        None, description="Client key for the proxy (mTLS).", json_schema_extra=_group("proxy")
    )
    proxy_server_name: OptStr = Field(
        None,
        description="Name checked in the proxy's certificate (default: the proxy host).",
        json_schema_extra=_group("proxy"),
    )
    proxy_username: OptStr = Field(
        None, description="Proxy-Authorization Basic user.", json_schema_extra=_group("proxy")
    )
    proxy_password: OptSecret = Field(
        None,
        description="Proxy-Authorization Basic password.",
        json_schema_extra=_group("proxy", secret=True),
    )

    # --- discovery -----------------------------------------------------------------------------------------
    kubeconfig: OptPath = Field(
        None,
        description="kubeconfig of the cluster; unset: in-cluster config. Re-read when the file changes.",
        json_schema_extra=_group("discovery"),
    )
    namespace: str = Field(
        "kube-system",
        description="Namespace of the receiver Service and the Secret.",
        json_schema_extra=_group("discovery"),
    )
    service_name: str = Field(
        "kubernetes-audit-tailer",
        description="Service to ship to (its ClusterIP).",
        json_schema_extra=_group("discovery"),
    )
    service_port_name: OptStr = Field(
        None,
        description="Named port of the Service when it has several.",
        json_schema_extra=_group("discovery"),
    )
    secret_name: OptStr = Field(
        "audittailer-client",
        description="Secret with the CA, client certificate and key; empty: no Secret.",
        json_schema_extra=_group("discovery"),
    )
    secret_ca_key: str = Field(
        "ca.crt", description="Secret key (and file name) of the CA.", json_schema_extra=_group("discovery")
    )
    secret_cert_key: str = Field(
        "audittailer-client.crt",
        description="Secret key (and file name) of the client certificate.",
        json_schema_extra=_group("discovery"),
    )
    secret_key_key: str = Field(
        "audittailer-client.key",
        description="Secret key (and file name) of the client key.",
        json_schema_extra=_group("discovery"),
    )
    tls_dir: Path = Field(
        Path("/tmp/pyforward-tls"),
        description="Where Secret material is written (files mode 0600).",
        json_schema_extra=_group("discovery"),
    )

    # --- operations ----------------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level.", json_schema_extra=_group("operations")
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="Log format: JSON lines, plain text, or auto (text on a terminal).",
        json_schema_extra=_group("operations"),
    )
    metrics_bind: OptStr = Field(
        None,
        description="HOST:PORT for /metrics, /healthz and /readyz; unset: off.",
        json_schema_extra=_group("operations"),
    )
    ready_max_backlog_bytes: ByteCount = Field(
        64 << 20,
        description="/readyz is ready while connected, or while the backlog is below this.",
        json_schema_extra=_group("operations"),
    )

    @model_validator(mode="before")
    @classmethod
    def _lowercase_choices(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("start_at", "compress", "log_level", "log_format"):
                value = data.get(key)
                if isinstance(value, str):
                    data[key] = (
                        value.strip().lower().replace("warn", "warning").replace("warninging", "warning")
                    )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.proxy_uds and self.proxy_host:
            raise ValueError(
                "PYFORWARD_PROXY_UDS and PYFORWARD_PROXY_HOST are both set: choose one proxy, the Unix socket "
                "(konnectivity) or the proxy host (mTLS)"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError(
                "PYFORWARD_TLS_CERT_FILE and PYFORWARD_TLS_KEY_FILE go together: set both for mTLS, or neither"
            )
        if bool(self.proxy_cert_file) != bool(self.proxy_key_file):
            raise ValueError(
                "PYFORWARD_PROXY_CERT_FILE and PYFORWARD_PROXY_KEY_FILE go together: set both, or neither"
            )
        if self.max_inflight_bytes < max(self.chunk_max_bytes, self.max_line_bytes):
            raise ValueError(
                "PYFORWARD_MAX_INFLIGHT_BYTES must be at least PYFORWARD_CHUNK_MAX_BYTES and "
                "PYFORWARD_MAX_LINE_BYTES "
                f"({self.max_inflight_bytes} < {max(self.chunk_max_bytes, self.max_line_bytes)})"
            )
        if self.backoff_max < self.backoff_initial:
            raise ValueError("PYFORWARD_BACKOFF_MAX must not be below PYFORWARD_BACKOFF_INITIAL")
        if (self.tls_cert_file or self.tls_ca_file) and not self.tls and self.host:
            raise ValueError(
                "PYFORWARD_TLS_CA_FILE/PYFORWARD_TLS_CERT_FILE are set but PYFORWARD_TLS is false: "
                "set it true or drop the files"
            )
        return self

    # --- derived values ------------------------------------------------------------------------------------
    @property
    def effective_checkpoint_path(self) -> Path:
        if self.checkpoint_path is not None:
            return self.checkpoint_path
        return self.log_path.parent / f".{self.log_path.name}.pyforward-checkpoint"

    @property
    def effective_spool_dir(self) -> Path:
        if self.spool_dir is not None:
            return self.spool_dir
        return self.log_path.parent / ".pyforward-spool"

    @property
    def discovery_enabled(self) -> bool:
        return not self.host

    @property
    def effective_proxy_tls(self) -> bool:
        if self.proxy_tls is not None:
            return self.proxy_tls
        return bool(self.proxy_ca_file or self.proxy_cert_file)

    @property
    def receiver_tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        """CA, cert, key for the receiver: static files, or those discovery writes from the Secret."""
        if self.discovery_enabled and self.secret_name:
            return (
                self.tls_ca_file or self.tls_dir / self.secret_ca_key,
                self.tls_cert_file or self.tls_dir / self.secret_cert_key,
                self.tls_key_file or self.tls_dir / self.secret_key_key,
            )
        return self.tls_ca_file, self.tls_cert_file, self.tls_key_file

    @property
    def effective_server_name(self) -> str | None:
        if self.tls_server_name:
            return self.tls_server_name
        return self.service_name if self.discovery_enabled else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, LegacyEnvSource(settings_cls)


# --- loading, errors and provenance ------------------------------------------------------------------------
class SettingsError(Exception):
    """One line per problem, naming the setting (env var and flag) and what is wrong."""


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def format_validation_error(error: ValidationError, legacy_origin: Mapping[str, str] | None = None) -> str:
    """``legacy_origin`` (setting -> AUDIT_* name) names the variable the operator actually set."""
    legacy_origin = legacy_origin or {}
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item.get("loc", ()) if part != "__root__"]
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        if loc:
            setting = loc[0]
            value = item.get("input")
            shown = "" if setting in SECRET_FIELDS or isinstance(value, dict) else f" (got {value!r})"
            names = f"{env_name(setting)} ({flag_name(setting)})"
            if setting in legacy_origin:
                names = f"{legacy_origin[setting]} (audit-forwarder name of {env_name(setting)}, {flag_name(setting)})"
            lines.append(f"invalid setting {names}: {message}{shown}")
        else:
            came = [
                f"{env_name(s)} comes from {o}"
                for s, o in legacy_origin.items()
                if re.search(rf"\b{env_name(s)}\b", message)
            ]
            lines.append(f"invalid settings: {message}" + (f" ({'; '.join(came)})" if came else ""))
    return "\n".join(lines)


SECRET_FIELDS = frozenset(
    name
    for name, info in Settings.model_fields.items()
    if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("secret")
)


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings from flags (``overrides``), the environment and the defaults.

    Raises SettingsError with one clear line per problem.
    """
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        # A value from an AUDIT_* variable is reported under that name (flags win over it).
        origin = {k: v for k, v in read_legacy_env(os.environ).origin.items() if k not in (overrides or {})}
        raise SettingsError(format_validation_error(exc, origin)) from None


def sources(
    settings: Settings, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Where each effective value came from: flag, env var (new or old name), or default."""
    environ = os.environ if environ is None else environ
    upper = {k.upper() for k in environ}
    legacy = read_legacy_env(environ)
    origin: dict[str, str] = {}
    for name in Settings.model_fields:
        if overrides and name in overrides:
            origin[name] = f"flag {flag_name(name)}"
        elif env_name(name) in upper:
            origin[name] = f"env {env_name(name)}"
        elif name in legacy.origin:
            origin[name] = f"env {legacy.origin[name]}"
        else:
            origin[name] = "default"
    return origin


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain values, secrets shown as ******** (never their text)."""
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            out[name] = "********"
        elif isinstance(value, Path):
            out[name] = str(value)
        else:
            out[name] = value
    return out
