"""TLS material from files on disk: validated, turned into an ``ssl.SSLContext``, reloaded when it changes.

Why this module exists (audit-forwarder requirements 6 and 7 in the reference): the Go relay restarted
fluent-bit with SIGKILL on every certificate change and never reloaded the proxy client certificate.
Here a changed file only means that the *next* connection uses a new context; the connection in use is
left alone, and a broken new file never replaces a working one.

Kubernetes mounts a Secret as ``tls.crt -> ..data/tls.crt`` with ``..data -> ..2024_01_01_00_00_00.123``
and updates it by swapping the ``..data`` symlink atomically. So change detection stats the *resolved*
path (its name changes with the swap) and uses mtime_ns, size and inode.

The ``cryptography`` package is used to inspect (subject, expiry, key belongs to certificate) because
``ssl`` reports a mismatch only as "key values mismatch" without saying which files.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = ["CertError", "CertInfo", "TLSFiles", "TLSMaterial", "cert_info"]

log = logging.getLogger("pyforward.certs")

# One stat of each file at most this often from context(): it is called for every new connection.
DEFAULT_CHECK_INTERVAL = 1.0


class CertError(Exception):
    """A certificate, key or CA file that cannot be used. The message is one line naming the file."""


@dataclass(frozen=True)
class CertInfo:
    """What an operator needs to know about one certificate."""

    path: str
    subject: str
    issuer: str
    not_after: datetime
    sans: list[str]
    not_before: datetime | None = None

    def describe(self) -> str:
        """One line: ``CN=x (issuer CN=y, expires 2025-01-01T00:00:00Z)``."""
        return f"{self.subject} (issuer {self.issuer}, expires {_iso(self.not_after)})"

    def seconds_to_expiry(self, now: datetime | None = None) -> float:
        return (self.not_after - (now or datetime.now(UTC))).total_seconds()


@dataclass(frozen=True)
class TLSFiles:
    """The files of one TLS setup, as configured. ``key_password`` is never shown by ``repr``."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    key_password: str | None = field(default=None, repr=False)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_after(cert: x509.Certificate) -> datetime:
    # not_valid_after_utc exists from cryptography 42; the naive variant is deprecated there.
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # pragma: no cover - cryptography < 42
        return cert.not_valid_after.replace(tzinfo=UTC)


def _not_before(cert: x509.Certificate) -> datetime:
    try:
        return cert.not_valid_before_utc
    except AttributeError:  # pragma: no cover - cryptography < 42
        return cert.not_valid_before.replace(tzinfo=UTC)


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    for general_name in ext.value:
        value = general_name.value
        names.append(value.rfc4514_string() if isinstance(value, x509.Name) else str(value))
    return names


def _name(name: x509.Name) -> str:
    text = name.rfc4514_string()
    return text or "<empty>"


def cert_info(cert: x509.Certificate, path: str) -> CertInfo:
    """Summarise one parsed certificate (also used for the peer's chain in ``transport``)."""
    return CertInfo(
        path=path,
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        not_after=_not_after(cert),
        sans=_sans(cert),
        not_before=_not_before(cert),
    )


def _public_key_der(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


_Fingerprint = tuple[tuple[str, str, int, int, int], ...]


@dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    certificate: CertInfo | None
    ca: list[CertInfo]
    loaded_at: datetime


class TLSMaterial:
    """Builds and caches an ``ssl.SSLContext`` from :class:`TLSFiles`; reloads it when a file changes.

    ``load()`` is the start-up path and raises :class:`CertError`. ``context()`` is the per-connection
    path: it never raises because of a changed file; a new file that does not load is logged once and the
    last good context is kept (a half-written Secret must not stop shipping).
    """

    def __init__(
        self,
        files: TLSFiles,
        *,
        purpose: Literal["client", "server"],
        require_client_cert: bool = False,
        expiry_warning: timedelta = timedelta(days=30),
        name: str = "receiver",
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        if purpose not in ("client", "server"):
            raise ValueError(f"purpose must be 'client' or 'server', not {purpose!r}")
        self.files = files
        self.purpose: Literal["client", "server"] = purpose
        self.require_client_cert = require_client_cert
        self.expiry_warning = expiry_warning
        self.name = name
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._fingerprint: _Fingerprint | None = None
        self._next_check = 0.0
        self._generation = 0

    def __repr__(self) -> str:
        return (
            f"TLSMaterial(name={self.name!r}, purpose={self.purpose!r}, files={self.files!r}, "
            f"generation={self._generation})"
        )

    # -- public API ---------------------------------------------------------------------------------

    @property
    def server_name(self) -> str | None:
        """The configured TLS server name (SNI and certificate check), if any."""
        return self.files.server_name

    @property
    def has_client_certificate(self) -> bool:
        return self.purpose == "client" and self.files.cert_file is not None

    @property
    def generation(self) -> int:
        """Number of successful loads so far (1 after ``load()``); increments on every reload."""
        return self._generation

    @property
    def certificate(self) -> CertInfo | None:
        """The leaf certificate of ``cert_file`` (the first one in the file), if configured."""
        return self._loaded.certificate if self._loaded else None

    @property
    def ca(self) -> list[CertInfo]:
        """The certificates of ``ca_file`` (empty when the system store is used)."""
        return list(self._loaded.ca) if self._loaded else []

    def seconds_to_expiry(self) -> float | None:
        """Seconds until the leaf certificate expires (negative once expired).

        Without a leaf certificate (a client that only verifies): the earliest-expiring CA certificate.
        None when nothing is loaded or only the system store is used.
        """
        loaded = self._loaded
        if loaded is None:
            return None
        if loaded.certificate is not None:
            return loaded.certificate.seconds_to_expiry()
        if loaded.ca:
            return min(info.seconds_to_expiry() for info in loaded.ca)
        return None

    def load(self) -> None:
        """Initial load. Raises :class:`CertError`: a configured but unusable certificate is fatal at start."""
        with self._lock:
            fingerprint = self._stat_files()
            self._install(self._build(fingerprint), fingerprint)

    def context(self) -> ssl.SSLContext:
        """The current context; first reloads it if a file changed (checked at most every check_interval)."""
        with self._lock:
            if self._loaded is None:
                fingerprint = self._stat_files()
                self._install(self._build(fingerprint), fingerprint)
            else:
                now = time.monotonic()
                if now >= self._next_check:
                    self._next_check = now + self.check_interval
                    self._reload_if_changed()
            assert self._loaded is not None
            return self._loaded.context

    def check_for_changes(self) -> bool:
        """Stat the files now (ignoring check_interval); reload if changed. True when a reload succeeded."""
        with self._lock:
            if self._loaded is None:
                raise RuntimeError(f"{self.name} TLS material used before load()")
            before = self._generation
            self._next_check = time.monotonic() + self.check_interval
            self._reload_if_changed()
            return self._generation != before

    # -- internals ----------------------------------------------------------------------------------

    def _configured(self) -> list[tuple[str, Path]]:
        roles: list[tuple[str, Path | None]] = [
            ("tls CA", self.files.ca_file),
            ("tls certificate", self.files.cert_file),
            ("tls key", self.files.key_file),
        ]
        return [(role, path) for role, path in roles if path is not None]

    def _stat_files(self) -> _Fingerprint:
        entries = []
        for role, path in self._configured():
            try:
                resolved = Path(path).resolve(strict=True)
                st = resolved.stat()
            except OSError as exc:
                raise CertError(self._os_error(role, path, exc)) from None
            entries.append((role, str(resolved), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(entries)

    def _reload_if_changed(self) -> None:
        try:
            fingerprint = self._stat_files()
        except CertError as exc:
            # A file vanished or became unreadable: keep the last good context, say so once per state.
            failed: _Fingerprint = (("error", str(exc), 0, 0, 0),)
            if failed != self._fingerprint:
                self._fingerprint = failed
                self._log_reload_failure(exc)
            return
        if fingerprint == self._fingerprint:
            return
        # Remember what was seen before loading: a failure is then reported once, not every second,
        # and a file that changes again while being read is seen as a change on the next check.
        self._fingerprint = fingerprint
        try:
            loaded = self._build(fingerprint)
        except CertError as exc:
            self._log_reload_failure(exc)
            return
        self._install(loaded, fingerprint)
        leaf = loaded.certificate
        log.info(
            "%s TLS material reloaded (generation %d)%s",
            self.name,
            self._generation,
            f": certificate {leaf.describe()}" if leaf else "",
        )

    def _log_reload_failure(self, exc: CertError) -> None:
        kept = self._loaded
        since = f"loaded {_iso(kept.loaded_at)}, generation {self._generation}" if kept else "none"
        template = " TLS reload failed, keeping the previous certificates (%s): %s"
        self._log(logging.ERROR, self.name, template, since, exc)

    def _log(self, level: int, subject: str, template: str, *args: object) -> None:
        """Log with ``subject`` (what the line is about, e.g. "proxy tls key /x/tls.key") inside the template.

        The rate limiter (logs.py) keys on the template: with the subject as an argument, the receiver's reload
        failure held back the proxy's (and one CA's expiry the next one's) for 30 s.
        """
        log.log(level, subject.replace("%", "%%") + template, *args)

    def _install(self, loaded: _Loaded, fingerprint: _Fingerprint) -> None:
        self._loaded = loaded
        self._fingerprint = fingerprint
        self._generation += 1
        self._next_check = time.monotonic() + self.check_interval

    def _os_error(self, role: str, path: Path, exc: OSError) -> str:
        reason = (exc.strerror or type(exc).__name__).lower()
        return f"cannot read {self.name} {role} {path}: {reason}"

    def _read(self, role: str, shown: Path, resolved: str) -> bytes:
        try:
            with open(resolved, "rb") as f:
                return f.read()
        except OSError as exc:
            raise CertError(self._os_error(role, shown, exc)) from None

    def _parse_certs(self, role: str, shown: Path, data: bytes) -> list[x509.Certificate]:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            # cryptography's message is generic ("Unable to load PEM file..." / "No PEM data found").
            detail = str(exc).splitlines()[0] if str(exc) else "unparseable"
            raise CertError(f"bad PEM in {self.name} {role} {shown}: {detail}") from None
        if not certs:  # pragma: no cover - load_pem_x509_certificates raises on empty input
            raise CertError(f"bad PEM in {self.name} {role} {shown}: no certificate found")
        return certs

    def _build(self, fingerprint: _Fingerprint) -> _Loaded:
        files = self.files
        resolved = {role: path for role, path, *_ in fingerprint}
        shown = dict(self._configured())

        if self.purpose == "server" and (files.cert_file is None or files.key_file is None):
            raise CertError(f"{self.name} TLS server needs both a certificate and a key file")
        if (files.cert_file is None) != (files.key_file is None):
            given = "certificate" if files.cert_file is not None else "key"
            raise CertError(f"{self.name} TLS {given} file given without the other (need both for mTLS)")
        if self.require_client_cert and files.ca_file is None:
            raise CertError(f"{self.name} TLS: verifying client certificates needs a CA file")

        ca_infos: list[CertInfo] = []
        ca_pem: str | None = None
        if files.ca_file is not None:
            data = self._read("tls CA", shown["tls CA"], resolved["tls CA"])
            ca_certs = self._parse_certs("tls CA", shown["tls CA"], data)
            ca_infos = [cert_info(c, str(files.ca_file)) for c in ca_certs]
            ca_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in ca_certs)

        leaf_info: CertInfo | None = None
        if files.cert_file is not None and files.key_file is not None:
            cert_shown, key_shown = shown["tls certificate"], shown["tls key"]
            cert_data = self._read("tls certificate", cert_shown, resolved["tls certificate"])
            chain = self._parse_certs("tls certificate", cert_shown, cert_data)
            leaf = chain[0]
            leaf_info = cert_info(leaf, str(files.cert_file))
            key_data = self._read("tls key", key_shown, resolved["tls key"])
            key = self._parse_key(key_shown, key_data)
            if _public_key_der(key) != _public_key_der(leaf):
                raise CertError(
                    f"{self.name} tls key {key_shown} does not match certificate {cert_shown} ({leaf_info.subject})"
                )
            self._check_key_mode(key_shown, resolved["tls key"])

        context = self._make_context(ca_pem, resolved)
        now = datetime.now(UTC)
        if leaf_info is not None:
            self._check_expiry("certificate", leaf_info, now, leaf=True)
        for info in ca_infos:
            self._check_expiry("CA certificate", info, now, leaf=False)
        return _Loaded(context=context, certificate=leaf_info, ca=ca_infos, loaded_at=now)

    def _parse_key(self, shown: Path, data: bytes) -> PrivateKeyTypes:
        password = self.files.key_password.encode() if self.files.key_password is not None else None
        try:
            return serialization.load_pem_private_key(data, password=password)
        except TypeError:
            # cryptography raises TypeError for "encrypted but no password" / "password but not encrypted".
            if password is None:
                raise CertError(f"{self.name} tls key {shown} is encrypted and no key password is set") from None
            raise CertError(f"{self.name} tls key {shown} is not encrypted but a key password is set") from None
        except ValueError:
            # Never repeat cryptography's text here: keep the message free of anything key-derived.
            if password is not None and b"ENCRYPTED" in data:
                raise CertError(f"{self.name} tls key {shown}: wrong key password") from None
            raise CertError(f"bad PEM in {self.name} tls key {shown}: no usable private key") from None
        except Exception as exc:  # e.g. UnsupportedAlgorithm
            raise CertError(f"{self.name} tls key {shown}: unsupported key ({type(exc).__name__})") from None

    def _check_key_mode(self, shown: Path, resolved: str) -> None:
        try:
            mode = os.stat(resolved).st_mode
        except OSError:  # pragma: no cover - just read it
            return
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            # A Kubernetes Secret volume defaults to 0644; defaultMode: 0400 (or 0440 with fsGroup) fixes it.
            self._log(
                logging.WARNING,
                f"{self.name} tls key {shown}",
                " is readable by group/others (mode %04o); restrict it to the owner (0600/0400)",
                stat.S_IMODE(mode),
            )

    def _check_expiry(self, what: str, info: CertInfo, now: datetime, *, leaf: bool) -> None:
        remaining = info.not_after - now
        if remaining <= timedelta(0):
            # Still loaded: the peer decides (and a CA bundle during rotation may hold an expired old CA).
            self._log(
                logging.ERROR if leaf else logging.WARNING,
                f"{self.name} {what} {info.path}",
                " (%s) expired at %s",
                info.subject,
                _iso(info.not_after),
            )
        elif remaining <= self.expiry_warning:
            self._log(
                logging.WARNING,
                f"{self.name} {what} {info.path}",
                " (%s) expires in %.1f days, at %s",
                info.subject,
                remaining.total_seconds() / 86400,
                _iso(info.not_after),
            )
        if info.not_before is not None and info.not_before > now:
            self._log(
                logging.WARNING,
                f"{self.name} {what} {info.path}",
                " (%s) is not valid before %s (clock skew?)",
                info.subject,
                _iso(info.not_before),
            )

    def _make_context(self, ca_pem: str | None, resolved: dict[str, str]) -> ssl.SSLContext:
        files = self.files
        try:
            if self.purpose == "client":
                # create_default_context: CERT_REQUIRED + check_hostname, and the system store when no CA.
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
            else:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                if self.require_client_cert:
                    context.verify_mode = ssl.CERT_REQUIRED
                    context.load_verify_locations(cadata=ca_pem)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if files.cert_file is not None and files.key_file is not None:
                # ssl can only read keys from files: load the same resolved paths that were validated.
                context.load_cert_chain(resolved["tls certificate"], resolved["tls key"], password=files.key_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc).splitlines()[0] or type(exc).__name__
            used = ", ".join(str(path) for _, path in self._configured()) or "the system CA store"
            raise CertError(f"{self.name} TLS context could not be built from {used}: {reason}") from None
        return context
