"""Real HTTP CONNECT proxies for tests: tinyproxy, and socat fronts in the two production shapes.

* :class:`Tinyproxy` -- tinyproxy with a generated config: ``ConnectPort`` (the ports CONNECT may reach; others
  get ``403 Access violation``), ``Allow`` and optional ``BasicAuth`` (``407`` without credentials). Its log
  (LogLevel Info) lists every CONNECT it was asked for: :meth:`Tinyproxy.requests`.
* :class:`UnixFront` -- konnectivity's shape: ``socat UNIX-LISTEN:<path>,fork -> TCP:<tinyproxy>``, so the
  proxy is reached over a Unix socket (PYFORWARD_PROXY_UDS).
* :class:`MTLSFront` -- Gardener's reversed VPN (vpn-seed-server:9443): ``socat OPENSSL-LISTEN`` with a server
  certificate and client-certificate verification -> ``TCP:<tinyproxy>``; the receiver's TLS then runs inside.

Every proxy is a process in its own session (socat forks a child per connection: stopping the group ends
those too). ``start()`` waits until the proxy accepts connections (never a sleep), failing early with the
proxy's output when it exits. ``kill()`` / ``stop()`` and ``start()`` again keep the same port or socket path,
so a test can take the proxy away mid-stream and bring it back; settings changed in between (``configure``,
``client_ca``) take effect at that next start.

Use the ``proxies`` fixture of tests/integration/conftest.py, or :func:`proxies_at` in another suite::

    tiny = proxies.tinyproxy([receiver.port])               # started; tiny.port
    uds = proxies.unix_front(tiny)                          # uds.path
    vpn = proxies.mtls_front(tiny, proxy_certs)             # vpn.port; trusts proxy_certs.ca for clients
    tiny.kill(); ...; tiny.start()                          # same port
    tiny.configure(connect_ports=[other]); tiny.restart()   # now 403 for the receiver
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CertFiles, free_port
from tests.harness import _ALL, _popen

__all__ = [
    "MTLSFront",
    "Proxies",
    "ProxyProcess",
    "Tinyproxy",
    "UnixFront",
    "connectable",
    "proxies_at",
    "require",
]

#: How long a proxy may take to accept connections after it was started (a busy 2-core machine).
READY_TIMEOUT = 15.0
_REQUEST = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/")


def require(binary: str) -> str:
    """The path of ``binary``; fails the test (not a skip: CI must have it) when it is not installed."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed (apt-get install tinyproxy socat)")
    return path


def connectable(family: int, address: str | tuple[str, int]) -> bool:
    """Whether a stream connection to ``address`` succeeds now (the connection is closed at once)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(address)
        except OSError:
            return False
        return True


class ProxyProcess:
    """One proxy process, restartable on the same address. Subclasses give ``argv`` and ``_ready``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        #: stdout and stderr of every start, appended.
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _before_start(self) -> None:
        """Hook: write config files etc."""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT) -> ProxyProcess:
        """Start and wait until it accepts connections (fails with its output if it exits or times out)."""
        assert not self.alive, f"{self.name} is already running"
        self._before_start()
        with self.log.open("ab") as out:
            self.proc = _popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} not accepting connections after {timeout:g} s: {self.output()}")
            time.sleep(0.005)  # polling interval of a condition wait
        return self

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        # Only while the leader lives: once it is reaped its id may belong to someone else.
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the process group (SIGKILL when it does not exit in time). Idempotent."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout)
        _ALL.discard(self.proc)

    def kill(self) -> None:
        """SIGKILL to the process group: the proxy and every connection through it vanish at once."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(10)
        _ALL.discard(self.proc)

    def restart(self) -> ProxyProcess:
        """Stop (gracefully) and start again on the same address, with the current settings."""
        self.stop()
        return self.start()

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        state = "running" if self.alive else f"exited {self.proc.returncode if self.proc else None}"
        return f"{self.name} ({state}, {self.starts} start(s)); log tail:\n{self.output(1200)}"


def _upstream_port(upstream: int | ProxyProcess) -> int:
    port = getattr(upstream, "port", upstream)
    if not isinstance(port, int):
        raise TypeError(f"cannot forward to {upstream!r}: give a port or a TCP proxy")
    return port


class Tinyproxy(ProxyProcess):
    """tinyproxy on 127.0.0.1:``port`` (a free port unless given); its config is written at every start."""

    def __init__(
        self,
        directory: Path,
        connect_ports: list[int],
        *,
        basic_auth: tuple[str, str] | None = None,
        allow: str = "127.0.0.1",
        port: int | None = None,
        name: str = "tinyproxy",
    ) -> None:
        super().__init__(directory, name)
        self.binary = require("tinyproxy")
        self.port = port if port is not None else free_port()
        self.conf = directory / f"{name}.conf"
        self.connect_ports = list(connect_ports)
        self.basic_auth = basic_auth
        self.allow = allow

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def configure(
        self,
        *,
        connect_ports: list[int] | None = None,
        basic_auth: tuple[str, str] | None = None,
        no_auth: bool = False,
        allow: str | None = None,
    ) -> Tinyproxy:
        """Change the config for the next start; what is not given stays (``no_auth=True`` drops BasicAuth)."""
        if connect_ports is not None:
            self.connect_ports = list(connect_ports)
        if basic_auth is not None:
            self.basic_auth = basic_auth
        if no_auth:
            self.basic_auth = None
        if allow is not None:
            self.allow = allow
        return self

    def _before_start(self) -> None:
        # Without any ConnectPort line tinyproxy allows every port: a test's list is always explicit.
        assert self.connect_ports, "tinyproxy needs at least one ConnectPort"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "MaxClients 50",
            f"Allow {self.allow}",
            "LogLevel Info",
            *(f"ConnectPort {p}" for p in self.connect_ports),
        ]
        if self.basic_auth is not None:
            lines.append(f"BasicAuth {self.basic_auth[0]} {self.basic_auth[1]}")
        self.conf.write_text("\n".join(lines) + "\n")

    def argv(self) -> list[str]:
        return [self.binary, "-d", "-c", str(self.conf)]

    def _ready(self) -> bool:
        return connectable(socket.AF_INET, ("127.0.0.1", self.port))

    def requests(self) -> list[str]:
        """The targets (``host:port``) of every CONNECT tinyproxy was asked for, over all starts, in order."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return _REQUEST.findall(text)


class UnixFront(ProxyProcess):
    """konnectivity's shape: a Unix socket at ``path`` forwarding to a TCP proxy (socat UNIX-LISTEN, fork)."""

    def __init__(self, directory: Path, upstream: int | ProxyProcess, *, name: str = "konnectivity") -> None:
        super().__init__(directory, name)
        self.binary = require("socat")
        self.upstream = upstream
        self.path = str(directory / f"{name}.sock")

    def argv(self) -> list[str]:
        # unlink-early: a SIGKILLed socat leaves its socket file behind; the restart replaces it.
        return [
            self.binary,
            f"UNIX-LISTEN:{self.path},fork,unlink-early",
            f"TCP:127.0.0.1:{_upstream_port(self.upstream)}",
        ]

    def _ready(self) -> bool:
        return os.path.exists(self.path) and connectable(socket.AF_UNIX, self.path)


class MTLSFront(ProxyProcess):
    """The reversed VPN's shape: mTLS on 127.0.0.1:``port`` forwarding to a TCP proxy.

    It serves ``cert``/``key`` and verifies client certificates against ``client_ca`` (from the ``certs``
    given: server cert, server key, CA). Assign new paths and :meth:`restart` to rotate what it trusts.
    """

    def __init__(
        self,
        directory: Path,
        upstream: int | ProxyProcess,
        certs: CertFiles,
        *,
        port: int | None = None,
        name: str = "vpn",
    ) -> None:
        super().__init__(directory, name)
        self.binary = require("socat")
        self.upstream = upstream
        self.port = port if port is not None else free_port()
        self.cert: Path = certs.server_cert
        self.key: Path = certs.server_key
        self.client_ca: Path = certs.ca

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        listen = (
            f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,cert={self.cert},"
            f"key={self.key},cafile={self.client_ca},verify=1"
        )
        return [self.binary, listen, f"TCP:127.0.0.1:{_upstream_port(self.upstream)}"]

    def _ready(self) -> bool:
        return connectable(socket.AF_INET, ("127.0.0.1", self.port))


class Proxies:
    """Starts proxies under ``directory`` and stops them all in :meth:`stop` (newest first)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started: list[ProxyProcess] = []

    def _name(self, base: str) -> str:
        return f"{base}{len(self.started) + 1}"

    def tinyproxy(
        self,
        connect_ports: list[int],
        *,
        basic_auth: tuple[str, str] | None = None,
        allow: str = "127.0.0.1",
        start: bool = True,
    ) -> Tinyproxy:
        """A tinyproxy allowing CONNECT to ``connect_ports`` only (started unless ``start=False``)."""
        proxy = Tinyproxy(self.dir, connect_ports, basic_auth=basic_auth, allow=allow, name=self._name("tinyproxy"))
        self.started.append(proxy)
        if start:
            proxy.start()
        return proxy

    def unix_front(self, upstream: int | ProxyProcess, *, start: bool = True) -> UnixFront:
        """konnectivity: a Unix socket in front of ``upstream`` (a port or a :class:`Tinyproxy`)."""
        front = UnixFront(self.dir, upstream, name=self._name("konnectivity"))
        self.started.append(front)
        if start:
            front.start()
        return front

    def mtls_front(self, upstream: int | ProxyProcess, certs: CertFiles, *, start: bool = True) -> MTLSFront:
        """Reversed VPN: mTLS with ``certs`` (server cert; its CA verifies clients) in front of ``upstream``."""
        front = MTLSFront(self.dir, upstream, certs, name=self._name("vpn"))
        self.started.append(front)
        if start:
            front.start()
        return front

    def stop(self) -> None:
        for proxy in reversed(self.started):
            proxy.stop()

    def describe(self) -> str:
        return "\n".join(proxy.describe() for proxy in self.started)


@contextlib.contextmanager
def proxies_at(directory: Path) -> Iterator[Proxies]:
    """:class:`Proxies` under ``directory``, every proxy stopped on exit (also when the test fails)."""
    proxies = Proxies(directory)
    try:
        yield proxies
    finally:
        proxies.stop()
