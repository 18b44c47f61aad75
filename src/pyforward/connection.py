"""What `run`, `send` and `check` connect with, from the settings: the receiver's TLS material, the proxy, the client's
configuration, and the one-line StartupError when something configured cannot be used."""

from __future__ import annotations

import importlib
from datetime import timedelta

from pyforward.certs import CertError, TLSFiles, TLSMaterial
from pyforward.client import ClientConfig
from pyforward.settings import Settings, env_name
from pyforward.transport import Proxy

__all__ = [
    "StartupError",
    "client_config",
    "connection_material",
    "load_receiver_tls",
    "proxy_from",
    "require_discovery_package",
    "tls_material",
]


class StartupError(Exception):
    """A problem found before anything starts: one line for the operator, exit code 2."""


def require_discovery_package(settings: Settings) -> None:
    """Discovery needs kubernetes-asyncio: import it now (~1 s), so that a missing or broken package is one line at
    start, not a background task failing after "shipping ..." (issue 12)."""
    try:
        importlib.import_module("kubernetes_asyncio.client")
    except Exception as exc:  # ImportError, or whatever a broken install raises while importing
        raise StartupError(
            f"discovery of the receiver (Service {settings.namespace}/{settings.service_name}; set because "
            f"{env_name('host')} is not) needs the Python package kubernetes-asyncio, which cannot be imported "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}): install it "
            f"(pip install kubernetes-asyncio, a dependency of pyforward), or set {env_name('host')} to ship to a "
            "fixed address"
        ) from None


def tls_material(settings: Settings) -> TLSMaterial | None:
    if not settings.tls:
        return None
    ca, cert, key = settings.receiver_tls_files
    return TLSMaterial(
        TLSFiles(ca_file=ca, cert_file=cert, key_file=key, server_name=settings.effective_server_name),
        purpose="client",
        name="receiver",
        expiry_warning=timedelta(days=settings.cert_expiry_warning_days),
    )


def load_receiver_tls(settings: Settings, material: TLSMaterial | None) -> None:
    """Load the receiver's TLS files now: a configured but unusable file is a StartupError naming the setting."""
    if material is None:
        return
    try:
        material.load()
    except CertError as exc:
        raise StartupError(f"receiver TLS{_named(settings, exc, 'tls_')}: {exc}") from None


def connection_material(settings: Settings) -> tuple[TLSMaterial | None, Proxy | None]:
    """The receiver's TLS material (loaded) and the proxy, for `send` and `check`; StartupError when unusable."""
    material = tls_material(settings)
    load_receiver_tls(settings, material)
    return material, proxy_from(settings)


def _named(settings: Settings, error: CertError, prefix: str) -> str:
    """The setting(s) whose file a CertError is about, as " (PYFORWARD_TLS_CA_FILE)": operators are told which
    setting to fix (CertError names the file and its role only)."""
    names = [
        env_name(name)
        for name in (f"{prefix}ca_file", f"{prefix}cert_file", f"{prefix}key_file")
        if (path := getattr(settings, name)) is not None and str(path) in str(error)
    ]
    return f" ({', '.join(names)})" if names else ""


def proxy_from(settings: Settings) -> Proxy | None:
    if not (settings.proxy_uds or settings.proxy_host):
        return None
    material = None
    if settings.effective_proxy_tls:
        material = TLSMaterial(
            TLSFiles(
                ca_file=settings.proxy_ca_file,
                cert_file=settings.proxy_cert_file,
                key_file=settings.proxy_key_file,
                server_name=settings.proxy_server_name,
            ),
            purpose="client",
            name="proxy",
            expiry_warning=timedelta(days=settings.cert_expiry_warning_days),
        )
        try:
            material.load()
        except CertError as exc:
            raise StartupError(f"proxy TLS{_named(settings, exc, 'proxy_')}: {exc}") from None
    try:
        return _proxy(settings, material)
    except ValueError as exc:
        raise StartupError(f"proxy settings: {exc}") from None


def _proxy(settings: Settings, material: TLSMaterial | None) -> Proxy:
    return Proxy(
        uds=settings.proxy_uds,
        host=settings.proxy_host,
        port=settings.proxy_port if settings.proxy_host else None,
        tls=material,
        server_name=settings.proxy_server_name,
        username=settings.proxy_username,
        password=settings.proxy_password.get_secret_value() if settings.proxy_password else None,
    )


def client_config(settings: Settings) -> ClientConfig:
    return ClientConfig(
        shared_key=settings.shared_key.get_secret_value() if settings.shared_key else None,
        username=settings.username or "",
        password=settings.password.get_secret_value() if settings.password else "",
        hostname=settings.self_hostname,
        window=settings.window,
        ack_timeout=settings.ack_timeout,
        handshake_timeout=settings.connect_timeout,
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
    )
