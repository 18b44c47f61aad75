"""`pyforward check` as an operator runs it: a subprocess with the settings of `run`, against real parts.

A working path lists every step and exits 0; a broken one exits 1 and says, in one read, which step failed
(the FAIL line), why it probably failed (``likely cause``) and which setting to look at (``settings``).
The receiver is a real `pyforward receive` with mTLS and a shared key; the proxies are tinyproxy and the socat
fronts of tests/proxies.py (konnectivity's Unix socket, the reversed VPN's mTLS).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CertFiles, free_port, write_certs
from tests.harness import PYTHON, Harness, ReceiverProcess, harness_at
from tests.proxies import MTLSFront, Tinyproxy, UnixFront, proxies_at

pytestmark = pytest.mark.proxy

SHARED_KEY = "check-shared-secret"
STEP_LINE = re.compile(r"^  (ok|--|FAIL)  +(\S+) ")


@dataclass
class World:
    """One receiver and every proxy shape, shared by the tests of this module (each check is a new process)."""

    harness: Harness
    receiver: ReceiverProcess
    proxy_certs: CertFiles
    stranger: CertFiles  # another PKI: its CA trusts nothing here, its client cert is trusted by nobody
    tiny: Tinyproxy  # allows the receiver's port and `dead`
    uds: UnixFront
    vpn: MTLSFront
    forbidding: Tinyproxy  # allows another port only: 403
    with_auth: Tinyproxy  # BasicAuth: 407
    dead: int  # a port nothing listens on
    not_pem: Path  # a "certificate" file that is not PEM

    def env(self, **changes: str | None) -> dict[str, str]:
        """The settings of `run`, then ``changes`` (PYFORWARD_<NAME> = value; None removes the variable)."""
        env = self.harness.run_env(self.receiver, shared_key=SHARED_KEY)
        for name, value in changes.items():
            key = f"PYFORWARD_{name.upper()}"
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def konnectivity(self, **changes: str | None) -> dict[str, str]:
        return self.env(**{"proxy_uds": self.uds.path, **changes})

    def reversed_vpn(self, **changes: str | None) -> dict[str, str]:
        certs = self.proxy_certs
        vpn: dict[str, str | None] = {
            "proxy_host": "127.0.0.1",
            "proxy_port": str(self.vpn.port),
            "proxy_ca_file": str(certs.ca),
            "proxy_cert_file": str(certs.client_cert),
            "proxy_key_file": str(certs.client_key),
        }
        return self.env(**{**vpn, **changes})

    def plain_proxy(self, proxy: Tinyproxy, **changes: str | None) -> dict[str, str]:
        plain: dict[str, str | None] = {"proxy_host": "127.0.0.1", "proxy_port": str(proxy.port), "proxy_tls": "false"}
        return self.env(**{**plain, **changes})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("check")
    with harness_at(root) as harness, proxies_at(root / "proxies") as proxies:
        receiver = harness.receiver("mtls", extra_args=["--shared-key", SHARED_KEY])
        proxy_certs = write_certs(root / "proxy-certs", "proxy")
        dead = free_port()
        not_pem = root / "not-pem.crt"
        not_pem.write_text("-----BEGIN CERTIFICATE-----\nhalf a file\n")
        tiny = proxies.tinyproxy([receiver.port, dead])
        yield World(
            harness=harness,
            receiver=receiver,
            proxy_certs=proxy_certs,
            stranger=write_certs(root / "stranger", "stranger"),
            tiny=tiny,
            uds=proxies.unix_front(tiny),
            vpn=proxies.mtls_front(tiny, proxy_certs),
            forbidding=proxies.tinyproxy([free_port()]),
            with_auth=proxies.tinyproxy([receiver.port], basic_auth=("shipper", "proxy-pass")),
            dead=dead,
            not_pem=not_pem,
        )


@dataclass
class Checked:
    code: int
    out: str

    @property
    def steps(self) -> list[tuple[str, str]]:
        """(ok | -- | FAIL, step) in the order printed."""
        return [(m.group(1), m.group(2)) for line in self.out.splitlines() if (m := STEP_LINE.match(line))]

    def line(self, prefix: str) -> str:
        found = [line.strip() for line in self.out.splitlines() if line.strip().startswith(prefix)]
        assert len(found) == 1, f"{len(found)} lines starting with {prefix!r}:\n{self.out}"
        return found[0]


def check(env: dict[str, str], *args: str) -> Checked:
    done = subprocess.run(
        [PYTHON, "-m", "pyforward", "check", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    out = done.stdout + done.stderr
    assert SHARED_KEY not in out
    assert "proxy-pass" not in out
    assert "Traceback" not in out, out
    return Checked(done.returncode, out)


# ------------------------------------------------------------------------------------------------ working paths


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("direct", ["spool", "certificates", "proxy", "connect", "tls", "handshake", "probe"]),
        ("konnectivity", ["spool", "certificates", "proxy-connect", "connect-request", "tls", "handshake", "probe"]),
        (
            "reversed-vpn",
            ["spool", "certificates", "proxy-connect", "proxy-tls", "connect-request", "tls", "handshake", "probe"],
        ),
    ],
)
def test_a_working_path_lists_every_step_and_exits_0(world: World, shape: str, expected: list[str]) -> None:
    env = {"direct": world.env, "konnectivity": world.konnectivity, "reversed-vpn": world.reversed_vpn}[shape]()
    asked_before = len(world.tiny.requests())
    result = check(env, "--probe")
    assert result.code == 0, result.out
    assert [step for _, step in result.steps] == expected, result.out
    assert all(status == "ok" for status, step in result.steps if step != "proxy"), result.out
    assert re.search(r"^all steps passed in \d+ ms$", result.out, re.MULTILINE), result.out
    assert "shared key accepted by " in result.line("ok    handshake")
    assert "O=pyforward test receiver CA" in result.line("ok    tls")  # the chain the receiver presented
    spool = result.line("ok    spool")  # issue 21: its state and the free space beside the log
    assert re.search(r"\.pyforward-spool: 0 files, 0 bytes kept only by the spool of 1073741824 .* free, floor", spool)
    if shape == "reversed-vpn":
        assert "O=pyforward test proxy CA" in result.line("ok    proxy-tls")
    # Through the proxy when one is configured, and the probe event really arrived.
    assert len(world.tiny.requests()) == asked_before + (shape != "direct")
    probes = [r for r in world.receiver.received().records() if r.get("message") == "pyforward check probe"]
    assert probes, "the probe event is not in the receiver's output"


def test_a_spool_that_cannot_work_is_reported_and_is_no_failure(world: World, tmp_path: Path) -> None:
    """Issue 21: `check` says why the spool is off (here: its directory is a file), and the walk goes on."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    result = check(world.env(spool_dir=str(blocked)))
    assert result.code == 0, result.out
    assert result.steps[0] == ("--", "spool"), result.out
    assert "off: Not a directory (ENOTDIR)" in result.line("--    spool")
    off = check(world.env(spool_max_bytes="0"))
    assert "off: turned off (spool_max_bytes is 0)" in off.line("--    spool")


# ------------------------------------------------------------------------------------------------ broken settings


@dataclass(frozen=True)
class Broken:
    env: Callable[[World], dict[str, str]]
    step: str
    error: str  # regular expression searched in the FAIL line
    cause: str  # text expected in the likely-cause line
    setting: str  # the setting the operator must be sent to


BROKEN: dict[str, Broken] = {
    "proxy-socket-path-wrong": Broken(
        lambda w: w.env(proxy_uds=w.uds.path + ".old"),
        "proxy-connect",
        r"cannot connect to proxy unix:\S+\.old: no such file or directory",
        "nothing at that socket path",
        "PYFORWARD_PROXY_UDS",
    ),
    "proxy-port-nothing-listens": Broken(
        lambda w: w.env(proxy_host="127.0.0.1", proxy_port=str(w.dead), proxy_tls="false"),
        "proxy-connect",
        r"cannot connect to proxy 127\.0\.0\.1:\d+: connection refused",
        "nothing accepts connections at the proxy's host and port",
        "PYFORWARD_PROXY_PORT",
    ),
    "proxy-ca-wrong": Broken(
        lambda w: w.reversed_vpn(proxy_ca_file=str(w.stranger.ca)),
        "proxy-tls",
        r"TLS to proxy 127\.0\.0\.1:\d+ \(mTLS\) failed \(server name 127\.0\.0\.1\): certificate verify failed",
        "the proxy's certificate is not signed by a CA in the proxy CA file",
        "PYFORWARD_PROXY_CA_FILE",
    ),
    "proxy-client-cert-missing": Broken(
        lambda w: w.reversed_vpn(proxy_cert_file=None, proxy_key_file=None),
        "proxy-tls",
        r"proxy 127\.0\.0\.1:\d+ \(TLS\) .*(no client certificate configured|certificate required)",
        "the proxy requires a client certificate (mTLS) and none is configured",
        "PYFORWARD_PROXY_CERT_FILE",
    ),
    "proxy-client-cert-wrong": Broken(
        lambda w: w.reversed_vpn(
            proxy_cert_file=str(w.stranger.client_cert), proxy_key_file=str(w.stranger.client_key)
        ),
        "proxy-tls",
        r"proxy 127\.0\.0\.1:\d+ \(mTLS\) .*(client certificate|unknown ca)",
        "the proxy does not accept our client certificate",
        "PYFORWARD_PROXY_CERT_FILE",
    ),
    "proxy-ca-file-not-pem": Broken(
        lambda w: w.reversed_vpn(proxy_ca_file=str(w.not_pem)),
        "certificates",
        r"proxy TLS \(PYFORWARD_PROXY_CA_FILE\): bad PEM in proxy tls CA \S+/not-pem\.crt: ",
        "a certificate or key file cannot be read, is not PEM",
        "PYFORWARD_PROXY_CA_FILE",
    ),
    "proxy-forbids-the-port-403": Broken(
        lambda w: w.plain_proxy(w.forbidding),
        "connect-request",
        r"answered CONNECT 127\.0\.0\.1:\d+ with 403 Access violation$",
        "the proxy does not allow a tunnel to this destination",
        "PYFORWARD_PORT",
    ),
    "proxy-wants-credentials-407": Broken(
        lambda w: w.plain_proxy(w.with_auth),
        "connect-request",
        r"with 407 Proxy Authentication Required \(no credentials configured\)$",
        "the proxy requires credentials (Proxy-Authorization) and none are configured",
        "PYFORWARD_PROXY_USERNAME, PYFORWARD_PROXY_PASSWORD",
    ),
    "proxy-credentials-wrong": Broken(
        lambda w: w.plain_proxy(w.with_auth, proxy_username="shipper", proxy_password="not-the-pass"),
        "connect-request",
        r"with (401 Unauthorized|407 Proxy Authentication Required \(credentials rejected\))$",
        "the proxy rejected the credentials",
        "PYFORWARD_PROXY_PASSWORD",
    ),
    "receiver-down-behind-the-proxy": Broken(
        lambda w: w.konnectivity(port=str(w.dead)),
        "connect-request",
        r"answered CONNECT 127\.0\.0\.1:\d+ with 5\d\d ",
        "the proxy works but cannot reach the receiver",
        "PYFORWARD_HOST, PYFORWARD_PORT",
    ),
    "receiver-ca-wrong": Broken(
        lambda w: w.konnectivity(tls_ca_file=str(w.stranger.ca)),
        "tls",
        r"TLS to receiver 127\.0\.0\.1:\d+ through proxy unix:\S+ failed \(server name localhost\): "
        r"certificate verify failed",
        "the receiver's certificate is not signed by a CA in the receiver CA file",
        "PYFORWARD_TLS_CA_FILE",
    ),
    "receiver-server-name-wrong": Broken(
        lambda w: w.reversed_vpn(tls_server_name="kubernetes-audit-tailer"),
        "tls",
        r"\(server name kubernetes-audit-tailer\): certificate verify failed: Hostname mismatch",
        "the receiver's certificate does not carry the name pyforward checks",
        "PYFORWARD_TLS_SERVER_NAME",
    ),
    "receiver-client-cert-wrong": Broken(
        lambda w: w.konnectivity(tls_cert_file=str(w.stranger.client_cert), tls_key_file=str(w.stranger.client_key)),
        "tls",
        r"receiver 127\.0\.0\.1:\d+ through proxy unix:\S+ ended the TLS session before sending anything",
        "the receiver does not accept our client certificate",
        "PYFORWARD_TLS_CERT_FILE",
    ),
    "shared-key-wrong": Broken(
        lambda w: w.reversed_vpn(shared_key="not-the-key"),
        "handshake",
        r"the receiver refused: shared_key mismatch$",
        "the shared key differs from the receiver's",
        "PYFORWARD_SHARED_KEY",
    ),
    "shared-key-missing": Broken(
        lambda w: w.konnectivity(shared_key=None),
        "handshake",
        r"the receiver sent HELO: it requires a shared key, and none is configured$",
        "the receiver wants one and none is configured",
        "PYFORWARD_SHARED_KEY",
    ),
    "receiver-down-direct": Broken(
        lambda w: w.env(port=str(w.dead)),
        "connect",
        r"cannot connect to receiver 127\.0\.0\.1:\d+: connection refused$",
        "the receiver cannot be reached at that address",
        "PYFORWARD_HOST, PYFORWARD_PORT",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_setting_names_the_step_the_cause_and_the_setting(world: World, case: str) -> None:
    broken = BROKEN[case]
    result = check(broken.env(world), "--probe")
    assert result.code == 1, result.out
    statuses = [status for status, _ in result.steps]
    assert statuses.count("FAIL") == 1, result.out
    assert result.steps[-1] == ("FAIL", broken.step), result.out  # the walk stops at the first failure
    fail = result.line("FAIL")
    assert re.search(broken.error, fail), f"{broken.error!r} not in: {fail}"
    cause = result.line("likely cause:")
    assert broken.cause in cause, result.out
    settings = result.line("settings:")
    assert broken.setting in settings, result.out
    assert "all steps passed" not in result.out
