"""The shared-key handshake (HELO -> PING -> PONG) and acks: make, encode, verify. Every field is raw bytes.

Part of the Forward protocol's sans-IO core (see the package's doc).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pyforward.protocol._types import HandshakeError
from pyforward.protocol._writers import _bin_header, _raw_str


@dataclass(frozen=True, slots=True)
class Helo:
    nonce: bytes
    auth: bytes
    keepalive: bool = True


@dataclass(frozen=True, slots=True)
class Ping:
    hostname: bytes
    salt: bytes
    shared_key_digest: bytes
    username: bytes
    password_digest: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    auth_ok: bool
    reason: str
    hostname: bytes
    shared_key_digest: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    chunk_id: bytes  # raw bytes as received: compare byte-exactly


def _hexdigest(*parts: bytes) -> bytes:
    h = hashlib.sha512()
    for part in parts:
        h.update(part)
    return h.hexdigest().encode("ascii")


def _utf8(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def make_helo(*, user_auth: bool, keepalive: bool = True) -> Helo:
    """A receiver's HELO: 16 random nonce bytes, and 16 random auth-salt bytes when users are configured."""
    return Helo(nonce=os.urandom(16), auth=os.urandom(16) if user_auth else b"", keepalive=keepalive)


def encode_helo(helo: Helo) -> bytes:
    """``["HELO", {"nonce": bin, "auth": bin, "keepalive": bool}]`` (fluentd's shape: random bytes as bin)."""
    return b"".join(
        (
            b"\x92\xa4HELO\x83\xa5nonce",
            _bin_header(len(helo.nonce)),
            helo.nonce,
            b"\xa4auth",
            _bin_header(len(helo.auth)),
            helo.auth,
            b"\xa9keepalive",
            b"\xc3" if helo.keepalive else b"\xc2",
        )
    )


def make_ping(
    helo: Helo,
    *,
    hostname: str,
    shared_key: str,
    username: str = "",
    password: str = "",
    salt: bytes | None = None,
) -> Ping:
    """The client's PING for this HELO.

    The salt defaults to 32 hex characters (fluentd's choice): ASCII, so C receivers that strlen() it agree.
    When the HELO carries an auth salt the user digest is always sent, even without credentials: fluentd's
    in_forward sends a non-empty auth whenever security is on and its own out_forward then sends
    ``sha512(auth + "" + "")`` with an empty username (out_forward/handshake_protocol.rb generate_ping).
    """
    salt_bytes = os.urandom(16).hex().encode("ascii") if salt is None else salt
    host = hostname.encode("utf-8")
    digest = _hexdigest(salt_bytes, host, helo.nonce, shared_key.encode("utf-8"))
    if helo.auth:
        user = username.encode("utf-8")
        password_digest = _hexdigest(helo.auth, user, password.encode("utf-8"))
    else:
        user = b""
        password_digest = b""
    return Ping(
        hostname=host,
        salt=salt_bytes,
        shared_key_digest=digest,
        username=user,
        password_digest=password_digest,
    )


def encode_ping(ping: Ping) -> bytes:
    """``["PING", hostname, salt, digest, username, password_digest]``, every field a msgpack str
    carrying the raw bytes (fluent-bit's in_forward rejects any field that is not str)."""
    return b"".join(
        (
            b"\x96\xa4PING",
            _raw_str(ping.hostname),
            _raw_str(ping.salt),
            _raw_str(ping.shared_key_digest),
            _raw_str(ping.username),
            _raw_str(ping.password_digest),
        )
    )


def verify_ping(ping: Ping, *, nonce: bytes, shared_key: str, auth: bytes, users: Mapping[str, str]) -> str | None:
    """Check a client's PING against our HELO. Returns None when accepted, else the reason for the PONG.

    User authentication applies only when `users` is non-empty (fluentd: `user_auth`).
    """
    expected = _hexdigest(ping.salt, ping.hostname, nonce, shared_key.encode("utf-8"))
    if not hmac.compare_digest(expected, ping.shared_key_digest):
        return "shared_key mismatch"
    if users:
        try:
            username = ping.username.decode("utf-8")
        except UnicodeDecodeError:
            return "username/password mismatch"
        password = users.get(username)
        if password is None:
            # Still hash something so an unknown user costs the same as a wrong password.
            hmac.compare_digest(_hexdigest(auth, ping.username, b""), ping.password_digest)
            return "username/password mismatch"
        user_digest = _hexdigest(auth, ping.username, password.encode("utf-8"))
        if not hmac.compare_digest(user_digest, ping.password_digest):
            return "username/password mismatch"
    return None


def make_pong(ping: Ping, *, ok: bool, reason: str, nonce: bytes, hostname: str, shared_key: str) -> Pong:
    """A receiver's PONG. On refusal, hostname and digest are empty (fluentd and fluent-bit do the same)."""
    if not ok:
        return Pong(auth_ok=False, reason=reason, hostname=b"", shared_key_digest=b"")
    host = hostname.encode("utf-8")
    digest = _hexdigest(ping.salt, host, nonce, shared_key.encode("utf-8"))
    return Pong(auth_ok=True, reason="", hostname=host, shared_key_digest=digest)


def encode_pong(pong: Pong) -> bytes:
    """``["PONG", ok, reason, hostname, digest]``, strings as msgpack str."""
    return b"".join(
        (
            b"\x95\xa4PONG",
            b"\xc3" if pong.auth_ok else b"\xc2",
            _raw_str(pong.reason.encode("utf-8", "surrogateescape")),
            _raw_str(pong.hostname),
            _raw_str(pong.shared_key_digest),
        )
    )


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def verify_pong(pong: Pong, *, salt: bytes, nonce: bytes, shared_key: str, own_hostname: str) -> None:
    """Client-side PONG check (fluentd out_forward check_pong). Raises HandshakeError with the reason."""
    if not pong.auth_ok:
        raise HandshakeError(f"receiver refused the handshake: {_printable(pong.reason) or 'no reason given'}")
    if pong.hostname == own_hostname.encode("utf-8"):
        raise HandshakeError(
            f"receiver reports our own hostname {own_hostname!r}: same hostname on both ends "
            "(configure a distinct self_hostname, or we are talking to ourselves)"
        )
    expected = _hexdigest(salt, pong.hostname, nonce, shared_key.encode("utf-8"))
    if not hmac.compare_digest(expected, pong.shared_key_digest):
        raise HandshakeError("receiver's PONG digest does not match: shared_key mismatch")


def encode_ack(chunk: bytes) -> bytes:
    """``{"ack": chunk}``, the value a msgpack str carrying exactly these bytes (fluentd echoes a str)."""
    return b"\x81\xa3ack" + _raw_str(bytes(chunk))
