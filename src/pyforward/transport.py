"""Open a byte stream to the receiver: direct TCP/TLS or through an HTTP CONNECT proxy.

Production shape (see the audit-forwarder reference): the receiver is a ClusterIP inside the cluster and
the shipper is outside, so bytes go through an HTTP CONNECT proxy reached either over a Unix socket
(konnectivity) or over mTLS (Gardener reversed VPN, ``vpn-seed-server:9443``). The receiver's own TLS
session runs *inside* the tunnel: TLS inside TLS, which asyncio supports from Python 3.11 (bpo-37179).

The proxy handshake is done with a small protocol of our own instead of a StreamReader, so that every
byte the proxy sends is accounted for: a StreamReader would keep bytes that follow the answer head in
its buffer, where they would later be mistaken for the receiver's data (or for its TLS records).

Each step is reported to ``on_step`` (the doctor, ``pyforward check``, prints them) and each failure is
a :class:`TransportError` naming the step, the endpoint and the reason, in one line.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import os
import re
import socket
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509

from pyforward.certs import CertError, CertInfo, TLSMaterial, cert_info

__all__ = [
    "MAX_RESPONSE_HEAD",
    "Destination",
    "Proxy",
    "Step",
    "TransportError",
    "open_stream",
    "peer_certificate_chain",
]

Step = Literal["proxy-connect", "proxy-tls", "connect-request", "tls", "connect"]
OnStep = Callable[[str, float, str], None]

# Bound on the proxy's answer head. konnectivity and tinyproxy send well under 200 bytes.
MAX_RESPONSE_HEAD = 16 * 1024
# StreamReader limit of the returned stream (asyncio's default), only relevant for readline/readuntil.
STREAM_LIMIT = 2**16

_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) +(\d{3})(?: +([^\r\n]*))?")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class TransportError(OSError):
    """Opening the stream failed at ``step``; the message is one line naming the endpoint and the reason."""

    def __init__(self, step: Step, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.step: Step = step
        self.message = message
        # The proxy's HTTP status when it answered CONNECT with something other than 200.
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_transport_error, (self.step, self.message, self.status))


def _rebuild_transport_error(step: Step, message: str, status: int | None) -> TransportError:
    return TransportError(step, message, status=status)


def _host_port(host: str, port: int) -> str:
    """``host:port`` with an IPv6 literal in brackets, as RFC 9110 §9.3.6 (authority-form) wants."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _check_host(what: str, host: str) -> None:
    # The host goes into the CONNECT request line: refuse anything that could split or extend it.
    if not host or any(c in host for c in " \t\r\n/"):
        raise ValueError(f"{what} host {host!r} is not a valid host name or address")


def _check_port(what: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{what} port {port} is out of range 1-65535")


@dataclass(frozen=True)
class Destination:
    """The receiver. ``server_name`` overrides SNI and the name checked in its certificate (tls.vhost)."""

    host: str
    port: int
    tls: TLSMaterial | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        _check_host("receiver", self.host)
        _check_port("receiver", self.port)
        if self.tls is not None and self.tls.purpose != "client":
            raise ValueError(f"receiver TLS material {self.tls.name!r} is a server context, not a client one")

    @property
    def address(self) -> str:
        return _host_port(self.host, self.port)

    def tls_server_name(self) -> str:
        """Server name for SNI and the certificate check: explicit, else the TLS files', else the host."""
        if self.server_name:
            return self.server_name
        if self.tls is not None and self.tls.server_name:
            return self.tls.server_name
        return self.host.strip("[]")

    def describe(self) -> str:
        return f"receiver {self.address}"


@dataclass(frozen=True)
class Proxy:
    """An HTTP CONNECT proxy on a Unix socket (``uds``) or at ``host:port``, optionally over (m)TLS."""

    uds: str | None = None
    host: str | None = None
    port: int | None = None
    tls: TLSMaterial | None = None
    server_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.uds is None) == (self.host is None):
            raise ValueError("a proxy needs exactly one of a Unix socket path (uds) or a host")
        if self.host is not None:
            _check_host("proxy", self.host)
            if self.port is None:
                raise ValueError(f"proxy {self.host} needs a port")
            _check_port("proxy", self.port)
        if self.tls is not None:
            if self.tls.purpose != "client":
                raise ValueError(f"proxy TLS material {self.tls.name!r} is a server context, not a client one")
            if self.uds is not None and not (self.server_name or self.tls.server_name):
                raise ValueError(f"TLS to proxy unix:{self.uds} needs a server_name to verify")
        if self.password is not None and self.username is None:
            raise ValueError("a proxy password needs a username")
        if self.username is not None and ":" in self.username:
            raise ValueError("a proxy username cannot contain ':' (HTTP Basic authentication, RFC 7617)")

    def describe(self) -> str:
        """``proxy unix:/run/konnectivity.sock`` or ``proxy vpn-seed-server:9443 (mTLS)``."""
        where = f"unix:{self.uds}" if self.uds is not None else self.address
        if self.tls is not None:
            where += " (mTLS)" if self.tls.has_client_certificate else " (TLS)"
        return f"proxy {where}"

    @property
    def address(self) -> str:
        """``host:port`` (empty for a Unix socket proxy)."""
        return _host_port(self.host, self.port or 0) if self.host is not None else ""

    def tls_server_name(self) -> str:
        if self.server_name:
            return self.server_name
        if self.tls is not None and self.tls.server_name:
            return self.tls.server_name
        assert self.host is not None  # checked in __post_init__ for uds
        return self.host.strip("[]")

    def connect_request(self, target: str) -> bytes:
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode("ascii")
            lines.append(f"Proxy-Authorization: Basic {token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


# -- TLS inside TLS on older CPython ----------------------------------------------------------------------


def _backport_gh_113214() -> None:
    """CPython's fix for gh-113214 (in 3.11.8 and 3.12.2), for the versions before it.

    With TLS inside TLS (the receiver's session inside the reversed VPN's), any failure of the inner handshake
    -- a certificate that does not verify, a peer that hangs up -- made asyncio's SSLProtocol call
    ``_abort(exc)`` on the outer one, whose ``_abort()`` took no argument: a TypeError replaced the real error
    (start_tls() then failed with "connection closed" or the TypeError, and asyncio logged a traceback).
    The fix lets ``_abort`` take the exception and close the transport below with it.
    """
    from asyncio import sslproto

    original = sslproto.SSLProtocol._abort
    if len(inspect.signature(original).parameters) > 1:
        return  # a fixed CPython

    def _abort(self: Any, exc: BaseException | None = None) -> None:
        self._set_state(sslproto.SSLProtocolState.UNWRAPPED)
        transport: Any = self._transport
        if transport is not None:
            force_close = getattr(transport, "_force_close", None)
            if force_close is not None:
                force_close(exc)
            else:
                transport.abort()

    sslproto.SSLProtocol._abort = _abort  # type: ignore[method-assign]


_backport_gh_113214()


# -- peer certificates ---------------------------------------------------------------------------------


def _chain_ders(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    # What the peer sent. Public API from Python 3.13 (SSLObject.get_unverified_chain, returning DER);
    # before that the same method exists on the private _ssl object and returns _ssl.Certificate.
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    ders: list[bytes] = []
    if getter is not None:
        try:
            chain = getter() or []
        except (ssl.SSLError, ValueError):  # pragma: no cover - no chain on this object
            chain = []
        for item in chain:
            if isinstance(item, bytes):
                ders.append(item)
            else:
                ders.append(item.public_bytes(ssl.ENCODING_DER if hasattr(ssl, "ENCODING_DER") else 2))
    if not ders:
        leaf = ssl_object.getpeercert(binary_form=True)
        if leaf:
            ders.append(leaf)
    return ders


def _chain_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> list[CertInfo]:
    if ssl_object is None:
        return []
    infos = []
    for index, der in enumerate(_chain_ders(ssl_object)):
        try:
            infos.append(cert_info(x509.load_der_x509_certificate(der), f"peer[{index}]"))
        except ValueError:  # pragma: no cover - OpenSSL accepted it, so cryptography should too
            continue
    return infos


def peer_certificate_chain(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> list[CertInfo]:
    """The certificate chain the TLS peer presented (leaf first); empty on a stream without TLS.

    With TLS inside a proxy's TLS, this is the receiver's chain (the innermost session).
    """
    return _chain_of(writer.get_extra_info("ssl_object"))


def _tls_summary(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    if ssl_object is None:  # pragma: no cover - only called after a handshake
        return "no TLS"
    cipher = ssl_object.cipher()
    head = f"{ssl_object.version()} {cipher[0] if cipher else '?'}"
    chain = _chain_of(ssl_object)
    if not chain:
        return f"{head}; peer sent no certificate"
    return f"{head}; peer chain: " + "; ".join(info.describe() for info in chain)


# -- error text ----------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """A short reason without OpenSSL's source locations."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        text = re.sub(r"^\[[A-Z_]+: [A-Z0-9_]+\] ", "", text)
        return re.sub(r" \(_ssl\.c:\d+\)$", "", text)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the name: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        # asyncio's own text is "Connect call failed ('10.0.0.1', 24224)"; the errno says why.
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    if isinstance(exc, ConnectionResetError):
        return "connection closed by the peer"
    return str(exc) or type(exc).__name__


# -- the handshake ---------------------------------------------------------------------------------------


class _TunnelProtocol(asyncio.Protocol):
    """Collects every byte until the stream is handed to a StreamReaderProtocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.exc = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Wait for more data, EOF or loss of the connection."""
        if self.eof or self.closed:
            return
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class _Opener:
    def __init__(self, dest: Destination, proxy: Proxy | None, on_step: OnStep | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.dest = dest
        self.proxy = proxy
        self.on_step = on_step
        self.protocol = _TunnelProtocol(self.loop)
        # Typed as asyncio.Transport, but checked by duck typing only: uvloop's transports (and its TLS
        # transport) do not derive from asyncio's classes.
        self.transports: list[asyncio.Transport] = []
        self.step: Step = "proxy-connect" if proxy is not None else "connect"
        self._t0 = self.loop.time()

    @property
    def transport(self) -> asyncio.Transport:
        return self.transports[-1]

    def _begin(self, step: Step) -> None:
        self.step = step
        self._t0 = self.loop.time()

    def _done(self, detail: str) -> None:
        if self.on_step is not None:
            self.on_step(self.step, self.loop.time() - self._t0, detail)

    def _dest_text(self) -> str:
        via = f" through {self.proxy.describe()}" if self.proxy is not None else ""
        return f"{self.dest.describe()}{via}"

    def waiting_for(self) -> str:
        """What the current step was waiting for, for the timeout message."""
        proxy = self.proxy.describe() if self.proxy is not None else "proxy"
        return {
            "connect": f"connecting to {self.dest.describe()}",
            "proxy-connect": f"connecting to {proxy}",
            "proxy-tls": f"TLS handshake with {proxy}",
            "connect-request": f"{proxy} did not answer CONNECT {self.dest.address}",
            "tls": f"TLS handshake with {self._dest_text()}",
        }[self.step]

    def abort(self) -> None:
        for transport in reversed(self.transports):
            transport.abort()

    async def run(self) -> None:
        if self.proxy is None:
            await self._connect()
        else:
            await self._proxy_connect(self.proxy)
            if self.proxy.tls is not None:
                await self._proxy_tls(self.proxy, self.proxy.tls)
            await self._connect_request(self.proxy)
        if self.dest.tls is not None:
            await self._tls(self.dest.tls)
        if self.protocol.closed or self.protocol.eof:
            exc = self.protocol.exc
            reason = f": {_reason(exc)}" if exc is not None else ""
            raise TransportError(self.step, f"{self._dest_text()} closed the connection at once{reason}")

    async def _connect(self) -> None:
        self._begin("connect")
        try:
            transport, _ = await self.loop.create_connection(lambda: self.protocol, self.dest.host, self.dest.port)
        except OSError as exc:
            raise TransportError("connect", f"cannot connect to {self.dest.describe()}: {_reason(exc)}") from None
        self.transports.append(transport)
        self._done(f"{self.dest.address} from {_sockname(transport)}")

    async def _proxy_connect(self, proxy: Proxy) -> None:
        self._begin("proxy-connect")
        try:
            if proxy.uds is not None:
                transport, _ = await self.loop.create_unix_connection(lambda: self.protocol, proxy.uds)
            else:
                host, port = str(proxy.host), int(proxy.port or 0)
                transport, _ = await self.loop.create_connection(lambda: self.protocol, host, port)
        except OSError as exc:
            raise TransportError("proxy-connect", f"cannot connect to {proxy.describe()}: {_reason(exc)}") from None
        self.transports.append(transport)
        self._done(proxy.describe().removeprefix("proxy "))

    async def _start_tls(self, material: TLSMaterial, server_name: str, step: Step, what: str) -> None:
        try:
            context = material.context()
        except CertError as exc:
            raise TransportError(step, f"TLS to {what}: {exc}") from exc
        try:
            transport = await self.loop.start_tls(self.transport, self.protocol, context, server_hostname=server_name)
        except (ssl.SSLError, OSError) as exc:
            named = f" (server name {server_name})" if isinstance(exc, ssl.SSLCertVerificationError) else ""
            reason = _reason(exc)
            if isinstance(exc, ConnectionError):
                # Many servers (asyncio's among them) drop the connection without a TLS alert.
                reason += f" during the handshake{_client_cert_hint(material)}"
            raise TransportError(step, f"TLS to {what} failed{named}: {reason}") from None
        if transport is None:  # pragma: no cover - only when the transport was closed meanwhile
            raise TransportError(step, f"TLS to {what} failed: connection closed during the handshake")
        _small_tls_reads(transport)
        self.transports.append(transport)
        self._done(_tls_summary(transport.get_extra_info("ssl_object")))

    async def _proxy_tls(self, proxy: Proxy, material: TLSMaterial) -> None:
        self._begin("proxy-tls")
        await self._start_tls(material, proxy.tls_server_name(), "proxy-tls", proxy.describe())

    async def _tls(self, material: TLSMaterial) -> None:
        self._begin("tls")
        await self._start_tls(material, self.dest.tls_server_name(), "tls", self._dest_text())

    async def _connect_request(self, proxy: Proxy) -> None:
        self._begin("connect-request")
        target = self.dest.address
        asked = f"CONNECT {target}"
        self.transport.write(proxy.connect_request(target))
        protocol = self.protocol
        while True:
            end = _HEAD_END.search(protocol.buffer)
            if end is not None:
                head = bytes(protocol.buffer[: end.start()])
                extra = len(protocol.buffer) - end.end()
                del protocol.buffer[: end.end()]
                break
            if len(protocol.buffer) > MAX_RESPONSE_HEAD:
                raise TransportError(
                    "connect-request",
                    f"{proxy.describe()} sent an answer head over {MAX_RESPONSE_HEAD} bytes to {asked}",
                )
            if protocol.closed or protocol.eof:
                exc = protocol.exc
                if proxy.tls is not None and not protocol.buffer:
                    # TLS 1.3: the proxy checks our client certificate only after our side of the
                    # handshake has completed (RFC 8446 §4.4.2), so its rejection arrives now: as an
                    # alert, or (when its close races our CONNECT bytes) as a reset or a bare close.
                    if isinstance(exc, ssl.SSLError):
                        raise TransportError(
                            "proxy-tls", f"{proxy.describe()} rejected the TLS session: {_reason(exc)}"
                        )
                    reason = _reason(exc) if exc is not None else "closed"
                    raise TransportError(
                        "proxy-tls",
                        f"{proxy.describe()} ended the TLS session before answering {asked}: {reason}"
                        f"{_client_cert_hint(proxy.tls, accepted=True)}",
                    )
                got = f" (after {len(protocol.buffer)} bytes of a head)" if protocol.buffer else ""
                reason = f": {_reason(exc)}" if exc is not None else ""
                raise TransportError(
                    "connect-request", f"{proxy.describe()} closed the connection before answering {asked}{got}{reason}"
                )
            await protocol.wait()

        first_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        match = _STATUS_LINE.fullmatch(first_line)
        if match is None:
            shown = first_line[:80].decode("latin-1")
            raise TransportError("connect-request", f"{proxy.describe()} sent a malformed answer to {asked}: {shown!r}")
        status = int(match.group(3))
        reason_phrase = (match.group(4) or b"").decode("latin-1").strip()
        status_text = f"{status} {reason_phrase}".strip()
        if status != 200:
            hint = ""
            if status == 407:
                hint = " (no credentials configured)" if proxy.username is None else " (credentials rejected)"
            raise TransportError(
                "connect-request", f"{proxy.describe()} answered {asked} with {status_text}{hint}", status=status
            )
        if extra and self.dest.tls is not None:
            # A TLS server speaks only after our ClientHello: these bytes are the proxy's, and would
            # otherwise surface as plaintext "from the receiver" after the handshake.
            # Without TLS they are left in the stream: a Forward receiver with a shared key sends its
            # HELO as soon as the connection is up (Forward protocol v1, "Handshake Messages").
            raise TransportError(
                "connect-request",
                f"{proxy.describe()} sent {extra} bytes after its {status_text} answer to {asked} "
                "before the TLS handshake",
                status=status,
            )
        self._done(first_line.decode("latin-1"))

    def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Hand the connection over to asyncio streams, with anything already received."""
        transport = self.transport
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.protocol.buffer:
            # With TLS the receiver may send its first records in the same flight as the handshake end.
            reader.feed_data(bytes(self.protocol.buffer))
            self.protocol.buffer.clear()
        writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
        _SOCKET_TRANSPORTS[writer] = self.transports[0]
        return reader, writer


#: The transport on the socket itself, under any TLS layers (pausing a TLS transport's reading stops only the delivery
#: to its protocol; the socket would still wake the loop).
_SOCKET_TRANSPORTS: weakref.WeakKeyDictionary[asyncio.StreamWriter, asyncio.Transport] = weakref.WeakKeyDictionary()


#: Plaintext asked of OpenSSL per read on a TLS connection: one record's worth (RFC 8446 §5.1: at most 2^14 bytes),
#: which is all SSL_read returns at a time anyway.
TLS_READ_BYTES = 1 << 14


def _small_tls_reads(transport: asyncio.BaseTransport) -> None:
    """Have asyncio's TLS layer read a record at a time into a small buffer instead of 256 KiB.

    asyncio's SSLProtocol (3.11+) reads with ``SSLObject.read(max_size)``, max_size 256 KiB: every read allocates 256
    KiB, which glibc serves with mmap (above the mmap threshold that pyforward/memory.py pins at 128 KiB) and gives
    back with mremap + munmap, each a TLB shootdown on the other CPU. That was per ack record: ~11 a second at steady
    rates, and the largest part of reading the held acks (issue 11). SSL_read returns at most one record, so the
    reads and what they return are the same; only the allocation changes. The attribute is private: where it is not
    there (another asyncio), nothing is changed.
    """
    protocol = getattr(transport, "_ssl_protocol", None)
    if protocol is not None and isinstance(getattr(protocol, "max_size", None), int):
        protocol.max_size = TLS_READ_BYTES


def socket_transport(writer: asyncio.StreamWriter) -> asyncio.Transport | None:
    """The socket's own transport under `writer` (opened by :func:`open_stream`), or None."""
    return _SOCKET_TRANSPORTS.get(writer)


def _client_cert_hint(material: TLSMaterial, *, accepted: bool = False) -> str:
    if not material.has_client_certificate:
        return " (no client certificate configured; the peer may require one)"
    if accepted:
        return " (does the peer accept our client certificate?)"
    return ""


def _sockname(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("sockname")
    if isinstance(name, tuple) and len(name) >= 2:
        return _host_port(str(name[0]), int(name[1]))
    return str(name)


async def open_stream(
    dest: Destination,
    proxy: Proxy | None = None,
    *,
    timeout: float = 10.0,
    on_step: OnStep | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``dest`` (directly or through ``proxy``) and return asyncio streams.

    Steps, each reported to ``on_step(step, seconds, detail)`` once it has succeeded:
    direct: ``connect`` [``tls``]; proxied: ``proxy-connect`` [``proxy-tls``] ``connect-request`` [``tls``].
    The whole open is bounded by ``timeout``. Raises :class:`TransportError`.
    """
    opener = _Opener(dest, proxy, on_step)
    try:
        async with asyncio.timeout(timeout):
            await opener.run()
    except TimeoutError:
        # Every step turns OSError (TimeoutError included) into TransportError: this is our deadline.
        opener.abort()
        raise TransportError(
            opener.step, f"timeout at step {opener.step} after {timeout:g} s: {opener.waiting_for()}"
        ) from None
    except BaseException:
        opener.abort()
        raise
    return opener.streams()
