"""`pyforward check`: a doctor for operators.

It reads the same settings as `run` and walks the path step by step — certificates, proxy connect, proxy
TLS, CONNECT, receiver TLS (with the certificate chain it saw), Forward handshake and, with --probe, one
event and its ack — printing each step's result and time. For the first failure it names the likely cause
and the setting involved. Exit code 0 only when every step passed.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from pyforward.certs import TLSMaterial
from pyforward.client import ClientConfig
from pyforward.connection import StartupError, client_config, connection_material
from pyforward.protocol import (
    Ack,
    ClientDecoder,
    EntryPacker,
    EventTime,
    Helo,
    Pong,
    ProtocolError,
    build_chunk,
    encode_ping,
    make_ping,
    verify_pong,
)
from pyforward.settings import Settings
from pyforward.transport import Destination, TransportError, open_stream

# step -> (what it means when it fails, the settings involved)
HINTS: dict[str, tuple[str, str]] = {
    "settings": ("the settings are incomplete or inconsistent", "see `pyforward config`"),
    "discovery": (
        "the receiver Service (or its Secret) was not found in the cluster",
        "PYFORWARD_KUBECONFIG, PYFORWARD_NAMESPACE, PYFORWARD_SERVICE_NAME, PYFORWARD_SECRET_NAME",
    ),
    "certificates": (
        "a certificate or key file cannot be read, is not PEM, or the key does not belong to the certificate",
        "PYFORWARD_TLS_CA_FILE, PYFORWARD_TLS_CERT_FILE, PYFORWARD_TLS_KEY_FILE, PYFORWARD_PROXY_*_FILE",
    ),
    "proxy-connect": (
        "the proxy cannot be reached: is it running, is the socket path or host:port right, may this process open it?",
        "PYFORWARD_PROXY_UDS, or PYFORWARD_PROXY_HOST and PYFORWARD_PROXY_PORT",
    ),
    "proxy-tls": (
        "TLS to the proxy failed: its certificate is not signed by the configured CA or does not name the "
        "proxy host, or it requires a client certificate it does not accept",
        "PYFORWARD_PROXY_CA_FILE, PYFORWARD_PROXY_SERVER_NAME, PYFORWARD_PROXY_CERT_FILE, PYFORWARD_PROXY_KEY_FILE",
    ),
    "connect-request": (
        "the proxy refused to open the tunnel: 407 wants credentials, 403 forbids this destination or port, "
        "5xx means the proxy cannot reach the receiver",
        "PYFORWARD_PROXY_USERNAME, PYFORWARD_PROXY_PASSWORD, PYFORWARD_HOST, PYFORWARD_PORT",
    ),
    "connect": (
        "the receiver cannot be reached at that address: wrong host or port, or nothing listens there",
        "PYFORWARD_HOST, PYFORWARD_PORT",
    ),
    "tls": (
        "TLS to the receiver failed: its certificate is not signed by the configured CA, does not carry the "
        "expected name, or it requires a client certificate (mTLS) that was not given or not accepted; "
        "or the receiver does not speak TLS at all",
        "PYFORWARD_TLS_CA_FILE, PYFORWARD_TLS_SERVER_NAME, PYFORWARD_TLS_CERT_FILE, PYFORWARD_TLS_KEY_FILE, "
        "PYFORWARD_TLS",
    ),
    "handshake": (
        "the Forward handshake failed: the shared key or the user credentials differ from the receiver's, or "
        "the receiver wants a shared key that is not configured",
        "PYFORWARD_SHARED_KEY, PYFORWARD_USERNAME, PYFORWARD_PASSWORD, PYFORWARD_SELF_HOSTNAME",
    ),
    "probe": (
        "the receiver took the connection but did not ack the probe event in time (an output that is stuck, "
        "or a receiver that does not ack)",
        "PYFORWARD_ACK_TIMEOUT",
    ),
}


# Sharper explanations than HINTS, tried in order: (step, regular expression searched in the error message,
# cause, settings). The messages are transport.py's own, so the patterns are pinned by tests/integration/test_check.py.
SPECIFIC: tuple[tuple[str, str, str, str], ...] = (
    (
        "proxy-connect",
        r"^cannot connect to proxy unix:.*: no such file",
        "nothing at that socket path: konnectivity is not running, or the path is not the one it listens on "
        "(is the socket's directory mounted into this container?)",
        "PYFORWARD_PROXY_UDS (audit-forwarder: AUDIT_KONNECTIVITY_UDS_SOCKET)",
    ),
    (
        "proxy-connect",
        r"^cannot connect to proxy unix:.*: permission denied",
        "this process may not open the konnectivity socket (its owner, mode or the pod's fsGroup)",
        "PYFORWARD_PROXY_UDS",
    ),
    (
        "proxy-connect",
        r"^cannot connect to proxy unix:",
        "the konnectivity socket does not accept connections: is konnectivity running, is this its path?",
        "PYFORWARD_PROXY_UDS (audit-forwarder: AUDIT_KONNECTIVITY_UDS_SOCKET)",
    ),
    (
        "proxy-connect",
        r"cannot resolve",
        "the proxy host name does not resolve",
        "PYFORWARD_PROXY_HOST (audit-forwarder: AUDIT_PROXY_HOST)",
    ),
    (
        "proxy-connect",
        r"^cannot connect to proxy ",
        "nothing accepts connections at the proxy's host and port: the proxy is down, or the host or port is wrong",
        "PYFORWARD_PROXY_HOST and PYFORWARD_PROXY_PORT (audit-forwarder: AUDIT_PROXY_HOST, AUDIT_PROXY_PORT)",
    ),
    (
        "proxy-tls",
        r"certificate verify failed: (Hostname|IP address) mismatch",
        "the proxy's certificate does not carry the name pyforward checks",
        "PYFORWARD_PROXY_SERVER_NAME (default: the proxy host)",
    ),
    (
        "proxy-tls",
        r"certificate verify failed",
        "the proxy's certificate is not signed by a CA in the proxy CA file (or it expired)",
        "PYFORWARD_PROXY_CA_FILE (audit-forwarder: AUDIT_PROXY_CA_FILE)",
    ),
    (
        "proxy-tls",
        r"no client certificate configured|certificate required",
        "the proxy requires a client certificate (mTLS) and none is configured",
        "PYFORWARD_PROXY_CERT_FILE and PYFORWARD_PROXY_KEY_FILE (audit-forwarder: AUDIT_PROXY_CLIENT_CRT_FILE, "
        "AUDIT_PROXY_CLIENT_KEY_FILE)",
    ),
    (
        "proxy-tls",
        r"wrong version number|record layer failure|packet length too long|http request",
        "the proxy does not speak TLS on that port",
        "PYFORWARD_PROXY_TLS, PYFORWARD_PROXY_PORT",
    ),
    (
        "proxy-tls",
        r"client certificate|unknown ca|certificate unknown|bad certificate|certificate expired|rejected the TLS",
        "the proxy does not accept our client certificate: not signed by a CA it trusts, expired, or the wrong one",
        "PYFORWARD_PROXY_CERT_FILE and PYFORWARD_PROXY_KEY_FILE (audit-forwarder: AUDIT_PROXY_CLIENT_CRT_FILE, "
        "AUDIT_PROXY_CLIENT_KEY_FILE)",
    ),
    (
        "tls",
        r"certificate verify failed: (Hostname|IP address) mismatch",
        "the receiver's certificate does not carry the name pyforward checks (SNI / vhost)",
        "PYFORWARD_TLS_SERVER_NAME (audit-forwarder: AUDIT_TLS_VHOST)",
    ),
    (
        "tls",
        r"certificate verify failed: certificate has expired",
        "the receiver's certificate has expired (or this machine's clock is wrong)",
        "the receiver's certificate; PYFORWARD_TLS_CA_FILE",
    ),
    (
        "tls",
        r"certificate verify failed",
        "the receiver's certificate is not signed by a CA in the receiver CA file",
        "PYFORWARD_TLS_CA_FILE (with discovery: ca.crt of the client Secret)",
    ),
    (
        "tls",
        r"no client certificate configured|certificate required",
        "the receiver requires a client certificate (mTLS) and none is configured",
        "PYFORWARD_TLS_CERT_FILE and PYFORWARD_TLS_KEY_FILE",
    ),
    (
        "tls",
        r"wrong version number|record layer failure|packet length too long|http request",
        "the receiver does not speak TLS on that port",
        "PYFORWARD_TLS (false for a plain-TCP receiver), PYFORWARD_PORT",
    ),
    (
        "tls",
        r"client certificate|unknown ca|certificate unknown|bad certificate|certificate expired|ended the TLS",
        "the receiver does not accept our client certificate: not signed by a CA it trusts, expired, or the wrong one",
        "PYFORWARD_TLS_CERT_FILE and PYFORWARD_TLS_KEY_FILE (with discovery: the client Secret)",
    ),
    (
        "handshake",
        r"username/password",
        "the receiver's user authentication refused our user name or password",
        "PYFORWARD_USERNAME, PYFORWARD_PASSWORD",
    ),
    (
        "handshake",
        r"shared.key|HELO",
        "the shared key differs from the receiver's, or the receiver wants one and none is configured",
        "PYFORWARD_SHARED_KEY",
    ),
)

# CONNECT answers by status (RFC 9110 §15): what the proxy means by them.
_CONNECT_STATUS: dict[int, tuple[str, str]] = {
    401: (
        "the proxy rejected the credentials (tinyproxy answers a wrong password with 401)",
        "PYFORWARD_PROXY_USERNAME, PYFORWARD_PROXY_PASSWORD",
    ),
    403: (
        "the proxy does not allow a tunnel to this destination: the receiver's host or port is wrong, or not in the "
        "proxy's allow-list (tinyproxy ConnectPort/Allow, the konnectivity or VPN policy)",
        "PYFORWARD_HOST, PYFORWARD_PORT (and the proxy's configuration)",
    ),
}
_CONNECT_5XX = (
    "the proxy works but cannot reach the receiver: the receiver is down, its host or port is wrong, or the network "
    "from the proxy to it is blocked (VPN or tunnel down, a Service without endpoints)",
    "PYFORWARD_HOST, PYFORWARD_PORT",
)
_CONNECT_407 = {
    False: ("the proxy requires credentials (Proxy-Authorization) and none are configured",
            "PYFORWARD_PROXY_USERNAME, PYFORWARD_PROXY_PASSWORD"),
    True: ("the proxy rejected the credentials", "PYFORWARD_PROXY_USERNAME, PYFORWARD_PROXY_PASSWORD"),
}  # fmt: skip


def explain(step: str, error: str, status: int | None = None) -> tuple[str, str]:
    """(likely cause, settings involved) for a failure at ``step`` with message ``error``."""
    if step == "certificates":
        # pipeline.py names the setting of the file that does not load: send the operator there only.
        named = re.findall(r"\b(?:PYFORWARD|AUDIT)_[A-Z_]+_FILE\b", error)
        if named:
            return HINTS[step][0], ", ".join(dict.fromkeys(named))
    if step == "connect-request" and status is not None:
        if status == 407:
            return _CONNECT_407["credentials rejected" in error]
        if status in _CONNECT_STATUS:
            return _CONNECT_STATUS[status]
        if 500 <= status < 600:
            return _CONNECT_5XX
    for rule_step, pattern, cause, settings in SPECIFIC:
        if rule_step == step and re.search(pattern, error, re.IGNORECASE):
            return cause, settings
    return HINTS.get(step, ("", ""))


@dataclass
class Report:
    out: TextIO
    failed: bool = False
    passed: list[str] = field(default_factory=list)

    def ok(self, step: str, seconds: float, detail: str = "") -> None:
        self.passed.append(step)
        self.out.write(f"  ok    {step:<16} {seconds * 1000:8.1f} ms  {detail}\n")
        self.out.flush()

    def skip(self, step: str, why: str) -> None:
        self.out.write(f"  --    {step:<16} {'':>11}  {why}\n")

    def fail(self, step: str, seconds: float, error: str, status: int | None = None) -> int:
        self.failed = True
        cause, settings = explain(step, error, status)
        self.out.write(f"  FAIL  {step:<16} {seconds * 1000:8.1f} ms  {error}\n")
        if cause:
            self.out.write(f"\n  likely cause: {cause}\n  settings:     {settings}\n")
        if step in self.passed and step in ("tls", "proxy-tls"):
            # The ok line above is not a contradiction: RFC 8446 §4.4.2.
            self.out.write(
                f"  note:         the {step} handshake had completed: with TLS 1.3 the server checks the client "
                "certificate afterwards and rejects it with the first data\n"
            )
        self.out.flush()
        return 1


class EndedAfterTLS(Exception):
    """The receiver ended the TLS session before sending a single byte: with TLS 1.3 this is how a server rejects
    a client certificate (after the handshake, RFC 8446 §4.4.2), so it belongs to the tls step."""


class _Receiver:
    """The receiver's side of the open connection, as Forward events; knows whether it has sent anything yet."""

    def __init__(self, reader: asyncio.StreamReader, *, tls: bool) -> None:
        self.reader = reader
        self.decoder = ClientDecoder()
        self.tls = tls
        self.received = 0

    async def event(self) -> Helo | Pong | Ack:
        while True:
            try:
                data = await self.reader.read(65536)
            except ssl.SSLError as exc:
                if self.tls and not self.received:
                    raise EndedAfterTLS(f"TLS alert {(exc.reason or str(exc)).replace('_', ' ').lower()}") from None
                raise
            except ConnectionResetError:
                if self.tls and not self.received:
                    raise EndedAfterTLS("connection reset") from None
                raise
            if not data:
                if self.tls and not self.received:
                    raise EndedAfterTLS("it closed the connection")
                raise ProtocolError("the receiver closed the connection")
            self.received += len(data)
            events = self.decoder.feed(data)
            if events:
                return events[0]


async def run_check(settings: Settings, *, probe: bool, out: TextIO = sys.stdout) -> int:
    report = Report(out)
    started = time.monotonic()
    out.write("pyforward check\n")
    await _spool(settings, report)
    host, port = settings.host, settings.port
    if settings.discovery_enabled:
        t0 = time.monotonic()
        from pyforward.discovery import Discovery

        discovery = Discovery(settings, on_target=lambda _: None)
        task = asyncio.create_task(discovery.run())
        try:
            ready = await discovery.wait_ready(settings.connect_timeout)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        target = discovery.target
        if not ready or target is None:
            return report.fail(
                "discovery",
                time.monotonic() - t0,
                f"Service {settings.namespace}/{settings.service_name} or its Secret not ready "
                f"within {settings.connect_timeout:g}s",
            )
        host, port = target.host, target.port
        report.ok("discovery", time.monotonic() - t0, f"{settings.namespace}/{settings.service_name} -> {host}:{port}")
    assert host is not None

    t0 = time.monotonic()
    try:
        material, proxy = connection_material(settings)
    except StartupError as exc:
        return report.fail("certificates", time.monotonic() - t0, str(exc))
    report.ok("certificates", time.monotonic() - t0, _describe_material(material, proxy.tls if proxy else None))
    try:
        destination = Destination(host=host, port=port, tls=material, server_name=settings.effective_server_name)
    except ValueError as exc:
        return report.fail("settings", 0.0, str(exc))
    if proxy is None:
        report.skip("proxy", "none configured (direct connection)")

    last = [time.monotonic()]

    def on_step(step: str, seconds: float, detail: str) -> None:
        report.ok(step, seconds, detail)
        last[0] = time.monotonic()

    try:
        reader, writer = await open_stream(destination, proxy, timeout=settings.connect_timeout, on_step=on_step)
    except TransportError as exc:
        return report.fail(exc.step, time.monotonic() - last[0], str(exc), exc.status)
    except OSError as exc:
        return report.fail("connect", time.monotonic() - last[0], str(exc))
    if not settings.tls:
        report.skip("tls", "PYFORWARD_TLS is false: plain TCP (the receiver sees the events unencrypted)")
    receiver = _Receiver(reader, tls=destination.tls is not None)

    def ended(exc: EndedAfterTLS, t0: float) -> int:
        hint = ""
        if destination.tls is not None and not destination.tls.has_client_certificate:
            hint = " (no client certificate configured; the receiver may require one)"
        via = f" through {proxy.describe()}" if proxy is not None else ""
        message = f"{destination.describe()}{via} ended the TLS session before sending anything: {exc}{hint}"
        return report.fail("tls", time.monotonic() - t0, message)

    try:
        config = client_config(settings)
        t0 = time.monotonic()
        try:
            detail = await asyncio.wait_for(_handshake(receiver, writer, config), settings.connect_timeout)
        except EndedAfterTLS as exc:
            return ended(exc, t0)
        except (ProtocolError, OSError, TimeoutError) as exc:
            return report.fail("handshake", time.monotonic() - t0, str(exc) or "timed out waiting for HELO")
        if detail:
            report.ok("handshake", time.monotonic() - t0, detail)
        else:
            report.skip("handshake", "no shared key configured")
        if probe:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(_probe(receiver, writer, settings), settings.ack_timeout)
            except EndedAfterTLS as exc:
                return ended(exc, t0)
            except TimeoutError:
                return report.fail("probe", time.monotonic() - t0, f"no ack within {settings.ack_timeout:g}s")
            except (ProtocolError, OSError) as exc:
                return report.fail("probe", time.monotonic() - t0, str(exc))
            report.ok("probe", time.monotonic() - t0, f"one event, tag {settings.tag!r}, acked")
        else:
            report.skip("probe", "not asked (--probe sends one event and waits for its ack)")
    finally:
        writer.close()
    out.write(f"all steps passed in {(time.monotonic() - started) * 1000:.0f} ms\n")
    return 0


async def _spool(settings: Settings, report: Report) -> None:
    """The spool's state and the free space beside the log (issue 21). Informative: a spool that is off is not a
    failure of the path to the receiver (`run` goes on without it, as before it existed)."""
    from pyforward.tail import scan
    from pyforward.tail.spool import Spool

    t0 = time.monotonic()
    spool = Spool(
        settings.log_path, settings.effective_spool_dir, max_bytes=settings.spool_max_bytes,
        min_free=settings.spool_min_free,
    )  # fmt: skip

    def look() -> None:
        spool.start()  # (as `run` does: makes the directory and tries a hard link there)
        spool.take(scan.list_siblings(settings.log_path, spool.directory))

    await asyncio.to_thread(look)
    status = await asyncio.to_thread(spool.status)
    if not status.active:
        report.skip("spool", f"off: {status.reason}")
    elif status.free is None:
        report.skip("spool", f"{settings.log_path.parent} does not exist here: cannot look at the spool")
    else:
        report.ok(
            "spool",
            time.monotonic() - t0,
            f"{status.directory}: {status.files} files, {status.bytes} bytes kept only by the spool of "
            f"{status.budget} (PYFORWARD_SPOOL_MAX_BYTES); {status.free} bytes free, floor {status.floor}",
        )


def _describe_material(receiver: TLSMaterial | None, proxy: TLSMaterial | None) -> str:
    parts = []
    for name, material in (("receiver", receiver), ("proxy", proxy)):
        if material is None:
            continue
        cert = material.certificate
        if cert is not None:
            parts.append(f"{name} client cert {cert.subject}, expires {cert.not_after:%Y-%m-%d}")
        else:
            parts.append(f"{name}: CA only")
    return "; ".join(parts) or "no TLS material configured"


async def _handshake(receiver: _Receiver, writer: asyncio.StreamWriter, config: ClientConfig) -> str:
    if config.shared_key is None:
        # A receiver with a shared key speaks first (HELO); give it a moment to show that it wants one.
        try:
            unsolicited = await asyncio.wait_for(receiver.event(), 0.5)
        except TimeoutError:
            return ""
        if isinstance(unsolicited, Helo):
            raise ProtocolError("the receiver sent HELO: it requires a shared key, and none is configured")
        raise ProtocolError(f"the receiver sent {type(unsolicited).__name__} before anything was asked")
    helo = await receiver.event()
    if not isinstance(helo, Helo):
        raise ProtocolError(f"expected HELO, got {type(helo).__name__}: does the receiver have a shared key?")
    ping = make_ping(
        helo, hostname=config.hostname, shared_key=config.shared_key, username=config.username, password=config.password
    )
    writer.write(encode_ping(ping))
    pong = await receiver.event()
    if not isinstance(pong, Pong):
        raise ProtocolError(f"expected PONG, got {type(pong).__name__}")
    if not pong.auth_ok:
        raise ProtocolError(f"the receiver refused: {pong.reason}")
    verify_pong(pong, salt=ping.salt, nonce=helo.nonce, shared_key=config.shared_key, own_hostname=config.hostname)
    return f"shared key accepted by {pong.hostname.decode(errors='replace')}"


async def _probe(receiver: _Receiver, writer: asyncio.StreamWriter, settings: Settings) -> None:
    record = {"message": "pyforward check probe", "host": settings.self_hostname}
    entry = EntryPacker().pack_entry(EventTime.now(), record)
    chunk = build_chunk(settings.tag, entry, 1, size=len(entry), compress=settings.compress == "gzip")
    writer.write(chunk.payload)
    await writer.drain()
    event = await receiver.event()
    if isinstance(event, Helo):
        raise ProtocolError("the receiver sent HELO: it requires a shared key (PYFORWARD_SHARED_KEY)")
    if not isinstance(event, Ack) or event.chunk_id != chunk.chunk_id.encode():
        raise ProtocolError(f"unexpected answer to the probe: {event!r}")
