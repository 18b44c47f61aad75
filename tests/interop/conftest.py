"""Fixtures for interop tests: real processes of independent Forward implementations and of pyforward.

* node: `@fluent-org/logger` (client and FluentServer), pinned in tests/interop/node/package-lock.json and
  installed with `npm ci` on first use (once per machine, under a file lock so xdist workers do not race).
* pyforward: `python -m pyforward receive` / `send` as child processes.

Synchronisation is always a line on a pipe or a condition polled with a deadline, never a sleep.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import pytest

NODE_DIR = Path(__file__).parent / "node"
DEADLINE = 30.0


def rfc3339(seconds: int, nanoseconds: int) -> str:
    """The receiver's "full" output time format."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanoseconds:09d}Z"


class Proc:
    """A child process whose stdout and stderr lines are collected by threads (pipes never fill up)."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, pipe: IO[bytes] | None, lines: list[str]) -> None:
        assert pipe is not None
        for raw in pipe:
            with self._changed:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "a condition") -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AssertionError(
                        f"timed out waiting for {what} from {' '.join(self.argv[:4])}...; "
                        f"exit code {self.proc.poll()}; stderr: {self.stderr[-20:]}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_stderr(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in self.stderr:
                if match := regex.search(line):
                    return match
            return None

        result: re.Match[str] = self.wait_for(found, timeout, f"stderr line /{pattern}/")
        return result

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for thread in self._threads:
            thread.join(5)
        return code


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(argv: Sequence[str], **kwargs: Any) -> Proc:
        proc = Proc(argv, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(Exception):
            proc.stop()


# ------------------------------------------------------------------------------------------------ node


@pytest.fixture(scope="session")
def node() -> Path:
    """The node directory with @fluent-org/logger installed (npm ci on first use); skip without node."""
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.skip("node is not installed: interop tests need node >= 18 and npm (Debian: apt-get install nodejs npm)")
    installed = NODE_DIR / "node_modules" / "@fluent-org" / "logger" / "package.json"
    if not installed.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot install @fluent-org/logger (Debian: apt-get install npm)")
        with open(NODE_DIR / ".install.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker installs, the others wait
            if not installed.exists():
                result = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                    cwd=NODE_DIR,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    stdin=subprocess.DEVNULL,
                )
                if result.returncode != 0:
                    pytest.fail(f"npm ci in {NODE_DIR} failed: {result.stderr.strip()[-2000:]}")
    version = orjson.loads(installed.read_bytes())["version"]
    assert version == "1.0.10", f"@fluent-org/logger {version} installed, the tests pin 1.0.10 (rm -r node_modules)"
    return NODE_DIR


def run_node_client(node: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(node / "client.js"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class NodeServer:
    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        match = proc.wait_stderr(r"fluent-server: listening on (\S+):(\d+) \((\w+)\)")
        self.port = int(match.group(2))
        self.mode = match.group(3)

    def entries(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in list(self.proc.stdout) if line.strip()]

    def wait_entries(self, count: int, timeout: float = DEADLINE) -> list[dict[str, Any]]:
        self.proc.wait_for(lambda: len(self.proc.stdout) >= count, timeout, f"{count} entries")
        return self.entries()


@pytest.fixture
def node_server(node: Path, procs: Callable[..., Proc]) -> Callable[..., NodeServer]:
    def start(*args: str) -> NodeServer:
        return NodeServer(procs(["node", str(node / "server.js"), "--port", "0", *args]))

    return start


# ------------------------------------------------------------------------------------------------ pyforward


class PyforwardReceiver:
    def __init__(self, proc: Proc, output: Path) -> None:
        self.proc = proc
        self.output = output
        match = proc.wait_stderr(r"^pyforward receive: listening on (\S+):(\d+) \((\w+)\)$")
        self.port = int(match.group(2))
        self.mode = match.group(3)

    def lines(self) -> list[dict[str, Any]]:
        if not self.output.exists():
            return []
        return [orjson.loads(line) for line in self.output.read_bytes().splitlines()]

    def wait_lines(self, count: int, timeout: float = DEADLINE) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                raise AssertionError(f"{len(lines)} of {count} lines arrived; stderr: {self.proc.stderr[-20:]}")
            time.sleep(0.02)  # polling a file with a deadline


@pytest.fixture
def pyforward_receiver(tmp_path: Path, procs: Callable[..., Proc]) -> Callable[..., PyforwardReceiver]:
    counter = iter(range(1000))

    def start(*args: str, env: dict[str, str] | None = None) -> PyforwardReceiver:
        output = tmp_path / f"received-{next(counter)}.jsonl"
        argv = [sys.executable, "-m", "pyforward", "receive", "--bind", "127.0.0.1:0", "--format", "full"]
        return PyforwardReceiver(procs([*argv, "--output", str(output), *args], env=env), output)

    return start


def pyforward_send(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyforward", "send", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
