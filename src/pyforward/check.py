"""`pyforward check`: a doctor for operators.

It reads the same settings as `run` and walks the path step by step — certificates, proxy connect, proxy
TLS, CONNECT, receiver TLS (with the certificate chain it saw), Forward handshake and, with --probe, one
event and its ack — printing each step's result and time. For the first failure it names the likely cause
and the setting involved. Exit code 0 only when every step passed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from pyforward.certs import CertError, TLSMaterial
from pyforward.client import ClientConfig
from pyforward.pipeline import StartupError, client_config, proxy_from, tls_material
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
        "502/503/504 means the proxy cannot reach the receiver",
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


@dataclass
class Report:
    out: TextIO
    failed: bool = False

    def ok(self, step: str, seconds: float, detail: str = "") -> None:
        self.out.write(f"  ok    {step:<16} {seconds * 1000:8.1f} ms  {detail}\n")
        self.out.flush()

    def skip(self, step: str, why: str) -> None:
        self.out.write(f"  --    {step:<16} {'':>11}  {why}\n")

    def fail(self, step: str, seconds: float, error: str) -> int:
        self.failed = True
        cause, settings = HINTS.get(step, ("", ""))
        self.out.write(f"  FAIL  {step:<16} {seconds * 1000:8.1f} ms  {error}\n")
        if cause:
            self.out.write(f"\n  likely cause: {cause}\n  settings:     {settings}\n")
        self.out.flush()
        return 1


async def run_check(settings: Settings, *, probe: bool, out: TextIO = sys.stdout) -> int:
    report = Report(out)
    started = time.monotonic()
    out.write("pyforward check\n")
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
        material = tls_material(settings)
        if material is not None:
            material.load()
        proxy = proxy_from(settings)
    except (CertError, StartupError) as exc:
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
        return report.fail(exc.step, time.monotonic() - last[0], str(exc))
    except OSError as exc:
        return report.fail("connect", time.monotonic() - last[0], str(exc))
    if not settings.tls:
        report.skip("tls", "PYFORWARD_TLS is false: plain TCP (the receiver sees the events unencrypted)")
    try:
        config = client_config(settings)
        decoder = ClientDecoder()
        t0 = time.monotonic()
        try:
            detail = await asyncio.wait_for(_handshake(reader, writer, decoder, config), settings.connect_timeout)
        except (ProtocolError, OSError, TimeoutError) as exc:
            return report.fail("handshake", time.monotonic() - t0, str(exc) or "timed out waiting for HELO")
        if detail:
            report.ok("handshake", time.monotonic() - t0, detail)
        else:
            report.skip("handshake", "no shared key configured")
        if probe:
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(_probe(reader, writer, decoder, settings), settings.ack_timeout)
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


async def _read_event(reader: asyncio.StreamReader, decoder: ClientDecoder) -> Helo | Pong | Ack:
    while True:
        data = await reader.read(65536)
        if not data:
            raise ProtocolError("the receiver closed the connection")
        events = decoder.feed(data)
        if events:
            return events[0]


async def _handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: ClientDecoder, config: ClientConfig
) -> str:
    if config.shared_key is None:
        # A receiver with a shared key speaks first (HELO); give it a moment to show that it wants one.
        try:
            unsolicited = await asyncio.wait_for(_read_event(reader, decoder), 0.5)
        except TimeoutError:
            return ""
        if isinstance(unsolicited, Helo):
            raise ProtocolError("the receiver sent HELO: it requires a shared key, and none is configured")
        raise ProtocolError(f"the receiver sent {type(unsolicited).__name__} before anything was asked")
    helo = await _read_event(reader, decoder)
    if not isinstance(helo, Helo):
        raise ProtocolError(f"expected HELO, got {type(helo).__name__}: does the receiver have a shared key?")
    ping = make_ping(
        helo, hostname=config.hostname, shared_key=config.shared_key, username=config.username, password=config.password
    )
    writer.write(encode_ping(ping))
    pong = await _read_event(reader, decoder)
    if not isinstance(pong, Pong):
        raise ProtocolError(f"expected PONG, got {type(pong).__name__}")
    if not pong.auth_ok:
        raise ProtocolError(f"the receiver refused: {pong.reason}")
    verify_pong(pong, salt=ping.salt, nonce=helo.nonce, shared_key=config.shared_key, own_hostname=config.hostname)
    return f"shared key accepted by {pong.hostname.decode(errors='replace')}"


async def _probe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: ClientDecoder, settings: Settings
) -> None:
    record = {"message": "pyforward check probe", "host": settings.self_hostname}
    entry = EntryPacker().pack_entry(EventTime.now(), record)
    chunk = build_chunk(settings.tag, entry, 1, size=len(entry), compress=settings.compress == "gzip")
    writer.write(chunk.payload)
    await writer.drain()
    event = await _read_event(reader, decoder)
    if isinstance(event, Helo):
        raise ProtocolError("the receiver sent HELO: it requires a shared key (PYFORWARD_SHARED_KEY)")
    if not isinstance(event, Ack) or event.chunk_id != chunk.chunk_id.encode():
        raise ProtocolError(f"unexpected answer to the probe: {event!r}")
