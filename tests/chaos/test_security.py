"""Security defaults, end to end with real processes.

* TLS with verification is the default: no silent fallback to plain TCP; an untrusted or misnamed certificate and a
  TLS 1.1-only server are refused and nothing is delivered.
* A configured but unusable certificate is a start-up error (exit 2, one line); a private key readable by group or
  others is warned about.
* The shared key and passwords never appear in the logs (JSON stderr, debug level), in `pyforward config` /
  `pyforward check` output, or in error messages.
* `pyforward receive` with a shared key or a client CA writes nothing from a peer that did not authenticate.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator

import pytest

from pyforward.certs import TLSFiles, TLSMaterial
from pyforward.protocol import (
    ClientDecoder,
    EventTime,
    Helo,
    Pong,
    encode_message,
    encode_ping,
    make_ping,
)
from tests.chaos.conftest import Figures
from tests.chaos.tools import ScriptedReceiver, at_least, env_for, permissions_apply, unprivileged_run
from tests.conftest import CertFiles, write_certs
from tests.harness import PYTHON, Harness, ReceiverProcess, assert_delivered, wait_for
from tests.proxies import proxies_at

pytestmark = pytest.mark.chaos


def receiver_complaints(receiver: ReceiverProcess, pattern: str) -> int:
    return len([line for line in receiver.stderr_lines if pattern in line])


# ------------------------------------------------------------------------------------------------ TLS defaults


def test_tls_is_the_default_and_never_falls_back_to_plain_tcp(harness: Harness, figures: Figures) -> None:
    """PYFORWARD_TLS unset against a plain receiver: every attempt is TLS, fails, and nothing is delivered."""
    receiver = harness.receiver("plain")
    writer = harness.audit_log()
    writer.write(50)
    env = harness.run_env(receiver, tls_ca_file=harness.certs.ca, tls_server_name="localhost")
    del env["PYFORWARD_TLS"]
    run = harness.run(env)
    shipping = run.wait_log(r"^shipping ")
    assert "(tls, " in shipping.string, shipping.string
    # The receiver sees TLS ClientHellos where it expects msgpack: at least 3 attempts, each closed.
    run.wait_until(lambda: receiver_complaints(receiver, "closing connection") >= 3, 30, what="3 TLS attempts")
    failure = run.wait_log(r"connection to the receiver failed", level="warning")
    assert not receiver.received().refresh(), "delivered over plain TCP"
    assert not [e for e in run.logs() if "plain" in str(e.get("msg")) and "shipping" not in str(e.get("msg"))]
    assert run.alive
    figures.update(
        scenario="TLS by default against a plain-TCP receiver", group="security", faults=3, written=50, lost=0,
        limits=f"nothing delivered; run said: {failure.string[:100]!r}",
    )  # fmt: skip


def test_untrusted_receiver_certificate_is_refused(harness: Harness, figures: Figures) -> None:
    """A receiver certificate from another CA, one checked against the system store (no CA configured), and one
    for another name: each is refused at the TLS step, retried, and nothing is delivered."""
    receiver = harness.receiver("tls")
    writer = harness.audit_log()
    writer.write(50)
    said = []
    for case in ("other CA", "system store", "wrong server name"):
        env = harness.run_env(receiver, shutdown_timeout=0.5)
        if case == "other CA":
            env["PYFORWARD_TLS_CA_FILE"] = str(write_certs(harness.root / "other", "other").ca)
        elif case == "system store":
            del env["PYFORWARD_TLS_CA_FILE"]
        else:
            env["PYFORWARD_TLS_SERVER_NAME"] = "not-the-receiver.example"
        refused = receiver_complaints(receiver, "TLS handshake with")
        run = harness.run(env)
        failure = run.wait_log(r"connection to the receiver failed: .*certificate verify failed", level="warning")
        run.wait_until(at_least(lambda: receiver_complaints(receiver, "TLS handshake with"), refused + 2), 30,
                       what=f"{case}: 2 refused handshakes")  # fmt: skip
        assert not receiver.received().refresh(), f"{case}: delivered to an untrusted receiver"
        assert run.terminate() == 0
        said.append(f"{case}: {failure.string[failure.string.find('certificate'):][:70]!r}")
    figures.update(
        scenario="receiver certificate not trusted (other CA, system store, wrong name)", group="security",
        faults=3, written=50, lost=0, limits="nothing delivered; " + "; ".join(said),
    )  # fmt: skip


class _TLSServer:
    """A TLS server in a thread that counts completed handshakes (and answers nothing)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.handshakes = 0
        self.failures: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    tls.recv(1)
            except (OSError, ssl.SSLError) as exc:
                self.failures.append(str(exc))
            finally:
                conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(5)


@contextlib.contextmanager
def tls11_server(certs: CertFiles) -> Iterator[_TLSServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    server = _TLSServer(context)
    try:
        yield server
    finally:
        server.close()


def _can_speak_tls11(server: _TLSServer, certs: CertFiles) -> bool:
    """Whether this OpenSSL can complete a TLS 1.1 handshake at all (with a client that allows it)."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1_1
        except (ssl.SSLError, ValueError):
            return False
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, context.wrap_socket(
            raw, server_hostname="localhost"
        ) as tls:
            return tls.version() == "TLSv1.1"
    except (OSError, ssl.SSLError):
        return False


def test_tls_1_1_only_server_is_refused(harness: Harness, figures: Figures) -> None:
    """TLS 1.2 is the minimum: a server that offers only TLS 1.1 (which this OpenSSL can speak, proven by a
    permissive client first) gets no handshake and no data from `pyforward run`."""
    material = TLSMaterial(TLSFiles(ca_file=harness.certs.ca), purpose="client", name="receiver")
    material.load()
    assert material.context().minimum_version == ssl.TLSVersion.TLSv1_2
    with tls11_server(harness.certs) as server:
        if not _can_speak_tls11(server, harness.certs):
            pytest.skip("this OpenSSL cannot complete a TLS 1.1 handshake at all; minimum_version asserted above")
        # the server thread counts the permissive client's handshake a moment after the client sees it done
        wait_for(lambda: server.handshakes == 1, 10, what="the permissive handshake to be counted")
        writer = harness.audit_log()
        writer.write(20)
        env = harness.run_env(port=server.port, tls="true", tls_ca_file=harness.certs.ca, tls_server_name="localhost")
        run = harness.run(env)
        failure = run.wait_log(r"connection to the receiver failed", level="warning")
        wait_for(lambda: len(server.failures) >= 2, 30, what="2 refused handshakes",
                 diagnostics=lambda: f"server: {server.handshakes} handshakes, {server.failures}\n{run.tail()}")
        assert server.handshakes == 1, f"pyforward run completed a TLS 1.1 handshake: {server.failures}"
        assert run.alive
    figures.update(
        scenario="TLS 1.1-only server", group="security", faults=len(server.failures), written=20, lost=0,
        limits=f"context minimum TLSv1.2; no handshake; {failure.string[:110]!r}",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ certificates


def _startup_error(harness: Harness, env: dict[str, str], *, unprivileged: bool = False) -> str:
    run = unprivileged_run(harness, env) if unprivileged else harness.run(env)
    code = run.wait(60)
    lines = run.stderr_text().splitlines()
    assert code == 2, f"exit code {code}: {lines}"
    assert len(lines) == 1, f"not one line: {lines}"
    assert lines[0].startswith("pyforward run: "), lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["missing CA", "garbage CA", "unreadable key", "key of another cert", "empty cert"])
def test_configured_but_unusable_certificate_is_a_startup_error(harness: Harness, figures: Figures, case: str) -> None:
    certs = harness.certs
    env = harness.run_env(port=1, tls="true", tls_ca_file=certs.ca, tls_cert_file=certs.client_cert,
                          tls_key_file=certs.client_key, tls_server_name="localhost")  # fmt: skip
    unprivileged = False
    bad = harness.root / "bad.pem"
    if case == "missing CA":
        env["PYFORWARD_TLS_CA_FILE"] = str(harness.root / "nowhere" / "ca.crt")
        named = "PYFORWARD_TLS_CA_FILE"
    elif case == "garbage CA":
        bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        env["PYFORWARD_TLS_CA_FILE"] = str(bad)
        named = "PYFORWARD_TLS_CA_FILE"
    elif case == "unreadable key":
        reason = permissions_apply()
        if reason:
            pytest.skip(reason)
        certs.client_key.chmod(0)
        unprivileged = True
        named = "PYFORWARD_TLS_KEY_FILE"
    elif case == "key of another cert":
        env["PYFORWARD_TLS_KEY_FILE"] = str(certs.server_key)
        named = "PYFORWARD_TLS_KEY_FILE"
    else:
        bad.write_bytes(b"")
        env["PYFORWARD_TLS_CERT_FILE"] = str(bad)
        named = "PYFORWARD_TLS_CERT_FILE"
    line = _startup_error(harness, env, unprivileged=unprivileged)
    assert named in line, line
    figures.update(scenario=f"unusable certificate at start-up: {case}", group="security", faults=1,
                   limits=f"exit 2: {line[:140]!r}")  # fmt: skip


def test_private_key_readable_by_others_is_warned_about(harness: Harness, figures: Figures) -> None:
    receiver = harness.receiver("mtls")
    harness.certs.client_key.chmod(0o644)
    writer = harness.audit_log()
    ids = writer.write(20)
    run = harness.run(harness.run_env(receiver))
    warning = run.wait_log(r"tls key .* is readable by group/others \(mode 0644\)", level="warning")
    harness.wait_delivered(ids, receiver.received(), run=run)
    assert run.terminate() == 0
    figures.update(scenario="client key with mode 0644", group="security", written=20, lost=0,
                   limits=f"warned: {warning.string[:120]!r}")  # fmt: skip


# ------------------------------------------------------------------------------------------------ secrets


SHARED_KEY = "sk-" + base64.b32encode(os.urandom(10)).decode()
PASSWORD = "pw-" + base64.b32encode(os.urandom(10)).decode()
PROXY_PASSWORD = "px-" + base64.b32encode(os.urandom(10)).decode()


def _leaks(text: str) -> list[str]:
    token = base64.b64encode(f"shipper:{PROXY_PASSWORD}".encode()).decode()
    found = [s for s in (SHARED_KEY, PASSWORD, PROXY_PASSWORD, token) if s in text]
    # Fragments too: a secret cut by a message length limit, or its JSON/repr escaping.
    found += [s[:12] for s in (SHARED_KEY, PASSWORD, PROXY_PASSWORD) if s[3:15] in text]
    return found


def test_secrets_never_appear_in_logs_config_or_errors(harness: Harness, figures: Figures) -> None:
    """Shared key, user password and proxy password at debug level, with a handshake that fails (another key),
    a proxy that rejects the credentials, `pyforward config` (text and JSON), `pyforward check`, and a start-up
    error: none of them contains a secret (nor the Basic token)."""
    secrets_env = {"shared_key": SHARED_KEY, "username": "user", "password": PASSWORD}
    scanned: dict[str, int] = {}
    receiver = ScriptedReceiver(shared_key="another-key").start()
    try:
        harness.audit_log().write(20)
        env = env_for(harness, port=receiver.port, log_level="debug", shutdown_timeout=0.5, settings=secrets_env)
        run = harness.run(env)
        run.wait_until(lambda: receiver.connections >= 3, 60, what="3 failed handshakes")
        assert receiver.requests == 0
        assert run.terminate() == 0
        text = run.stderr_text(all_runs=True)
        scanned["run (handshake refused), debug log"] = len(text)
        assert not _leaks(text), _leaks(text)
    finally:
        receiver.stop()

    with proxies_at(harness.root / "proxies") as proxies:
        tiny = proxies.tinyproxy([1], basic_auth=("shipper", "the-right-one"))
        proxy_env = {"proxy_host": "127.0.0.1", "proxy_port": tiny.port, "proxy_username": "shipper",
                     "proxy_password": PROXY_PASSWORD}  # fmt: skip
        env = env_for(harness, port=1, log_level="debug", shutdown_timeout=0.5,
                      settings={**secrets_env, **proxy_env})  # fmt: skip
        run = harness.run(env)
        failed = run.wait_log(r"connection to the receiver failed: .*(401|407)", level="warning")
        assert run.terminate() == 0
        text = run.stderr_text()
        scanned["run (proxy refused the credentials), debug log"] = len(text)
        assert not _leaks(text), _leaks(text)
        assert tiny.output(), "tinyproxy wrote nothing"

        base = [PYTHON, "-m", "pyforward"]
        for name, argv in {
            "config": [*base, "config"],
            "config --json": [*base, "config", "--json"],
            "check": [*base, "check", "--log-format", "json"],
        }.items():
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
            out = done.stdout + done.stderr
            scanned[name] = len(out)
            assert not _leaks(out), (name, _leaks(out))
            if name.startswith("config"):
                assert "********" in out

    bad = {**env, "PYFORWARD_WINDOW": "0", "PYFORWARD_PROXY_USERNAME": ""}
    line = _startup_error(harness, bad)
    scanned["start-up errors"] = len(line)
    assert not _leaks(line)
    figures.update(
        scenario="secrets in logs, config, check and errors", group="security", inputs=len(scanned),
        limits="no shared key, password, proxy password or Basic token in: "
        + ", ".join(f"{k} ({v:,} chars)" for k, v in scanned.items()) + f"; proxy failure: {failed.string[:80]!r}",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ the receiver


def _message(chunk: str) -> bytes:
    return encode_message("audit", EventTime.now(), {"auditID": chunk}, {"chunk": chunk})


def _answer(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while piece := sock.recv(4096):
            data += piece
    return data


def test_receiver_rejects_unauthenticated_data(harness: Harness, figures: Figures) -> None:
    """`pyforward receive --shared-key`: data before the handshake, and data after a PING with the wrong key, are
    closed without an ack and written nowhere. With a client CA (mTLS): a client without a certificate, and one
    with a certificate of another CA, get no TLS session and nothing is written."""
    keyed = harness.receiver("plain", extra_args=["--shared-key", "right-key"])
    attempts = 0
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall(_message("before-handshake"))
        events = ClientDecoder().feed(_answer(sock))
        assert [type(e) for e in events] == [Helo], events  # its HELO, then closed: no ack
        attempts += 1
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.settimeout(10)
        decoder = ClientDecoder()
        helo = None
        while helo is None:
            first = decoder.feed(sock.recv(4096))
            helo = first[0] if first else None
        assert isinstance(helo, Helo)
        ping = make_ping(helo, hostname="intruder", shared_key="wrong-key", username="", password="")
        sock.sendall(encode_ping(ping) + _message("wrong-key"))
        events = decoder.feed(_answer(sock))
        assert len(events) == 1, events
        assert isinstance(events[0], Pong), events
        assert not events[0].auth_ok
        attempts += 1
    assert not keyed.received().refresh(), "unauthenticated data was written"

    mtls = harness.receiver("mtls")
    other = write_certs(harness.root / "other", "other")
    for name, (cert, key) in {"no client certificate": (None, None),
                              "certificate of another CA": (other.client_cert, other.client_key)}.items():  # fmt: skip
        context = ssl.create_default_context(cafile=str(harness.certs.ca))
        if cert is not None:
            context.load_cert_chain(cert, key)
        with socket.create_connection(("127.0.0.1", mtls.port)) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(_message(name))  # TLS 1.3: the server checks the certificate after our Finished
                    answer = _answer(tls)
            except (ssl.SSLError, OSError):
                answer = b""
            assert b"ack" not in answer, name
        attempts += 1
    wait_for(lambda: receiver_complaints(mtls, "TLS handshake with") >= 2, 20, what="2 refused TLS clients")
    assert not mtls.received().refresh(), "data from an unauthenticated TLS client was written"
    # Both still serve a client that authenticates.
    writer = harness.audit_log()
    ids = writer.write(10)
    env = harness.run_env(port=keyed.port, shared_key="right-key")
    run = harness.run(env)
    harness.wait_delivered(ids, keyed.received(), run=run)
    assert run.terminate() == 0
    assert_delivered(ids, keyed.received().refresh())
    figures.update(
        scenario="receiver with a shared key / client CA vs unauthenticated peers", group="security",
        inputs=attempts, limits="no ack, nothing written; an authenticated client is then served",
    )  # fmt: skip
