"""The `pyforward` command: run, send, receive, check, config, demo.

Every `run` setting is a flag here and a PYFORWARD_ env var (settings.py); a bad option or value is one
clear line and exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pyforward import __version__
from pyforward.envnames import read_legacy_env
from pyforward.settings import (
    GROUPS,
    SECRET_FIELDS,
    Settings,
    SettingsError,
    env_name,
    flag_name,
    load_settings,
    redacted,
    sources,
)

log = logging.getLogger("pyforward")

EXIT_USAGE = 2


# --- settings as flags -------------------------------------------------------------------------------------
def _unwrap(annotation: Any) -> Any:
    """Path | None -> Path; Annotated[...] is already flattened by pydantic into the field's annotation."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _default_text(name: str) -> str:
    info = Settings.model_fields[name]
    if info.default_factory is not None:
        return "computed"
    default = info.default
    if default is None:
        return "unset"
    if name in SECRET_FIELDS:
        return "unset"
    return str(default)


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One flag per setting, in groups, defaults and env names in the help. Values are validated by the model."""
    wanted = set(names) if names is not None else None
    aliases = aliases or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, info in Settings.model_fields.items():
        if wanted is not None and name not in wanted:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        group_key = str(extra.get("group", "input"))
        if group_key not in groups:
            groups[group_key] = parser.add_argument_group(GROUPS.get(group_key, group_key))
        group = groups[group_key]
        annotation = _unwrap(info.annotation)
        help_text = f"{info.description} [env {env_name(name)}; default: {_default_text(name)}]".replace("%", "%%")
        flags = [flag_name(name), *aliases.get(name, ())]
        if annotation is bool:
            group.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {}
        if get_origin(annotation) is Literal:
            kwargs["choices"] = [str(c) for c in get_args(annotation)]
            kwargs["type"] = str.lower
        elif annotation is Path:
            kwargs["metavar"] = "PATH"
        elif annotation is float:
            kwargs["metavar"] = "SECONDS" if "interval" in name or "timeout" in name or "backoff" in name else "N"
        elif annotation is int:
            kwargs["metavar"] = "BYTES" if "bytes" in name else "N"
        else:
            kwargs["metavar"] = "VALUE"
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=help_text, **kwargs)


def settings_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k in Settings.model_fields}


def _load(ns: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    overrides = {**(extra or {}), **settings_overrides(ns)}
    return load_settings(overrides)


def _secrets(settings: Settings) -> list[str]:
    return [s.get_secret_value() for s in (settings.shared_key, settings.password, settings.proxy_password) if s]


def _setup_logging(settings: Settings) -> None:
    from pyforward.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format, secrets=_secrets(settings))


def _report_legacy() -> None:
    import os

    report = read_legacy_env(os.environ)
    for line in report.conflicts:
        log.warning("%s", line)
    for line in report.ignored:
        log.info("%s", line)
    if report.used:
        log.info("audit-forwarder settings in use: %s", ", ".join(sorted(report.origin.values())))


def _run_async(main: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(main)


def _install_stop(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set `stop` (a clean stop); replaces the start-up handler of `pyforward.__main__`."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


# --- run ---------------------------------------------------------------------------------------------------
def cmd_run(ns: argparse.Namespace) -> int:
    settings = _load(ns)
    _setup_logging(settings)
    _report_legacy()
    from pyforward.memory import pin_mmap_threshold

    pin_mmap_threshold()  # a sidecar runs for weeks: freed buffers go back to the kernel (pyforward/memory.py)
    return _run_async(_run(settings))


async def _run(settings: Settings) -> int:
    from pyforward.connection import StartupError
    from pyforward.pipeline import Pipeline

    metrics = health = server = None
    if settings.metrics_bind:
        from pyforward.metrics import HealthState, Metrics, start_server

        metrics = Metrics()
        health = HealthState(ready_max_backlog_bytes=settings.ready_max_backlog_bytes, loop=asyncio.get_running_loop())
    try:
        pipeline = Pipeline(settings, metrics=metrics, health=health)
        start = pipeline.check_startup()
    except StartupError as exc:
        # One line, as for a bad setting (logging it as well printed the message twice).
        print(f"pyforward run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = asyncio.Event()
    _install_stop(stop)
    if metrics is not None and health is not None and settings.metrics_bind:
        try:
            server = start_server(settings.metrics_bind, metrics, health)
        except OSError as exc:
            print(f"pyforward run: cannot serve metrics on {settings.metrics_bind}: {exc.strerror or exc}",
                  file=sys.stderr)
            return EXIT_USAGE
        log.info("metrics and health on http://%s/metrics", settings.metrics_bind)
    try:
        return await pipeline.run(stop, start)
    finally:
        if server is not None:
            server.close()


# --- send --------------------------------------------------------------------------------------------------
SEND_SETTINGS = (
    "host",
    "port",
    "tls",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_server_name",
    "shared_key",
    "username",
    "password",
    "self_hostname",
    "tag",
    "time_key",
    "window",
    "chunk_max_bytes",
    "chunk_max_records",
    "compress_level",
    "ack_timeout",
    "connect_timeout",
    "max_line_bytes",
    "proxy_uds",
    "proxy_host",
    "proxy_port",
    "proxy_tls",
    "proxy_ca_file",
    "proxy_cert_file",
    "proxy_key_file",
    "proxy_server_name",
    "proxy_username",
    "proxy_password",
    "log_level",
    "log_format",
)
SEND_ALIASES = {
    "tls_ca_file": ["--tls-ca"],
    "tls_cert_file": ["--tls-cert"],
    "tls_key_file": ["--tls-key"],
    "proxy_ca_file": ["--proxy-ca"],
    "proxy_cert_file": ["--proxy-cert"],
    "proxy_key_file": ["--proxy-key"],
}


def cmd_send(ns: argparse.Namespace) -> int:
    if not getattr(ns, "host", None):
        import os

        if not os.environ.get(env_name("host")):
            print("pyforward send: --host is required (or PYFORWARD_HOST)", file=sys.stderr)
            return EXIT_USAGE
    # `send` is a debugging tool: plain TCP and no compression unless asked (--tls, --gzip).
    settings = _load(
        ns,
        {"tls": False, "compress": "gzip" if ns.gzip else "none", "log_format": "text", "max_inflight_bytes": 64 << 20},
    )
    _setup_logging(settings)
    from pyforward.send import send_file

    return _run_async(send_file(settings, ns.file, timeout=ns.timeout, progress=not ns.no_progress))


# --- check, config, demo -----------------------------------------------------------------------------------
def cmd_check(ns: argparse.Namespace) -> int:
    settings = _load(ns)
    _setup_logging(settings)
    from pyforward.check import run_check

    return _run_async(run_check(settings, probe=ns.probe))


def cmd_config(ns: argparse.Namespace) -> int:
    import os

    overrides = settings_overrides(ns)
    settings = load_settings(overrides)
    values = redacted(settings)
    origin = sources(settings, overrides)
    report = read_legacy_env(os.environ)
    if ns.json:
        print(
            json.dumps(
                {"settings": values, "sources": origin, "conflicts": report.conflicts, "ignored": report.ignored},
                indent=2,
                default=str,
            )
        )
        return 0
    width = max(len(env_name(n)) for n in values)
    for name, value in values.items():
        shown = "" if value is None else value
        print(f"{env_name(name):<{width}}  {shown!s:<40}  {origin[name]}")
    for line in report.conflicts + report.ignored:
        print(f"note: {line}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from pyforward.demo import run_demo

    return run_demo(events=ns.events, rotate_bytes=ns.rotate_bytes, keep=ns.keep)


def cmd_receive(ns: argparse.Namespace) -> int:
    from pyforward.receiver import receive_command

    return _run_async(receive_command(ns))


# --- parser ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (`pyforward run: error: ...`) and exit code 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyforward", description="Ship every Kubernetes audit event over the Forward protocol.")
    parser.add_argument("--version", action="version", version=f"pyforward {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="tail the audit log and ship it (the sidecar's main job)",
        description="Tail the rotated audit log and ship every line; the checkpoint moves only "
        "on ack. Every flag is also a PYFORWARD_ env var; audit-forwarder's AUDIT_* names work.",
    )
    add_settings_arguments(run)
    run.set_defaults(func=cmd_run)

    send = sub.add_parser(
        "send",
        help="send JSON lines from a file (or -) and wait for every ack",
        description="Send JSON lines, one record each, in acked chunks. Exit 0 only when every line was acked.",
    )
    send.add_argument("file", metavar="FILE|-", help="JSON lines to send; - for standard input")
    send.add_argument("--gzip", action="store_true", help="CompressedPackedForward (gzip)")
    send.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up when not everything is acked by then (default: 60)",
    )
    send.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    add_settings_arguments(send, SEND_SETTINGS, SEND_ALIASES)
    send.set_defaults(func=cmd_send)

    receive = sub.add_parser(
        "receive",
        help="a Forward receiver that prints one JSON line per record",
        description="A Forward receiver (TCP, TLS, mTLS, shared key) that writes one JSON "
        "line per record and acks only after writing.",
    )
    from pyforward.receiver import configure_parser

    configure_parser(receive)
    receive.set_defaults(func=cmd_receive)

    check = sub.add_parser(
        "check",
        help="walk the path to the receiver step by step and explain failures",
        description="Reads the same settings as `run` and checks proxy connect, proxy TLS, "
        "CONNECT, receiver TLS, Forward handshake and (with --probe) one acked event.",
    )
    check.add_argument("--probe", action="store_true", help="also send one probe event and wait for its ack")
    add_settings_arguments(check)
    check.set_defaults(func=cmd_check)

    config = sub.add_parser(
        "config",
        help="print the effective settings and where each came from",
        description="Effective settings (secrets redacted) and their source: flag, "
        "PYFORWARD_ env, audit-forwarder's AUDIT_ env, or default.",
    )
    config.add_argument("--json", action="store_true", help="JSON output")
    add_settings_arguments(config)
    config.set_defaults(func=cmd_config)

    demo = sub.add_parser(
        "demo",
        help="ship a generated, rotating audit log to an embedded receiver and verify",
        description="Writes a realistic rotating audit log while `pyforward run` ships it over "
        "mTLS with gzip and acks to an embedded `pyforward receive`, then checks that every "
        "event arrived exactly once.",
    )
    demo.add_argument("--events", type=int, default=50_000, help="events to write (default: 50000)")
    demo.add_argument("--rotate-bytes", type=int, default=8 << 20, help="rotate the log at this size (default: 8 MiB)")
    demo.add_argument("--keep", type=Path, default=None, help="keep the demo's files in this directory")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except SettingsError as exc:
        print(f"pyforward {ns.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
