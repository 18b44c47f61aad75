"""open_stream against real parts: an asyncio TLS echo server, tinyproxy, socat (Unix socket and mTLS).

Production shapes: direct (mTLS to the receiver), konnectivity (HTTP CONNECT proxy on a Unix socket)
and Gardener's reversed VPN (HTTP CONNECT proxy over mTLS, with the receiver's TLS inside: TLS in TLS).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from pyforward.certs import TLSFiles, TLSMaterial
from pyforward.transport import (
    MAX_RESPONSE_HEAD,
    TLS_READ_BYTES,
    Destination,
    Proxy,
    TransportError,
    open_stream,
    peer_certificate_chain,
)
from tests.conftest import CertFiles, free_port, write_certs
from tests.proxies import Proxies
from tests.unit.test_certs import SecretVolume, leaf_files

# -- the receiver: a TLS echo server ---------------------------------------------------------------------


@dataclass
class EchoServer:
    server: asyncio.Server
    port: int
    greeting: bytes = b""
    client_subjects: list[str] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            peer = ssl_object.getpeercert()
            subject = dict(item for rdn in peer["subject"] for item in rdn) if peer else {}
            self.client_subjects.append(str(subject.get("commonName", "")))
        try:
            if self.greeting:
                writer.write(self.greeting)  # like a Forward receiver's HELO: it speaks first
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()
        # Let every handler finish (Python 3.11's stream callback logs an error for a cancelled one).
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        for writer in self.writers:  # until each socket is really closed (TLS shutdown included)
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)


StartEcho = Callable[..., Awaitable[EchoServer]]


@pytest.fixture
async def echo() -> AsyncIterator[StartEcho]:
    servers: list[EchoServer] = []

    async def start(context: ssl.SSLContext | None = None, greeting: bytes = b"") -> EchoServer:
        holder: list[EchoServer] = []
        if context is not None:
            # Record the SNI the client sent (server_name override = audit-forwarder's tls.vhost).
            def sni(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
                holder[0].server_names.append(name)

            context.sni_callback = sni

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0].handle(reader, writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        holder.append(EchoServer(server, port, greeting))
        servers.append(holder[0])
        return holder[0]

    yield start
    for server in servers:
        await server.close()


def server_material(certs: CertFiles, *, mtls: bool = False) -> TLSMaterial:
    files = TLSFiles(ca_file=certs.ca, cert_file=certs.server_cert, key_file=certs.server_key)
    material = TLSMaterial(files, purpose="server", require_client_cert=mtls)
    material.load()
    return material


def server_context(certs: CertFiles, *, mtls: bool = False) -> ssl.SSLContext:
    # A fresh context per server: the echo fixture installs an SNI callback on it.
    return server_material(certs, mtls=mtls).context()


def client_material(
    certs: CertFiles, *, client_cert: bool = True, name: str = "receiver", server_name: str | None = None
) -> TLSMaterial:
    files = TLSFiles(
        ca_file=certs.ca,
        cert_file=certs.client_cert if client_cert else None,
        key_file=certs.client_key if client_cert else None,
        server_name=server_name,
    )
    material = TLSMaterial(files, purpose="client", name=name)
    material.load()
    return material


class Steps:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float, str]] = []

    def __call__(self, step: str, seconds: float, detail: str) -> None:
        assert seconds >= 0
        self.seen.append((step, seconds, detail))

    @property
    def names(self) -> list[str]:
        return [step for step, _, _ in self.seen]

    def detail(self, step: str) -> str:
        return next(detail for name, _, detail in self.seen if name == step)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


# -- direct ----------------------------------------------------------------------------------------------


async def test_direct_tcp(echo: StartEcho) -> None:
    server = await echo()
    steps = Steps()
    reader, writer = await open_stream(Destination("127.0.0.1", server.port), on_step=steps)
    await roundtrip(reader, writer, b"forward" * 1000)
    assert steps.names == ["connect"]
    assert steps.detail("connect").startswith(f"127.0.0.1:{server.port} from 127.0.0.1:")
    assert peer_certificate_chain(writer) == []
    await close(writer)


async def test_direct_tls_reports_the_peer_chain(echo: StartEcho, certs: CertFiles) -> None:
    server = await echo(server_context(certs))
    steps = Steps()
    dest = Destination("127.0.0.1", server.port, tls=client_material(certs, client_cert=False))
    reader, writer = await open_stream(dest, on_step=steps)
    await roundtrip(reader, writer, b"x" * 100_000)
    assert steps.names == ["connect", "tls"]
    detail = steps.detail("tls")
    assert detail.startswith("TLSv1.3 ")
    assert ",O=pyforward test receiver CA, expires " in detail
    assert "expires 3000-01-01T00:00:00Z" in detail  # trustme's leaf validity
    chain = peer_certificate_chain(writer)
    assert chain[0].path == "peer[0]"
    assert {"localhost", "127.0.0.1"} <= set(chain[0].sans)
    assert "pyforward test receiver CA" in chain[0].issuer
    assert server.server_names == [None]  # no SNI for an IP address (RFC 6066 §3)
    await close(writer)


def tls_read_sizes(writer: asyncio.StreamWriter) -> list[int]:
    """What asyncio's TLS layers of a stream ask OpenSSL for per read, innermost first (private attributes)."""
    sizes = []
    layer: object = writer.transport
    while (protocol := getattr(layer, "_ssl_protocol", None)) is not None:
        sizes.append(protocol.max_size)
        layer = protocol._transport
    return sizes


async def test_tls_reads_a_record_at_a_time(echo: StartEcho, certs: CertFiles) -> None:
    """asyncio's TLS layer asks for 256 KiB per read, which glibc maps and unmaps every time (an mmap per ack at steady
    rates, issue 11); a record is at most 16 KiB, so that is what a stream asks for. A megabyte still arrives whole."""
    server = await echo(server_context(certs))
    dest = Destination("127.0.0.1", server.port, tls=client_material(certs, client_cert=False))
    reader, writer = await open_stream(dest)
    assert tls_read_sizes(writer) == [TLS_READ_BYTES]
    await roundtrip(reader, writer, os.urandom(1 << 20))
    await close(writer)


async def test_direct_tls_unknown_ca(echo: StartEcho, certs: CertFiles, tmp_path: Path) -> None:
    server = await echo(server_context(certs))
    other = write_certs(tmp_path / "other", "other")
    dest = Destination("127.0.0.1", server.port, tls=client_material(other, client_cert=False))
    with pytest.raises(TransportError) as info:
        await open_stream(dest)
    assert info.value.step == "tls"
    assert str(info.value) == (
        f"TLS to receiver 127.0.0.1:{server.port} failed (server name 127.0.0.1): "
        "certificate verify failed: unable to get local issuer certificate"
    )


async def test_server_name_overrides_sni_and_hostname_check(echo: StartEcho, tmp_path: Path) -> None:
    ca = trustme.CA(organization_name="vhost CA")
    leaf = ca.issue_cert("audittailer", common_name="audittailer")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem.bytes())
    (tmp_path / "tls.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (tmp_path / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    (tmp_path / "tls.key").chmod(0o600)
    served = TLSMaterial(TLSFiles(cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key"), purpose="server")
    served.load()
    server = await echo(served.context())
    trusting = TLSMaterial(TLSFiles(ca_file=tmp_path / "ca.crt"), purpose="client")
    trusting.load()

    reader, writer = await open_stream(Destination("127.0.0.1", server.port, trusting, server_name="audittailer"))
    await roundtrip(reader, writer, b"vhost")
    await close(writer)
    assert server.server_names == ["audittailer"]

    # The same through TLSFiles.server_name (the configured vhost), with no override on the destination.
    vhost = TLSMaterial(TLSFiles(ca_file=tmp_path / "ca.crt", server_name="audittailer"), purpose="client")
    vhost.load()
    reader, writer = await open_stream(Destination("127.0.0.1", server.port, vhost))
    await roundtrip(reader, writer, b"vhost")
    await close(writer)

    with pytest.raises(TransportError) as info:
        await open_stream(Destination("127.0.0.1", server.port, trusting))
    assert info.value.step == "tls"
    assert "(server name 127.0.0.1): certificate verify failed: " in str(info.value)
    assert "IP address mismatch" in str(info.value) or "Hostname mismatch" in str(info.value)


async def test_mtls_client_certificate_is_presented(echo: StartEcho, certs: CertFiles) -> None:
    server = await echo(server_context(certs, mtls=True))
    reader, writer = await open_stream(Destination("127.0.0.1", server.port, client_material(certs)))
    await roundtrip(reader, writer, b"mtls")
    await close(writer)
    assert server.client_subjects == ["audittailer-client"]


async def test_mtls_without_client_certificate_fails_in_tls_step_tls12(echo: StartEcho, certs: CertFiles) -> None:
    # Up to TLS 1.2 the server rejects a missing client certificate inside the handshake.
    context = server_context(certs, mtls=True)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    server = await echo(context)
    dest = Destination("127.0.0.1", server.port, client_material(certs, client_cert=False))
    with pytest.raises(TransportError) as info:
        await open_stream(dest)
    assert info.value.step == "tls"
    assert str(info.value).startswith(f"TLS to receiver 127.0.0.1:{server.port} failed: ")
    # Python's ssl sends the alert; asyncio's server drops the connection without flushing it.
    assert str(info.value).endswith(
        "connection closed by the peer during the handshake "
        "(no client certificate configured; the peer may require one)"
    ) or "handshake failure" in str(info.value)
    assert server.client_subjects == []


async def test_mtls_without_client_certificate_tls13(echo: StartEcho, certs: CertFiles) -> None:
    # TLS 1.3 (RFC 8446 §4.4.2): the client's handshake is complete before the server has looked at its
    # certificate; the rejection (alert certificate_required) arrives with the first read. open_stream
    # reports it as step "tls" only if the alert is already there when the handshake completes.
    server = await echo(server_context(certs, mtls=True))
    dest = Destination("127.0.0.1", server.port, client_material(certs, client_cert=False))
    try:
        reader, writer = await open_stream(dest)
    except TransportError as exc:
        opened: TransportError | None = exc
    else:
        opened = None
    if opened is not None:
        assert opened.step == "tls"
        assert "certificate required" in str(opened) or "during the handshake" in str(opened)
        return
    writer.write(b"ping")
    answer: bytes | BaseException
    try:
        answer = await asyncio.wait_for(reader.read(10), 5)
    except (ssl.SSLError, ConnectionError) as exc:
        answer = exc
    writer.close()
    if isinstance(answer, ssl.SSLError):  # a server that sends the alert (OpenSSL's s_server, fluentd)
        assert "certificate required" in str(answer)
    elif isinstance(answer, bytes):  # asyncio's server drops the connection without an alert: EOF
        assert answer == b"", "the server must not have echoed anything"
    assert server.client_subjects == []


async def test_receiver_that_speaks_first_is_not_lost(echo: StartEcho, certs: CertFiles) -> None:
    # A Forward receiver with a shared key sends HELO right after the TLS handshake; those bytes may come
    # in the same read as the end of the handshake and must reach the returned StreamReader.
    server = await echo(server_context(certs), greeting=b"HELO")
    for _ in range(5):
        reader, writer = await open_stream(Destination("127.0.0.1", server.port, client_material(certs)))
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"HELO"
        await roundtrip(reader, writer, b"after")
        await close(writer)


async def test_connection_refused(echo: StartEcho) -> None:
    port = free_port()
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("127.0.0.1", port))
    assert info.value.step == "connect"
    assert str(info.value) == f"cannot connect to receiver 127.0.0.1:{port}: connection refused"
    assert isinstance(info.value, OSError)


async def test_tls_handshake_timeout_names_the_step(certs: CertFiles) -> None:
    accepted = asyncio.Event()
    finished = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # never answers the ClientHello; returns once the client has given up
        writer.close()
        await writer.wait_closed()
        finished.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        dest = Destination("127.0.0.1", port, client_material(certs))
        started = time.monotonic()
        with pytest.raises(TransportError) as info:
            await open_stream(dest, timeout=0.3)
        assert time.monotonic() - started < 3
        assert info.value.step == "tls"
        assert str(info.value) == (f"timeout at step tls after 0.3 s: TLS handshake with receiver 127.0.0.1:{port}")
        assert accepted.is_set()
        await asyncio.wait_for(finished.wait(), 5)  # open_stream closed its socket on the timeout
    finally:
        server.close()
        await server.wait_closed()


async def test_reloaded_client_certificate_is_used_by_the_next_connection(
    echo: StartEcho, certs: CertFiles, tmp_path: Path
) -> None:
    server = await echo(server_context(certs, mtls=True))
    vol = SecretVolume(tmp_path / "secret")
    vol.write(leaf_files(certs.authority, "client-one"))
    files = TLSFiles(ca_file=vol.path("ca.crt"), cert_file=vol.path("tls.crt"), key_file=vol.path("tls.key"))
    material = TLSMaterial(files, purpose="client", check_interval=0)
    material.load()
    dest = Destination("127.0.0.1", server.port, material)

    reader, writer = await open_stream(dest)
    await roundtrip(reader, writer, b"one")
    vol.write(leaf_files(certs.authority, "client-two"))
    reader2, writer2 = await open_stream(dest)
    await roundtrip(reader2, writer2, b"two")
    await roundtrip(reader, writer, b"the first connection is left alone")
    await close(writer)
    await close(writer2)
    assert server.client_subjects == ["client-one", "client-two"]
    assert material.generation == 2


# -- real proxies: tinyproxy and socat -------------------------------------------------------------------


# Proxy processes (tinyproxy, socat fronts) come from tests/proxies.py via the `proxies` fixture.


def proxy_material(certs: CertFiles, *, client_cert: bool = True) -> TLSMaterial:
    return client_material(certs, client_cert=client_cert, name="proxy")


@pytest.mark.proxy
async def test_tinyproxy_tls_inside_the_tunnel(echo: StartEcho, certs: CertFiles, proxies: Proxies) -> None:
    server = await echo(server_context(certs, mtls=True))
    proxy = Proxy(host="127.0.0.1", port=proxies.tinyproxy([server.port]).port)
    steps = Steps()
    reader, writer = await open_stream(
        Destination("127.0.0.1", server.port, client_material(certs)), proxy, on_step=steps
    )
    await roundtrip(reader, writer, b"through tinyproxy" * 5000)
    await close(writer)
    assert steps.names == ["proxy-connect", "connect-request", "tls"]
    assert steps.detail("connect-request") == "HTTP/1.0 200 Connection established"
    assert server.client_subjects == ["audittailer-client"]


@pytest.mark.proxy
async def test_tinyproxy_plain_tcp(echo: StartEcho, proxies: Proxies) -> None:
    server = await echo()
    proxy = Proxy(host="127.0.0.1", port=proxies.tinyproxy([server.port]).port)
    reader, writer = await open_stream(Destination("127.0.0.1", server.port), proxy)
    await roundtrip(reader, writer, b"plain")
    await close(writer)


@pytest.mark.proxy
async def test_tinyproxy_refuses_a_port_not_allowed(echo: StartEcho, proxies: Proxies) -> None:
    server = await echo()
    proxy_port = proxies.tinyproxy([server.port]).port
    other = free_port()
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("127.0.0.1", other), Proxy(host="127.0.0.1", port=proxy_port))
    assert info.value.step == "connect-request"
    assert info.value.status == 403
    assert str(info.value) == (
        f"proxy 127.0.0.1:{proxy_port} answered CONNECT 127.0.0.1:{other} with 403 Access violation"
    )


@pytest.mark.proxy
async def test_tinyproxy_basic_auth(echo: StartEcho, certs: CertFiles, proxies: Proxies) -> None:
    server = await echo(server_context(certs))
    proxy_port = proxies.tinyproxy([server.port], basic_auth=("shipper", "hunter2")).port
    dest = Destination("127.0.0.1", server.port, client_material(certs))

    with pytest.raises(TransportError) as info:
        await open_stream(dest, Proxy(host="127.0.0.1", port=proxy_port))
    assert info.value.status == 407
    assert str(info.value) == (
        f"proxy 127.0.0.1:{proxy_port} answered CONNECT 127.0.0.1:{server.port} with "
        "407 Proxy Authentication Required (no credentials configured)"
    )

    wrong = Proxy(host="127.0.0.1", port=proxy_port, username="shipper", password="nope")
    with pytest.raises(TransportError) as info:
        await open_stream(dest, wrong)
    assert info.value.step == "connect-request"
    assert info.value.status in (401, 407)  # tinyproxy 1.11 answers a wrong password with 401
    assert "nope" not in str(info.value)

    right = Proxy(host="127.0.0.1", port=proxy_port, username="shipper", password="hunter2")
    assert "hunter2" not in repr(right)
    reader, writer = await open_stream(dest, right)
    await roundtrip(reader, writer, b"authenticated")
    await close(writer)


@pytest.mark.proxy
async def test_konnectivity_unix_socket(echo: StartEcho, certs: CertFiles, proxies: Proxies) -> None:
    server = await echo(server_context(certs, mtls=True))
    uds = proxies.unix_front(proxies.tinyproxy([server.port])).path
    proxy = Proxy(uds=uds)
    assert proxy.describe() == f"proxy unix:{uds}"
    steps = Steps()
    reader, writer = await open_stream(
        Destination("127.0.0.1", server.port, client_material(certs)), proxy, on_step=steps
    )
    await roundtrip(reader, writer, b"konnectivity" * 1000)
    await close(writer)
    assert steps.names == ["proxy-connect", "connect-request", "tls"]
    assert steps.detail("proxy-connect") == f"unix:{uds}"
    assert server.client_subjects == ["audittailer-client"]


async def test_missing_unix_socket(tmp_path: Path) -> None:
    uds = str(tmp_path / "absent.sock")
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("10.0.0.1", 24224), Proxy(uds=uds))
    assert info.value.step == "proxy-connect"
    assert str(info.value) == f"cannot connect to proxy unix:{uds}: no such file or directory"


@pytest.mark.proxy
async def test_reversed_vpn_tls_inside_mtls(
    echo: StartEcho, certs: CertFiles, proxy_certs: CertFiles, proxies: Proxies
) -> None:
    server = await echo(server_context(certs, mtls=True))
    vpn_port = proxies.mtls_front(proxies.tinyproxy([server.port]), proxy_certs).port
    proxy = Proxy(host="127.0.0.1", port=vpn_port, tls=proxy_material(proxy_certs))
    assert proxy.describe() == f"proxy 127.0.0.1:{vpn_port} (mTLS)"
    steps = Steps()
    reader, writer = await open_stream(
        Destination("127.0.0.1", server.port, client_material(certs)), proxy, on_step=steps
    )
    await roundtrip(reader, writer, b"tls in tls" * 20_000)
    assert tls_read_sizes(writer) == [TLS_READ_BYTES, TLS_READ_BYTES]  # the receiver's session and the proxy's
    assert steps.names == ["proxy-connect", "proxy-tls", "connect-request", "tls"]
    assert ",O=pyforward test proxy CA, expires" in steps.detail("proxy-tls")
    assert ",O=pyforward test receiver CA, expires" in steps.detail("tls")
    # The innermost session is the receiver's.
    assert "pyforward test receiver CA" in peer_certificate_chain(writer)[0].issuer
    await close(writer)
    assert server.client_subjects == ["audittailer-client"]


@pytest.mark.proxy
def test_reversed_vpn_under_uvloop(certs: CertFiles, proxy_certs: CertFiles, proxies: Proxies) -> None:
    # The `fast` extra runs pyforward on uvloop, whose transports are not asyncio's classes.
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[str]:
        server_holder: list[EchoServer] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server_holder[0].handle(reader, writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(certs, mtls=True))
        echo_server = EchoServer(server, server.sockets[0].getsockname()[1])
        server_holder.append(echo_server)
        try:
            vpn_port = proxies.mtls_front(proxies.tinyproxy([echo_server.port]), proxy_certs).port
            proxy = Proxy(host="127.0.0.1", port=vpn_port, tls=proxy_material(proxy_certs))
            steps = Steps()
            reader, writer = await open_stream(
                Destination("127.0.0.1", echo_server.port, client_material(certs)), proxy, on_step=steps
            )
            assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
            await roundtrip(reader, writer, b"uvloop tls in tls" * 10_000)
            await close(writer)
            assert echo_server.client_subjects == ["audittailer-client"]
            return steps.names
        finally:
            await echo_server.close()

    assert uvloop.run(main()) == ["proxy-connect", "proxy-tls", "connect-request", "tls"]


@pytest.mark.proxy
@pytest.mark.parametrize("client", ["wrong-ca", "none"])
async def test_reversed_vpn_rejects_our_client_certificate(
    echo: StartEcho, certs: CertFiles, proxy_certs: CertFiles, proxies: Proxies, tmp_path: Path, client: str
) -> None:
    server = await echo(server_context(certs, mtls=True))
    vpn_port = proxies.mtls_front(proxies.tinyproxy([server.port]), proxy_certs).port
    if client == "wrong-ca":
        # Trusts the proxy's CA, but the client certificate comes from another CA.
        stranger = write_certs(tmp_path / "stranger", "stranger")
        files = TLSFiles(ca_file=proxy_certs.ca, cert_file=stranger.client_cert, key_file=stranger.client_key)
        material = TLSMaterial(files, purpose="client", name="proxy")
        material.load()
    else:
        material = proxy_material(proxy_certs, client_cert=False)
    proxy = Proxy(host="127.0.0.1", port=vpn_port, tls=material)
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("127.0.0.1", server.port, client_material(certs)), proxy, timeout=5)
    assert info.value.step == "proxy-tls", str(info.value)
    message = str(info.value)
    if client == "none":
        assert f"proxy 127.0.0.1:{vpn_port} (TLS) " in message, message
        assert "certificate required" in message or "no client certificate configured" in message, message
    else:
        assert f"proxy 127.0.0.1:{vpn_port} (mTLS)" in message
        assert "unknown ca" in message or "does the peer accept our client certificate?" in message, message
    assert server.client_subjects == []


@pytest.mark.proxy
async def test_reversed_vpn_with_an_untrusted_proxy_certificate(
    echo: StartEcho, certs: CertFiles, proxy_certs: CertFiles, proxies: Proxies
) -> None:
    server = await echo(server_context(certs, mtls=True))
    vpn_port = proxies.mtls_front(proxies.tinyproxy([server.port]), proxy_certs).port
    files = TLSFiles(ca_file=certs.ca, cert_file=proxy_certs.client_cert, key_file=proxy_certs.client_key)
    material = TLSMaterial(files, purpose="client", name="proxy")  # trusts the receiver CA, not the proxy's
    material.load()
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("127.0.0.1", server.port), Proxy(host="127.0.0.1", port=vpn_port, tls=material))
    assert info.value.step == "proxy-tls"
    # socat sends its whole chain file, root included: OpenSSL then names the self-signed root.
    assert str(info.value) == (
        f"TLS to proxy 127.0.0.1:{vpn_port} (mTLS) failed (server name 127.0.0.1): "
        "certificate verify failed: self-signed certificate in certificate chain"
    )


@pytest.mark.proxy
async def test_receiver_closing_during_tls_inside_the_reversed_vpn(
    certs: CertFiles, proxy_certs: CertFiles, proxies: Proxies
) -> None:
    # A receiver (or a tunnel) that goes away during the inner handshake. CPython < 3.11.8 (gh-113214) turned
    # this into a TypeError from asyncio's SSLProtocol (transport.py backports the fix); it must be a
    # TransportError of step tls.
    got_hello = asyncio.Event()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello is on its way: the handshake has begun
        got_hello.set()
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        vpn_port = proxies.mtls_front(proxies.tinyproxy([port]), proxy_certs).port
        proxy = Proxy(host="127.0.0.1", port=vpn_port, tls=proxy_material(proxy_certs))
        for _ in range(3):
            got_hello.clear()
            with pytest.raises(TransportError) as info:
                await open_stream(Destination("127.0.0.1", port, client_material(certs)), proxy, timeout=5)
            assert info.value.step == "tls", str(info.value)
            assert str(info.value).startswith(
                f"TLS to receiver 127.0.0.1:{port} through proxy 127.0.0.1:{vpn_port} (mTLS) failed: "
            ), str(info.value)
            assert "during the handshake" in str(info.value) or "EOF" in str(info.value), str(info.value)
            assert got_hello.is_set()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.proxy
async def test_receiver_certificate_not_verified_inside_the_reversed_vpn(
    echo: StartEcho, certs: CertFiles, proxy_certs: CertFiles, proxies: Proxies, tmp_path: Path
) -> None:
    # The inner handshake's own error must come through (gh-113214 replaced it with "connection closed").
    server = await echo(server_context(certs, mtls=True))
    vpn_port = proxies.mtls_front(proxies.tinyproxy([server.port]), proxy_certs).port
    proxy = Proxy(host="127.0.0.1", port=vpn_port, tls=proxy_material(proxy_certs))
    stranger = write_certs(tmp_path / "stranger", "stranger")
    trusting_another_ca = TLSMaterial(
        TLSFiles(ca_file=stranger.ca, cert_file=certs.client_cert, key_file=certs.client_key), purpose="client"
    )
    trusting_another_ca.load()
    for material, server_name, reason in (
        (trusting_another_ca, None, "self-signed certificate in certificate chain"),
        (client_material(certs), "audittailer", "Hostname mismatch, certificate is not valid for 'audittailer'."),
    ):
        with pytest.raises(TransportError) as info:
            await open_stream(Destination("127.0.0.1", server.port, material, server_name=server_name), proxy)
        assert info.value.step == "tls"
        assert str(info.value) == (
            f"TLS to receiver 127.0.0.1:{server.port} through proxy 127.0.0.1:{vpn_port} (mTLS) failed "
            f"(server name {server_name or '127.0.0.1'}): certificate verify failed: {reason}"
        )


# -- misbehaving proxies (asyncio fakes) -----------------------------------------------------------------


@dataclass
class FakeProxy:
    port: int
    heads: list[bytes]
    release: asyncio.Event


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event], Awaitable[None]]


@pytest.fixture
async def fake_proxy() -> AsyncIterator[Callable[[Answer], Awaitable[FakeProxy]]]:
    servers: list[asyncio.Server] = []
    release = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def start(answer: Answer) -> FakeProxy:
        heads: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                await answer(reader, writer, release)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return FakeProxy(server.sockets[0].getsockname()[1], heads, release)

    yield start
    release.set()
    for server in servers:
        server.close()
        await server.wait_closed()
    if tasks:
        await asyncio.wait(tasks, timeout=5)


async def test_proxy_sending_bytes_after_its_answer(
    fake_proxy: Callable[[Answer], Awaitable[FakeProxy]], certs: CertFiles
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nHELLO")
        await writer.drain()
        await release.wait()

    proxy = await fake_proxy(answer)
    dest = Destination("10.0.0.1", 24224, client_material(certs))
    with pytest.raises(TransportError) as info:
        await open_stream(dest, Proxy(host="127.0.0.1", port=proxy.port))
    assert info.value.step == "connect-request"
    assert str(info.value) == (
        f"proxy 127.0.0.1:{proxy.port} sent 5 bytes after its 200 OK answer to CONNECT 10.0.0.1:24224 "
        "before the TLS handshake"
    )


async def test_plain_receiver_speaking_first_through_a_proxy(
    fake_proxy: Callable[[Answer], Awaitable[FakeProxy]],
) -> None:
    # Without TLS a Forward receiver with a shared key sends HELO at once; through a proxy it can arrive
    # in the same segment as the 200. It belongs to the stream, not to an error.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nHELO")
        await writer.drain()
        await release.wait()

    proxy = await fake_proxy(answer)
    reader, writer = await open_stream(Destination("10.0.0.1", 24224), Proxy(host="127.0.0.1", port=proxy.port))
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"HELO"
    await close(writer)


async def test_proxy_closing_before_answering(fake_proxy: Callable[[Answer], Awaitable[FakeProxy]]) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
        writer.close()

    proxy = await fake_proxy(answer)
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("10.0.0.1", 24224), Proxy(host="127.0.0.1", port=proxy.port))
    assert info.value.step == "connect-request"
    assert str(info.value) == (
        f"proxy 127.0.0.1:{proxy.port} closed the connection before answering CONNECT 10.0.0.1:24224"
    )


async def test_proxy_never_answering_times_out(fake_proxy: Callable[[Answer], Awaitable[FakeProxy]]) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
        await release.wait()

    proxy = await fake_proxy(answer)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("10.0.0.1", 24224), Proxy(host="127.0.0.1", port=proxy.port), timeout=0.3)
    assert time.monotonic() - started < 3
    assert info.value.step == "connect-request"
    assert str(info.value) == (
        f"timeout at step connect-request after 0.3 s: proxy 127.0.0.1:{proxy.port} "
        "did not answer CONNECT 10.0.0.1:24224"
    )


@pytest.mark.parametrize(
    ("answer_bytes", "expected"),
    [
        (
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
            "sent a malformed answer to CONNECT 10.0.0.1:24224: 'SSH-2.0-OpenSSH_9.2'",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * MAX_RESPONSE_HEAD + b"\r\n",
            "sent an answer head over 16384 bytes to CONNECT 10.0.0.1:24224",
        ),
        (
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
            "answered CONNECT 10.0.0.1:24224 with 502 Bad Gateway",
        ),
    ],
    ids=["not-http", "head-too-large", "bad-gateway"],
)
async def test_proxy_bad_answers(
    fake_proxy: Callable[[Answer], Awaitable[FakeProxy]], answer_bytes: bytes, expected: str
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
        writer.write(answer_bytes)
        await writer.drain()
        await release.wait()

    proxy = await fake_proxy(answer)
    with pytest.raises(TransportError) as info:
        await open_stream(Destination("10.0.0.1", 24224), Proxy(host="127.0.0.1", port=proxy.port))
    assert info.value.step == "connect-request"
    assert str(info.value) == f"proxy 127.0.0.1:{proxy.port} {expected}"


async def test_connect_request_ipv6_auth_and_a_trickled_answer(
    fake_proxy: Callable[[Answer], Awaitable[FakeProxy]],
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, release: asyncio.Event) -> None:
        for byte in b"HTTP/1.1 200 Connection established\r\n\r\n":  # one byte per segment
            writer.write(bytes([byte]))
            await writer.drain()
        while data := await reader.read(65536):  # then a tunnel that echoes
            writer.write(data)
            await writer.drain()

    proxy = await fake_proxy(answer)
    steps = Steps()
    reader, writer = await open_stream(
        Destination("fd00::1", 24224),
        Proxy(host="127.0.0.1", port=proxy.port, username="audit", password="p@ss:word"),
        on_step=steps,
    )
    await roundtrip(reader, writer, b"through the fake")
    await close(writer)
    token = base64.b64encode(b"audit:p@ss:word").decode()
    assert proxy.heads == [
        (
            f"CONNECT [fd00::1]:24224 HTTP/1.1\r\nHost: [fd00::1]:24224\r\nProxy-Authorization: Basic {token}\r\n\r\n"
        ).encode()
    ]
    assert steps.names == ["proxy-connect", "connect-request"]
    assert steps.detail("connect-request") == "HTTP/1.1 200 Connection established"


# -- configuration objects -------------------------------------------------------------------------------


def test_proxy_and_destination_validation(certs: CertFiles) -> None:
    server_side = server_material(certs)
    with pytest.raises(ValueError, match="exactly one of"):
        Proxy()
    with pytest.raises(ValueError, match="exactly one of"):
        Proxy(uds="/x.sock", host="h", port=1)
    with pytest.raises(ValueError, match="needs a port"):
        Proxy(host="vpn-seed-server")
    with pytest.raises(ValueError, match="needs a server_name"):
        Proxy(uds="/x.sock", tls=client_material(certs))
    with pytest.raises(ValueError, match="server context"):
        Proxy(host="h", port=1, tls=server_side)
    with pytest.raises(ValueError, match="server context"):
        Destination("h", 1, tls=server_side)
    with pytest.raises(ValueError, match="not a valid host"):
        Destination("10.0.0.1:24224\r\nX-Evil: 1", 24224)
    with pytest.raises(ValueError, match="out of range"):
        Destination("h", 0)
    with pytest.raises(ValueError, match="needs a username"):
        Proxy(host="h", port=1, password="secret")

    vpn = Proxy(host="vpn-seed-server", port=9443, tls=proxy_material(certs), username="u", password="secret")
    assert vpn.describe() == "proxy vpn-seed-server:9443 (mTLS)"
    assert "secret" not in repr(vpn)
    tls_only = Proxy(host="::1", port=9443, tls=proxy_material(certs, client_cert=False))
    assert tls_only.describe() == "proxy [::1]:9443 (TLS)"
    assert Destination("::1", 24224).address == "[::1]:24224"
    assert Destination("10.0.0.1", 24224, server_name="audittailer").tls_server_name() == "audittailer"
