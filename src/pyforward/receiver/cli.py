"""`pyforward receive`: its flags and environment, and the command that runs a Receiver until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from pyforward.certs import CertError, TLSFiles, TLSMaterial
from pyforward.receiver.config import ENV_SHARED_KEY, ENV_USERS, ReceiverConfig, log
from pyforward.receiver.markfile import MarkFileError
from pyforward.receiver.output import OutputError, _reason
from pyforward.receiver.server import Receiver


def _bind(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"--bind wants HOST:PORT, not {value!r}")
    port = int(port_text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"--bind port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


def _positive_size(value: str) -> int:
    from pyforward.settings import parse_bytes  # the same size syntax as `pyforward run` (16Mi, 200M, ...)

    try:
        size = parse_bytes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(size, int) or size < 1:
        raise argparse.ArgumentTypeError(f"not a positive byte size: {value!r}")
    return size


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value!r}")
    return number


def _count(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {number}")
        return number

    return parse


def _user(value: str) -> tuple[str, str]:
    name, sep, password = value.partition(":")
    if not sep or not name or not password:
        # Never echo the value: it holds a password.
        raise argparse.ArgumentTypeError("--user wants NAME:PASSWORD (both non-empty)")
    return name, password


def _env_users(text: str) -> list[tuple[str, str]]:
    users = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if item:
            try:
                users.append(_user(item))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{ENV_USERS} wants NAME:PASSWORD[,NAME:PASSWORD...]") from None
    return users


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `pyforward receive` options to ``parser`` (the subcommand's parser)."""
    parser.description = (
        "Receive Forward-protocol events (fluentd, fluent-bit, pyforward) and write each one as a JSON line. "
        "Requests are acked only after their events are written and flushed."
    )
    parser.add_argument(
        "--bind",
        type=_bind,
        default=("127.0.0.1", 24224),
        metavar="HOST:PORT",
        help="Address to listen on; port 0 picks a free port, :PORT listens on all IPv4 addresses "
        "(default 127.0.0.1:24224). IPv6: [::1]:24224.",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="Server certificate (PEM, chain allowed); enables TLS."
    )
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="Private key of --tls-cert (PEM).")
    tls.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="CA bundle for client certificates: with it, clients must present a certificate it signed (mTLS).",
    )
    auth = parser.add_argument_group("Authentication")
    auth.add_argument(
        "--shared-key",
        metavar="KEY",
        default=None,
        help=f"Forward shared key: clients must complete the HELO/PING/PONG handshake before sending data. "
        f"Also read from ${ENV_SHARED_KEY} (preferred: a command line is visible to other users).",
    )
    auth.add_argument(
        "--user",
        type=_user,
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help=f"Require user auth in the handshake (needs a shared key); repeatable. Also read from ${ENV_USERS} "
        "as comma-separated NAME:PASSWORD pairs.",
    )
    auth.add_argument(
        "--self-hostname",
        default=None,
        metavar="NAME",
        help="Hostname this receiver sends in its PONG (default: this machine's hostname).",
    )
    out = parser.add_argument_group("Output")
    out.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="Append the JSON lines to FILE (default: standard output).",
    )
    out.add_argument(
        "--format",
        choices=("record", "full"),
        default="record",
        help='"record": each record alone, one JSON object per line (as the audit-tailer prints); "full": '
        '{"tag": ..., "time": "<RFC 3339, nanoseconds, UTC>", "record": {...}} (default: record).',
    )
    limits = parser.add_argument_group("Limits")
    defaults = ReceiverConfig()
    limits.add_argument(
        "--max-request-bytes",
        type=_positive_size,
        default=defaults.max_request_bytes,
        metavar="N",
        help="Largest request on the wire; a bigger one closes the connection without an ack "
        "(default 16Mi; sizes like 1048576, 16Mi, 200M).",
    )
    limits.add_argument(
        "--max-decompressed-bytes",
        type=_positive_size,
        default=defaults.max_decompressed_bytes,
        metavar="N",
        help="Largest gzip-decompressed request (CompressedPackedForward), as fluentd (default 256Mi).",
    )
    limits.add_argument(
        "--max-connections",
        type=_count(1),
        default=defaults.max_connections,
        metavar="N",
        help=f"Connections open at once (default {defaults.max_connections}). At the cap, the connection idle the "
        "longest (at least 1 s) is closed to make room; if none is idle, new connections are refused.",
    )
    limits.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=defaults.idle_timeout,
        metavar="SECONDS",
        help=f"Close a connection that sends nothing for this long (default {defaults.idle_timeout:g}).",
    )
    limits.add_argument(
        "--handshake-timeout",
        type=_positive_float,
        default=defaults.handshake_timeout,
        metavar="SECONDS",
        help=f"Time for the TLS and shared-key handshakes (default {defaults.handshake_timeout:g}).",
    )
    limits.add_argument(
        "--dedup-ids",
        type=_count(0),
        default=defaults.dedup_ids,
        metavar="N",
        help="Recently acked chunk ids remembered: a retried chunk is acked again without writing its events "
        f"twice; 0 disables (default {defaults.dedup_ids}).",
    )
    once = parser.add_argument_group(
        "Exactly once",
        "pyforward run (record_ranges, on by default) marks each chunk with its source file and each record's byte "
        "range in it (options pyforward.source, pyforward.offset, pyforward.lengths; docs/protocol.md). This receiver "
        "keeps, per source, the end of what it has written: a record that ends at or before it is a re-send (after "
        "a crash, restart or reconnect of the sender) and is acked without being written again "
        "(pyforward_receiver_duplicates_dropped_total); anything else is written. Senders without these options "
        "(fluent-bit, fluentd, pyforward with record_ranges off) are at-least-once, as before; a third-party receiver "
        "(fluentd, fluent-bit) sent these options ignores them (the Forward spec's unknown options) and is "
        "at-least-once. Ranges that make no sense close the connection.",
    )
    once.add_argument(
        "--no-exactly-once",
        dest="exactly_once",
        action="store_false",
        help="Ignore the pyforward.* options: write every record received (chunk ids are still deduplicated).",
    )
    once.add_argument(
        "--dedup-state",
        type=Path,
        metavar="FILE",
        help="Where the per-source marks are kept across restarts: one 512-byte slot per source, written in place "
        "after the output and before the ack, with the output's length, to which start-up cuts what a killed "
        "receiver wrote but never acked (default: FILE.pyforward-marks beside --output; in memory only when writing "
        "to standard output; with --no-exactly-once, only an existing one is kept current; without one, only a "
        "torn last line is cut).",
    )
    once.add_argument(
        "--dedup-max-sources",
        type=_count(1),
        default=defaults.dedup_max_sources,
        metavar="N",
        help=f"Sources remembered (default {defaults.dedup_max_sources}: ~{defaults.dedup_max_sources // 2} KiB of "
        "state file); over it the one idle the longest is forgotten. Forgetting makes a later re-send of that source "
        "a duplicate, never a loss.",
    )
    once.add_argument(
        "--dedup-forget-after",
        type=_positive_float,
        default=defaults.dedup_forget_after,
        metavar="SECONDS",
        help=f"Forget a source idle this long (default {defaults.dedup_forget_after:g}: 7 days; a sender re-sends "
        "only what follows its checkpoint, so only a sender down longer than this re-sends a forgotten source).",
    )
    once.add_argument(
        "--sync",
        action="store_true",
        help="fdatasync the output, then the state, before each ack (survives a power loss; costs a disk flush per "
        "write batch). Without it, a crash of this process loses and duplicates nothing (the page cache keeps "
        "both), a power loss may lose what the kernel had not written back.",
    )
    out.add_argument(
        "--metrics-bind",
        metavar="HOST:PORT",
        help="Serve Prometheus metrics (/metrics: requests, records, duplicates dropped, sources tracked, ...) on "
        "HOST:PORT (default: none).",
    )
    parser.set_defaults(_receive_parser=parser)


def _fail(args: argparse.Namespace, message: str) -> int:
    parser = getattr(args, "_receive_parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)  # exits 2
    print(f"pyforward receive: error: {message}", file=sys.stderr)
    return 2


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ReceiverConfig:
    """Build the config from parsed arguments. Raises ``ValueError`` with one line for a bad combination."""
    env = os.environ if environ is None else environ
    host, port = args.bind
    shared_key = args.shared_key if args.shared_key is not None else (env.get(ENV_SHARED_KEY) or None)
    users = dict(_env_users(env.get(ENV_USERS, "")))
    users.update(dict(args.user))
    if users and shared_key is None:
        raise ValueError(f"user auth (--user, ${ENV_USERS}) needs a shared key (--shared-key or ${ENV_SHARED_KEY})")
    if shared_key is not None and not shared_key:
        raise ValueError("--shared-key must not be empty")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    tls = None
    if args.tls_cert is not None:
        tls = TLSMaterial(
            TLSFiles(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key),
            purpose="server",
            require_client_cert=args.tls_ca is not None,
            name="receiver",
        )
    config = ReceiverConfig(
        host=host,
        port=port,
        tls=tls,
        shared_key=shared_key,
        users=users,
        output=args.output,
        output_format=args.format,
        max_request_bytes=args.max_request_bytes,
        max_decompressed_bytes=args.max_decompressed_bytes,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        handshake_timeout=args.handshake_timeout,
        dedup_ids=args.dedup_ids,
        exactly_once=args.exactly_once,
        dedup_state=_state_path(args),
        dedup_max_sources=args.dedup_max_sources,
        dedup_forget_after=args.dedup_forget_after,
        sync=args.sync,
    )
    if args.self_hostname:
        config.self_hostname = args.self_hostname
    return config


def _state_path(args: argparse.Namespace) -> Path | None:
    if args.dedup_state is not None:
        return Path(args.dedup_state)
    output: Path | None = args.output
    return output.with_name(output.name + ".pyforward-marks") if output is not None else None


async def receive_command(args: argparse.Namespace) -> int:
    """Run `pyforward receive` until SIGTERM or SIGINT. 0 on a clean stop, 2 for bad options, 1 otherwise."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        config = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        return _fail(args, str(exc))
    receiver = Receiver(config)
    try:
        port = await receiver.start()
    except CertError as exc:
        return _fail(args, str(exc))
    except (OutputError, MarkFileError) as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        print(f"pyforward receive: cannot listen on {config.host}:{config.port}: {_reason(exc)}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    served = None
    if args.metrics_bind:
        from pyforward.metrics import HealthState, start_server
        from pyforward.receiver.metrics import ReceiverMetrics

        try:
            served = start_server(args.metrics_bind, ReceiverMetrics(receiver), HealthState(loop=loop))
        except (OSError, ValueError) as exc:
            await receiver.close()
            print(f"pyforward receive: {exc}", file=sys.stderr)
            return 1
    # Everything loaded so far lives as long as the process: keep it out of the GC's full collections.
    gc.freeze()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"pyforward receive: listening on {host}:{port} ({receiver.mode})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await receiver.close()
        if served is not None:
            served.close()
    s = receiver.stats
    log.info(
        "stopped: %d connections, %d requests, %d records, %d acks, %d duplicate chunks, %d duplicate records "
        "dropped, %d bad requests, %d auth failures",
        s.connections,
        s.requests,
        s.records,
        s.acks,
        s.duplicate_chunks,
        receiver.marks.dropped_records if receiver.marks is not None else 0,
        s.bad_requests,
        s.auth_failures,
    )
    return 0
