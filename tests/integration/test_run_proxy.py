"""`pyforward run` and `pyforward send` through real HTTP CONNECT proxies, as processes (the proxy issue's "Done when").

The three shapes, each with the receiver's mTLS inside the tunnel (tests/proxies.py):

* ``tcp``: tinyproxy over plain TCP (PYFORWARD_PROXY_HOST/PORT, PYFORWARD_PROXY_TLS=false);
* ``uds``: konnectivity, a Unix socket in front of tinyproxy (PYFORWARD_PROXY_UDS);
* ``vpn``: Gardener's reversed VPN, mTLS in front of tinyproxy (PYFORWARD_PROXY_HOST/PORT + CA, client cert and
  key): TLS inside TLS.

Every test checks by auditID that each event written arrived, and, through tinyproxy's log, that the bytes
really went through the proxy (a shipper that ignored the proxy settings would otherwise pass).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from tests.conftest import CertFiles, free_port, write_certs
from tests.harness import (
    PYTHON,
    AuditWriter,
    Harness,
    ReceivedIds,
    ReceiverProcess,
    RunProcess,
    assert_delivered,
    try_metrics,
    wait_for,
)
from tests.proxies import MTLSFront, Proxies, ProxyProcess, Tinyproxy, UnixFront
from tests.unit.test_certs import SecretVolume

pytestmark = pytest.mark.proxy

Shape = Literal["tcp", "uds", "vpn"]
SHAPES: list[Shape] = ["tcp", "uds", "vpn"]
# Several chunks per batch, a window of them in flight: a proxy killed mid-stream takes chunks with it.
CHUNKS: dict[str, object] = {"chunk_max_records": 25, "window": 4}
WINDOW_RECORDS = 25 * 4  # records in flight at most
# What the client logs for every failed connection attempt (the first one is shown, repeats are rate-limited).
FAILED = r"connection to the receiver failed: "


@dataclass
class Route:
    """The proxy path of one test: tinyproxy, the front in the konnectivity / reversed-VPN shapes, the settings."""

    shape: Shape
    tiny: Tinyproxy
    front: UnixFront | MTLSFront | None
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def entry(self) -> ProxyProcess:
        """The process pyforward connects to (killing it cuts the tunnel)."""
        return self.front if self.front is not None else self.tiny

    def describe(self) -> str:
        """How pyforward names this proxy in its messages (transport.Proxy.describe)."""
        if isinstance(self.front, UnixFront):
            return f"proxy unix:{self.front.path}"
        if isinstance(self.front, MTLSFront):
            return f"proxy {self.front.address} (mTLS)"
        return f"proxy {self.tiny.address}"


def proxy_files(certs: CertFiles) -> dict[str, Path]:
    """PYFORWARD_PROXY_* files for the reversed VPN: the proxy's CA, our client certificate and key for it."""
    return {"proxy_ca_file": certs.ca, "proxy_cert_file": certs.client_cert, "proxy_key_file": certs.client_key}


def route(
    shape: Shape,
    proxies: Proxies,
    connect_ports: list[int],
    proxy_certs: CertFiles,
    *,
    basic_auth: tuple[str, str] | None = None,
) -> Route:
    tiny = proxies.tinyproxy(connect_ports, basic_auth=basic_auth)
    if shape == "tcp":
        return Route(shape, tiny, None, {"proxy_host": "127.0.0.1", "proxy_port": tiny.port, "proxy_tls": "false"})
    if shape == "uds":
        uds = proxies.unix_front(tiny)
        return Route(shape, tiny, uds, {"proxy_uds": uds.path})
    vpn = proxies.mtls_front(tiny, proxy_certs)
    return Route(shape, tiny, vpn, {"proxy_host": "127.0.0.1", "proxy_port": vpn.port, **proxy_files(proxy_certs)})


def assert_proxied(tiny: Tinyproxy, receiver: ReceiverProcess, *, at_least: int = 1) -> None:
    """tinyproxy was asked to CONNECT to the receiver, and to nothing else."""
    asked = tiny.requests()
    assert len(asked) >= at_least, f"{len(asked)} CONNECT request(s) seen by tinyproxy: {tiny.output()}"
    assert set(asked) == {f"127.0.0.1:{receiver.port}"}, asked


def run_env(
    harness: Harness, receiver: ReceiverProcess, *groups: dict[str, object], **settings: object
) -> dict[str, str]:
    """:meth:`Harness.run_env` for ``receiver`` with groups of settings (name -> value, as PYFORWARD_<NAME>)."""
    env = harness.run_env(receiver)
    for name, value in [item for group in (*groups, settings) for item in group.items()]:
        env[f"PYFORWARD_{name.upper()}"] = str(value)
    return env


def no_traceback(run: RunProcess) -> None:
    """No log line carries a traceback: neither the client's "unexpected error" catch-all nor asyncio's own
    (CPython < 3.11.8 logged one for TLS inside TLS, gh-113214; transport.py backports the fix)."""
    for entry in run.logs(all_runs=True):
        assert "Traceback" not in json.dumps(entry), entry


def volume_files(certs: CertFiles) -> dict[str, bytes]:
    """A Kubernetes Secret's content: CA, client certificate, client key."""
    return {
        "ca.crt": certs.ca.read_bytes(),
        "tls.crt": certs.client_cert.read_bytes(),
        "tls.key": certs.client_key.read_bytes(),
    }


def volume_settings(vol: SecretVolume, prefix: str) -> dict[str, object]:
    return {
        f"{prefix}ca_file": vol.path("ca.crt"),
        f"{prefix}cert_file": vol.path("tls.crt"),
        f"{prefix}key_file": vol.path("tls.key"),
    }


# ------------------------------------------------------------------------------------------------ the shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_every_event_arrives_through_the_proxy_killed_mid_stream(
    harness: Harness, proxies: Proxies, proxy_certs: CertFiles, shape: Shape
) -> None:
    """Ship through the proxy; SIGKILL it (and every tunnel) while a batch is on its way, bring it back on the
    same address: every event arrives, none twice (the receiver acks a resent chunk id without writing it)."""
    receiver = harness.receiver("mtls")
    path = route(shape, proxies, [receiver.port], proxy_certs)
    bind = f"127.0.0.1:{free_port()}"
    run = harness.run(run_env(harness, receiver, path.settings, CHUNKS, metrics_bind=bind))
    log = harness.audit_log()
    out = receiver.received()
    harness.wait_delivered(log.write(200), out, run=run)

    log.write(400)  # chunks on their way while the proxy dies
    path.entry.kill()
    # The shipper saw its tunnel go (and cannot open a new one).
    run.wait_until(lambda: try_metrics(bind).get("pyforward_connected") == 0, what="pyforward_connected 0")
    log.write(200)  # written while there is no proxy
    path.entry.start()

    harness.wait_delivered(log.ids, out, run=run)
    assert_delivered(log.ids, out.refresh(), context=f"{shape}: proxy killed mid-stream")
    assert_proxied(path.tiny, receiver, at_least=2)  # one tunnel before the kill, one after
    assert run.alive
    no_traceback(run)


# ------------------------------------------------------------------------------------------------ refusals


def test_proxy_answering_403_is_logged_retried_and_heals(
    harness: Harness, proxies: Proxies, proxy_certs: CertFiles
) -> None:
    """konnectivity refusing the receiver's port: one clear line naming the proxy and the status, retries, no
    crash, nothing delivered; once the proxy allows the port everything arrives."""
    receiver = harness.receiver("mtls")
    path = route("uds", proxies, [free_port()], proxy_certs)  # allows another port only
    run = harness.run(run_env(harness, receiver, path.settings))
    log = harness.audit_log()
    out = receiver.received()
    ids = log.write(150)

    line = run.wait_log(FAILED, level="warning").string
    assert line.startswith(
        f"{FAILED}{path.describe()} answered CONNECT 127.0.0.1:{receiver.port} with 403 Access violation; retrying"
    ), line
    run.wait_until(lambda: len(path.tiny.requests()) >= 3, what="3 CONNECT attempts (retries)")
    assert run.alive
    assert not out.refresh(), "nothing may arrive through a proxy that refuses"

    path.tiny.configure(connect_ports=[receiver.port]).restart()
    harness.wait_delivered(ids, out, run=run)
    assert_delivered(ids, out.refresh())
    no_traceback(run)


def test_proxy_wanting_credentials_407_then_a_restart_with_them(
    harness: Harness, proxies: Proxies, proxy_certs: CertFiles
) -> None:
    """tinyproxy with BasicAuth and no credentials configured: 407 named in the log, retries; restarted with
    PYFORWARD_PROXY_USERNAME/PASSWORD it ships everything, and the password is in no log line."""
    receiver = harness.receiver("mtls")
    password = "hunter2-proxy-secret"
    path = route("tcp", proxies, [receiver.port], proxy_certs, basic_auth=("shipper", password))
    # SIGTERM waits (bounded) for the acks of what is in flight: here nothing can be acked.
    env = run_env(harness, receiver, path.settings, shutdown_timeout=0.2)
    run = harness.run(env)
    log = harness.audit_log()
    out = receiver.received()
    ids = log.write(150)

    line = run.wait_log(FAILED, level="warning").string
    assert line.startswith(
        f"{FAILED}{path.describe()} answered CONNECT 127.0.0.1:{receiver.port} with "
        "407 Proxy Authentication Required (no credentials configured); retrying"
    ), line
    run.wait_until(lambda: len(path.tiny.requests()) >= 3, what="3 CONNECT attempts (retries)")
    assert not out.refresh()
    assert run.terminate() == 0  # SIGTERM with nothing acked: a clean stop, the log is read again later

    run.env.update(PYFORWARD_PROXY_USERNAME="shipper", PYFORWARD_PROXY_PASSWORD=password)
    run.start()
    harness.wait_delivered(ids, out, run=run)
    assert_delivered(ids, out.refresh())
    assert password not in run.stderr_text(all_runs=True)
    no_traceback(run)


# ------------------------------------------------------------------------------------------------ certificates


def test_certificate_rotation_mid_stream_is_used_by_new_connections(
    harness: Harness, proxies: Proxies, proxy_certs: CertFiles
) -> None:
    """Reversed VPN with both TLS layers' material in Secret volumes (``..data`` symlink swaps). Rotated while
    shipping: the connection in use is left alone; after the receiver restarts with a CA that trusts only the new
    client certificate, and the mTLS front with a client CA that trusts only the new proxy client certificate,
    the shipper reconnects with the new material. Nothing is lost."""
    root = harness.root
    receiver = harness.receiver("mtls")  # receiver CA 1
    tiny = proxies.tinyproxy([receiver.port])
    vpn = proxies.mtls_front(tiny, proxy_certs)  # trusts proxy CA 1 for clients
    receiver_vol = SecretVolume(root / "secret-receiver")
    receiver_vol.write(volume_files(harness.certs))
    proxy_vol = SecretVolume(root / "secret-proxy")
    proxy_vol.write(volume_files(proxy_certs))
    env = run_env(
        harness,
        receiver,
        volume_settings(receiver_vol, "tls_"),
        volume_settings(proxy_vol, "proxy_"),
        CHUNKS,
        proxy_host="127.0.0.1",
        proxy_port=vpn.port,
    )
    run = harness.run(env)
    log = harness.audit_log()
    out = receiver.received()
    harness.wait_delivered(log.write(150), out, run=run)

    # New PKIs: the receiver's CA 2 (its server certificate and our client certificate), and a new client
    # certificate for the proxy from proxy CA 2 (the proxy's own server certificate stays, from proxy CA 1).
    receiver_two = write_certs(root / "certs-two", "receiver-two")
    proxy_two = write_certs(root / "proxy-two", "proxy-two")
    log.write(150)  # on the wire while the files change
    receiver_vol.write(volume_files(receiver_two))
    proxy_vol.write({**volume_files(proxy_two), "ca.crt": proxy_certs.ca.read_bytes()})
    before = log.write(150)
    harness.wait_delivered(log.ids, out, run=run)  # the connection in use carries on

    # Only the new material works from now on: the old client certificates are refused on both layers.
    receiver.stop()
    receiver.certs = receiver_two
    receiver.start()
    vpn.client_ca = proxy_two.ca
    vpn.restart()
    after = log.write(150)

    harness.wait_delivered(log.ids, out, run=run)
    receiver_reload = run.wait_log(r"^receiver TLS material reloaded \(generation 2\): certificate ").string
    assert "O=pyforward test receiver-two CA" in receiver_reload, receiver_reload
    proxy_reload = run.wait_log(r"^proxy TLS material reloaded \(generation 2\): certificate ").string
    assert "O=pyforward test proxy-two CA" in proxy_reload, proxy_reload
    # A receiver restarted while acks were on their way: those chunks may come twice (never more than a window).
    assert_delivered(log.ids, out.refresh(), max_duplicates=WINDOW_RECORDS)
    assert set(before) <= set(out.counts)
    assert set(after) <= set(out.counts)
    assert_proxied(tiny, receiver, at_least=2)
    no_traceback(run)


def test_bad_pem_on_rotation_keeps_the_last_good_material(
    harness: Harness, proxies: Proxies, proxy_certs: CertFiles
) -> None:
    """A rotated Secret whose files do not load (bad PEM in the receiver certificate, a key that is no key for the
    proxy): each is logged as an error naming the file, the last good material stays in use, shipping goes on."""
    root = harness.root
    receiver = harness.receiver("mtls")
    tiny = proxies.tinyproxy([receiver.port])
    vpn = proxies.mtls_front(tiny, proxy_certs)
    receiver_vol = SecretVolume(root / "secret-receiver")
    receiver_vol.write(volume_files(harness.certs))
    proxy_vol = SecretVolume(root / "secret-proxy")
    proxy_vol.write(volume_files(proxy_certs))
    env = run_env(
        harness,
        receiver,
        volume_settings(receiver_vol, "tls_"),
        volume_settings(proxy_vol, "proxy_"),
        proxy_host="127.0.0.1",
        proxy_port=vpn.port,
    )
    run = harness.run(env)
    log = harness.audit_log()
    out = receiver.received()
    harness.wait_delivered(log.write(100), out, run=run)

    receiver_vol.write({**volume_files(harness.certs), "tls.crt": b"-----BEGIN CERTIFICATE-----\nnot base64\n"})
    proxy_vol.write({**volume_files(proxy_certs), "tls.key": b"this is not a key\n"})

    # The files are looked at when a connection is opened (at most once a second): drop the tunnel until both
    # reloads have been tried.
    def both_reported() -> bool:
        if run.find_log(r"^receiver TLS reload failed") and run.find_log(r"^proxy TLS reload failed"):
            return True
        run.check_alive()
        vpn.restart()
        return False

    wait_for(both_reported, 30, what="both reload failures logged", interval=0.3, diagnostics=run.tail)
    receiver_error = run.find_log(r"^receiver TLS reload failed.*", level="error")
    assert receiver_error is not None
    message = receiver_error.group(0)
    assert message.startswith("receiver TLS reload failed, keeping the previous certificates (loaded "), message
    assert f", generation 1): bad PEM in receiver tls certificate {receiver_vol.path('tls.crt')}: " in message
    proxy_error = run.find_log(r"^proxy TLS reload failed.*", level="error")
    assert proxy_error is not None
    message = proxy_error.group(0)
    assert message.startswith("proxy TLS reload failed, keeping the previous certificates (loaded "), message
    assert f", generation 1): bad PEM in proxy tls key {proxy_vol.path('tls.key')}: " in message

    ids = log.write(150)
    harness.wait_delivered(ids, out, run=run)  # with the last good material, through new tunnels
    assert_delivered(log.ids, out.refresh())
    assert not run.find_log("reloaded")
    no_traceback(run)


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("names", ["pyforward", "audit-forwarder"])
def test_both_proxy_socket_and_host_exit_2_with_one_line(harness: Harness, names: str) -> None:
    env = harness.run_env(port=free_port())
    if names == "pyforward":
        env.update(PYFORWARD_PROXY_UDS="/run/konnectivity.sock", PYFORWARD_PROXY_HOST="vpn-seed-server")
    else:
        env.update(AUDIT_KONNECTIVITY_UDS_SOCKET="/run/konnectivity.sock", AUDIT_PROXY_HOST="vpn-seed-server")
    run = harness.run(env)
    assert run.wait() == 2
    lines = [line for line in run.stderr_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pyforward run: invalid settings: PYFORWARD_PROXY_UDS and PYFORWARD_PROXY_HOST are both")
    assert "choose one" in lines[0]
    if names == "audit-forwarder":
        assert "AUDIT_KONNECTIVITY_UDS_SOCKET" in lines[0], lines[0]
        assert "AUDIT_PROXY_HOST" in lines[0], lines[0]


@pytest.mark.parametrize("shape", ["uds", "vpn"])
def test_audit_forwarder_proxy_env_names(
    harness: Harness, proxies: Proxies, proxy_certs: CertFiles, shape: Shape
) -> None:
    """audit-forwarder's pod spec, unchanged: AUDIT_KONNECTIVITY_UDS_SOCKET, or AUDIT_PROXY_HOST/PORT with
    AUDIT_PROXY_CA_FILE, AUDIT_PROXY_CLIENT_CRT_FILE and AUDIT_PROXY_CLIENT_KEY_FILE."""
    receiver = harness.receiver("mtls")
    path = route(shape, proxies, [receiver.port], proxy_certs)
    env = harness.run_env(receiver)
    if isinstance(path.front, UnixFront):
        legacy = {"AUDIT_KONNECTIVITY_UDS_SOCKET": path.front.path}
    else:
        assert isinstance(path.front, MTLSFront)
        legacy = {
            "AUDIT_PROXY_HOST": "127.0.0.1",
            "AUDIT_PROXY_PORT": str(path.front.port),
            "AUDIT_PROXY_CA_FILE": str(proxy_certs.ca),
            "AUDIT_PROXY_CLIENT_CRT_FILE": str(proxy_certs.client_cert),
            "AUDIT_PROXY_CLIENT_KEY_FILE": str(proxy_certs.client_key),
        }
    env.update(legacy)
    run = harness.run(env)
    log = harness.audit_log()
    out = receiver.received()
    ids = log.write(200)
    harness.wait_delivered(ids, out, run=run)
    assert_delivered(ids, out.refresh())
    assert_proxied(path.tiny, receiver)
    used = run.wait_log(r"^audit-forwarder settings in use: .*").group(0)
    assert all(name in used for name in legacy), used


# ------------------------------------------------------------------------------------------------ send


@pytest.mark.parametrize("shape", ["uds", "vpn"])
def test_send_through_the_proxy(
    harness: Harness, proxies: Proxies, proxy_certs: CertFiles, shape: Shape, tmp_path: Path
) -> None:
    """`pyforward send` has the same proxy flags: --proxy-uds, or --proxy-host/--proxy-port with --proxy-ca,
    --proxy-cert and --proxy-key."""
    receiver = harness.receiver("mtls")
    path = route(shape, proxies, [receiver.port], proxy_certs)
    writer = AuditWriter(tmp_path / "events.log")  # only for its generated events
    lines = writer.events(300)
    ids = writer.write_lines(lines)
    writer.close()
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"".join(lines))
    certs = harness.certs
    argv = [
        PYTHON, "-m", "pyforward", "send", str(source), "--no-progress", "--timeout", "30",
        "--host", "127.0.0.1", "--port", str(receiver.port), "--tls", "--tls-server-name", "localhost",
        "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key),
        "--connect-timeout", "5", "--chunk-max-records", "50",
    ]  # fmt: skip
    if isinstance(path.front, UnixFront):
        argv += ["--proxy-uds", path.front.path]
    else:
        assert isinstance(path.front, MTLSFront)
        argv += ["--proxy-host", "127.0.0.1", "--proxy-port", str(path.front.port)]
        argv += ["--proxy-ca", str(proxy_certs.ca), "--proxy-cert", str(proxy_certs.client_cert)]
        argv += ["--proxy-key", str(proxy_certs.client_key)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYFORWARD_", "AUDIT_"))}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"pyforward send: 300 record(s) in 6 chunk(s) acked by 127.0.0.1:{receiver.port}" in done.stderr
    out = ReceivedIds(receiver.output)
    assert_delivered(ids, out.refresh())
    assert_proxied(path.tiny, receiver)
