"""Fault injectors for the chaos suite: scripted receivers, a pausable TCP relay, tinyproxy, unprivileged runs.

Everything here runs on 127.0.0.1 only, is bounded in time, and stops with the test (fixture teardown):

* :class:`ScriptedReceiver` -- a Forward receiver in a thread of the test process (pyforward.protocol's
  ServerDecoder / encode_ack) that misbehaves on purpose: closes before acking every N-th chunk, never acks,
  acks slowly, answers garbage or unknown chunk ids, sends a PONG with a wrong digest. Its behaviour can be
  changed while it runs (the tests heal it to show that everything arrives afterwards).
* :class:`Relay` -- a TCP relay that can stop forwarding bytes while keeping every connection open (a stalled
  network path), and be killed and restarted on the same port.
* :func:`unprivileged_run` -- `pyforward run` without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv), so that
  file permissions apply to it although the tests run as root.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyforward.protocol import (
    Ping,
    Pong,
    Request,
    ServerDecoder,
    encode_ack,
    encode_helo,
    encode_pong,
    make_helo,
    make_pong,
)
from tests.harness import PYTHON, Harness, ReceiverProcess, RunProcess, _popen, wait_for

T = TypeVar("T")

#: Scenario sizes: "ci" runs in every test run; "long" only with --long (the slow marker).
MODES = [
    pytest.param("ci", id="ci"),
    pytest.param("long", id="long", marks=[pytest.mark.slow, pytest.mark.timeout(1800)]),
]

#: How long a scripted receiver waits on a socket before it gives up on a stuck peer (bounded tests).
_PEER_TIMEOUT = 60.0


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...) in KiB; 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class _LoopThread:
    """An asyncio loop in a daemon thread; coroutines are run on it from the test's thread."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def soon(self, fn: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()


# ------------------------------------------------------------------------------------------------ receivers


class ScriptedReceiver(_LoopThread):
    """A Forward receiver with a scripted misbehaviour. Attributes may be changed while it runs.

    Every record of every request it decodes is counted by auditID in :attr:`counts` *before* it decides whether
    to ack: the worst case for duplicates (a receiver that wrote the events and then failed to ack them).

    * ``close_every`` -- abort the connection instead of acking every N-th request (0: never);
    * ``ack`` -- False: never ack (the client must time out, reconnect and resend);
    * ``ack_delay`` -- seconds to wait before each ack (a slow receiver);
    * ``answer`` -- request -> bytes sent instead of the ack (garbage, an ack for an unknown chunk id);
    * ``shared_key`` -- HELO/PING/PONG handshake first; ``pong`` may tamper with the PONG (wrong digest).
    """

    def __init__(
        self,
        *,
        close_every: int = 0,
        ack: bool = True,
        ack_delay: float = 0.0,
        answer: Callable[[Request], bytes] | None = None,
        shared_key: str | None = None,
        pong: Callable[[Pong], Pong] | None = None,
        hostname: str = "scripted-receiver",
        context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__("scripted-receiver")
        self.close_every = close_every
        self.ack = ack
        self.ack_delay = ack_delay
        self.answer = answer
        self.shared_key = shared_key
        self.pong = pong
        self.hostname = hostname
        self.context = context
        self.counts: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.requests = 0
        self.acks = 0
        self.answers = 0  # scripted answers sent instead of acks
        self.closed_before_ack = 0  # connections aborted by close_every
        self.unacked_at_close = 0  # connections that ended with requests received but not acked (a fault)
        self.max_records = 0  # most records in one request
        self.max_unacked = 0  # most requests seen on one connection without an ack: the client's window at work
        self.data_before_auth = 0  # requests received on a connection whose handshake had not succeeded
        self.pings = 0
        self.errors: list[str] = []
        self.port = 0
        self._lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self, port: int = 0) -> ScriptedReceiver:
        self.port = self.call(self._start(port))
        return self

    async def _start(self, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, ssl=self.context, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.counts)

    def has_all(self, ids: list[str]) -> bool:
        with self._lock:
            return all(i in self.counts for i in ids)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        decoder = ServerDecoder()
        unacked = 0
        authed = self.shared_key is None
        helo = None
        if self.shared_key is not None:
            helo = make_helo(user_auth=False)
            writer.write(encode_helo(helo))
        try:
            while True:
                data = await asyncio.wait_for(reader.read(1 << 16), _PEER_TIMEOUT)
                if not data:
                    return
                for event in decoder.feed(data):
                    if isinstance(event, Ping):
                        self.pings += 1
                        assert helo is not None
                        assert self.shared_key is not None
                        pong = make_pong(
                            event, ok=True, reason="", nonce=helo.nonce, hostname=self.hostname,
                            shared_key=self.shared_key,
                        )  # fmt: skip
                        if self.pong is not None:
                            pong = self.pong(pong)
                        writer.write(encode_pong(pong))
                        authed = True
                        continue
                    if not isinstance(event, Request):
                        continue
                    if not authed:
                        self.data_before_auth += 1
                    with self._lock:
                        for entry in event.entries:
                            audit = entry.record.get("auditID")
                            if isinstance(audit, str):
                                self.counts[audit] += 1
                    self.requests += 1
                    self.max_records = max(self.max_records, len(event.entries))
                    unacked += 1
                    self.max_unacked = max(self.max_unacked, unacked)
                    if self.close_every and self.requests % self.close_every == 0:
                        self.closed_before_ack += 1
                        writer.transport.abort()
                        return
                    if not self.ack or event.chunk is None:
                        continue
                    if self.ack_delay:
                        await asyncio.sleep(self.ack_delay)  # the scripted slowness itself, not synchronisation
                    if self.answer is not None:
                        writer.write(self.answer(event))
                        self.answers += 1
                        continue
                    writer.write(encode_ack(event.chunk))
                    self.acks += 1
                    unacked -= 1
                await writer.drain()
        except (OSError, TimeoutError, asyncio.CancelledError):
            return
        except Exception as exc:  # a ProtocolError from the client is a client bug: the tests assert none
            self.errors.append(repr(exc))
        finally:
            if unacked:
                self.unacked_at_close += 1
            self._writers.discard(writer)
            writer.transport.abort()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        with contextlib.suppress(Exception):
            self.call(close(), 10)
        self.shutdown()

    def describe(self) -> str:
        return (
            f"scripted receiver: {self.connections} connections, {self.requests} requests, {self.acks} acks, "
            f"{self.answers} scripted answers, {self.closed_before_ack} closed before ack, {self.unacked_at_close} "
            f"ended unacked, window seen {self.max_unacked}, {self.data_before_auth} before auth, {self.pings} pings"
        )


def wrong_digest(pong: Pong) -> Pong:
    return replace(pong, shared_key_digest=b"0" * len(pong.shared_key_digest))


# ------------------------------------------------------------------------------------------------ network path


class Relay(_LoopThread):
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:upstream that can stall (stop forwarding, keep the connections
    open) and be killed (every connection reset) and restarted on the same port."""

    def __init__(self, upstream: int) -> None:
        super().__init__("relay")
        self.upstream = upstream
        self.port = 0
        self.connections = 0
        self.forwarded = 0  # bytes
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None

    def start(self) -> Relay:
        self.port = self.call(self._start())
        return self

    async def _start(self) -> int:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(1 << 16)
                await self._flowing.wait()  # stalled: hold the bytes, read nothing more, keep the socket open
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                self.forwarded += len(data)
        except OSError:
            writer.transport.abort()

    def pause(self) -> None:
        assert self._flowing is not None
        self.soon(self._flowing.clear)

    def resume(self) -> None:
        assert self._flowing is not None
        self.soon(self._flowing.set)

    def kill(self) -> None:
        """Reset every connection and stop listening (restart with :meth:`start`: same port)."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self.call(close())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
        self.shutdown()


# ------------------------------------------------------------------------------------------------ processes


SETPRIV = shutil.which("setpriv")
_DROP = "-dac_override,-dac_read_search"


class UnprivilegedRun(RunProcess):
    """`pyforward run` under ``setpriv`` without the two capabilities that let root ignore file permissions."""

    def start(self) -> UnprivilegedRun:
        assert SETPRIV is not None
        assert not self.alive, "already running"
        self._log_start = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        argv = [SETPRIV, "--inh-caps", _DROP, "--bounding-set", _DROP, "--", PYTHON, "-m", "pyforward", "run"]
        with self.stderr_path.open("ab") as err:
            self.proc = _popen([*argv, *self.args], env=self.env, stdout=subprocess.DEVNULL, stderr=err, cwd=self.cwd)
        self.starts += 1
        return self


def permissions_apply() -> str | None:
    """None when :class:`UnprivilegedRun` is subject to file permissions here, else why not (a skip reason)."""
    if SETPRIV is None:
        return "setpriv (util-linux) is not installed: cannot drop root's file-permission capabilities"
    if os.geteuid() != 0:
        return None
    probe = Path(f"/tmp/pyforward-perm-probe-{os.getpid()}")
    probe.write_text("x")
    probe.chmod(0)
    try:
        code = subprocess.run(
            [SETPRIV, "--inh-caps", _DROP, "--bounding-set", _DROP, "--", "cat", str(probe)],
            capture_output=True, timeout=30, check=False,
        ).returncode  # fmt: skip
    finally:
        probe.unlink()
    return None if code != 0 else "dropping CAP_DAC_OVERRIDE has no effect in this sandbox"


def unprivileged_run(harness: Harness, env: Mapping[str, str], *, start: bool = True) -> UnprivilegedRun:
    proc = UnprivilegedRun(env, harness.root / f"run{len(harness.runs) + 1}.stderr", cwd=harness.root)
    harness.runs.append(proc)
    if start:
        proc.start()
    return proc


def env_for(
    harness: Harness,
    receiver: ReceiverProcess | None = None,
    *,
    port: int | None = None,
    settings: Mapping[str, object] | None = None,
    **more: object,
) -> dict[str, str]:
    """:meth:`Harness.run_env` with the settings of a scenario (a mapping) and more as keywords."""
    env = harness.run_env(receiver, port=port)
    for name, value in {**(settings or {}), **more}.items():
        env[f"PYFORWARD_{name.upper()}"] = str(value)
    return env


def at_least(read: Callable[[], float], value: float) -> Callable[[], bool]:
    """A predicate for wait_for: ``read()`` has reached ``value``."""
    return lambda: read() >= value


def wait_counter(read: Callable[[], float], at_least: float, timeout: float, what: str) -> float:
    value = wait_for(lambda: (v if (v := read()) >= at_least else None), timeout, what=what)
    return float(value)
