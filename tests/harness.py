"""End-to-end harness: real `pyforward receive` and `pyforward run` processes, real rotating audit logs.

Reused by the end-to-end suite (tests/integration/test_run*.py), the chaos tests and the benchmarks:

* :class:`ReceiverProcess` -- ``python -m pyforward receive`` (plain, TLS or mTLS) writing to a file, bound to
  port 0 (the port is parsed from its ``listening on HOST:PORT`` stderr line) and restartable on the same port;
  its stderr is drained by a thread so that it never blocks on a full pipe.
* :class:`RunProcess` -- ``python -m pyforward run`` with a given environment (``PYFORWARD_*``,
  ``PYFORWARD_LOG_FORMAT=json``), stderr appended to a file and parsed as JSON log lines.
* :class:`AuditWriter` -- writes generated audit events through :class:`pyforward.auditgen.RotatingAuditLog`
  and remembers every auditID written, in order, with its line.
* :class:`ReceivedIds` -- incremental ``Counter`` of auditIDs in a receiver output (re-reads only new bytes).
* :func:`wait_for` -- poll a predicate with a deadline (never sleep as synchronisation).
* :func:`delivery` / :func:`assert_delivered` -- lost, duplicated and unexpected auditIDs.
* :class:`Harness` (fixture ``harness`` in tests/integration/conftest.py) -- starts everything under one
  temporary directory and stops every process in teardown, also when the test fails.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pyforward.auditgen import RotatingAuditLog, audit_id, generate_events
from tests.conftest import CertFiles, free_port, write_certs

T = TypeVar("T")

PYTHON = sys.executable
LISTENING = re.compile(r"listening on (\S+):(\d+)")
#: How long a process may take to start (imports on a busy 2-core CI machine) or to stop after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

ReceiverMode = Literal["plain", "tls", "mtls"]

# Every process started by this module, so that nothing outlives the test session even if a fixture's
# teardown never ran (an interpreter exit in the middle of a test).
_ALL: set[subprocess.Popen[bytes]] = set()


def _kill_all() -> None:
    for proc in list(_ALL):
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)


atexit.register(_kill_all)


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
    _ALL.add(proc)
    return proc


def _stop_proc(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Signal (if still running), wait; SIGKILL when it does not exit in time. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            proc.send_signal(sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    _ALL.discard(proc)
    return code


def _proc_state(pid: int) -> str:
    """The state letter of a process (R, S, T for stopped, Z, ...) from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0]


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` (SigCgt in /proc/PID/status); False once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


# ------------------------------------------------------------------------------------------------ waiting


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 30.0,
    *,
    what: str = "a condition",
    interval: float = 0.02,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (AssertionError).

    The predicate may raise (e.g. a process died): that ends the wait at once. ``diagnostics`` is called only
    on timeout, to say what the processes were doing.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            more = f"\n{diagnostics()}" if diagnostics is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{more}")
        time.sleep(interval)  # the polling interval of a condition wait, not synchronisation


def holds_for(predicate: Callable[[], object], duration: float, *, what: str, interval: float = 0.02) -> None:
    """Assert that ``predicate`` stays true during an observation window (for "X must not happen")."""
    deadline = time.monotonic() + duration
    while True:
        assert predicate(), f"no longer true: {what}"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------ output


class ReceivedIds:
    """auditIDs in a receiver's output file, counted incrementally (only complete lines, only new bytes).

    Lines without an auditID (``{"log": ...}`` records) are kept in :attr:`other` as raw lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: collections.Counter[str] = collections.Counter()
        self.other: list[bytes] = []
        self.lines = 0
        self._offset = 0

    def refresh(self) -> collections.Counter[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.counts
        end = data.rfind(b"\n") + 1  # a line being written is counted once it is complete
        for line in data[:end].splitlines():
            self.lines += 1
            try:
                self.counts[audit_id(line)] += 1
            except ValueError:
                self.other.append(line)
        self._offset += end
        return self.counts

    def recount(self) -> collections.Counter[str]:
        """Count again from the start: a receiver's start-up may cut its output back (receiver/recovery.py), so
        the bytes counted so far may be gone or written again."""
        self.counts.clear()
        self.other.clear()
        self.lines = self._offset = 0
        return self.refresh()

    def torn(self) -> list[bytes]:
        """Output lines that are not one JSON document each (a torn line joined onto the next one), and the
        unterminated end of the file, if any (their first 80 bytes)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        end = data.rfind(b"\n") + 1
        broken = [data[end : end + 80]] if end < len(data) else []
        for line in data[:end].splitlines():
            try:
                json.loads(line)
            except ValueError:
                broken.append(line[:80])
        return broken

    def records(self) -> list[dict[str, Any]]:
        """Every complete output line, parsed (slow: for small outputs)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]

    def has_all(self, ids: Iterable[str]) -> bool:
        counts = self.refresh()
        return all(i in counts for i in ids)


def received_ids(output: Path) -> collections.Counter[str]:
    """auditID -> how many times it is in the receiver output ``output``."""
    return ReceivedIds(output).refresh()


@dataclass
class Delivery:
    """What arrived compared with what was written."""

    lost: list[str]
    duplicates: dict[str, int]  # auditID -> extra copies
    unexpected: list[str]

    @property
    def duplicated(self) -> int:
        return sum(self.duplicates.values())

    def describe(self) -> str:
        def sample(items: Iterable[str]) -> str:
            items = list(items)
            return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")

        return (
            f"lost {len(self.lost)} [{sample(self.lost)}], duplicated {self.duplicated} "
            f"[{sample(self.duplicates)}], unexpected {len(self.unexpected)} [{sample(self.unexpected)}]"
        )


def delivery(expected: Iterable[str], received: Mapping[str, int]) -> Delivery:
    expected_list = list(expected)
    wanted = set(expected_list)
    assert len(wanted) == len(expected_list), "the test wrote an auditID twice"
    return Delivery(
        lost=[i for i in expected_list if received.get(i, 0) == 0],
        duplicates={i: n - 1 for i, n in received.items() if n > 1},
        unexpected=sorted(i for i in received if i not in wanted),
    )


def assert_delivered(
    expected: Iterable[str], received: Mapping[str, int], *, max_duplicates: int = 0, context: str = ""
) -> Delivery:
    """Every expected auditID arrived, nothing else did, and at most ``max_duplicates`` extra copies."""
    result = delivery(expected, received)
    message = f"{context}{': ' if context else ''}{result.describe()} (allowed duplicates: {max_duplicates})"
    assert not result.lost, message
    assert not result.unexpected, message
    assert result.duplicated <= max_duplicates, message
    return result


# ------------------------------------------------------------------------------------------------ audit log


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AuditWriter:
    """Generated audit events into a :class:`RotatingAuditLog`; every line written is remembered in order.

    Each :meth:`write` call uses its own auditID prefix, so IDs are unique across calls and across writers with
    different ``prefix``.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 1 << 40,
        compress: bool = False,
        max_backups: int | None = None,
        prefix: str = "e",
        mill: bool = False,
    ) -> None:
        self.path = path
        # mill=True: retention and gzip asynchronously, as lumberjack does (RotatingAuditLog).
        self.log = RotatingAuditLog(path, max_bytes=max_bytes, compress=compress, max_backups=max_backups, mill=mill)
        self.prefix = prefix
        self.lines: list[bytes] = []  # in write order, with their newline
        self.ids: list[str] = []
        self._batches = 0

    def events(self, count: int) -> list[bytes]:
        """The next ``count`` events (not written yet)."""
        self._batches += 1
        batch = self._batches
        return list(generate_events(count, seed=batch, id_prefix=f"{self.prefix}{batch}-"))

    def write(self, count: int) -> list[str]:
        """Write ``count`` new events (rotating as needed); returns their auditIDs."""
        return self.write_lines(self.events(count))

    def write_lines(self, lines: list[bytes]) -> list[str]:
        self.log.write_many(lines)
        ids = [audit_id(line) for line in lines]
        self.lines.extend(line if line.endswith(b"\n") else line + b"\n" for line in lines)
        self.ids.extend(ids)
        return ids

    @property
    def rotations(self) -> int:
        return self.log.rotations

    def events_covered(self, checkpoint: Mapping[str, Any]) -> int:
        """How many of the events written (a prefix, in write order) lie before a checkpoint of `pyforward run`.

        The checkpoint names its file by the fingerprint of the file's first ``fp_len`` bytes (checkpoint.py); the
        lines of one file are contiguous in :attr:`lines`, so the file starts at the one line start where those
        bytes match, and the checkpoint's offset counts from there. Works for rotated and gzipped files alike.
        """
        lines = list(self.lines)  # a snapshot: another thread may be writing
        data = b"".join(lines)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))
        file = checkpoint["file"]
        fp_len, fp_hash, offset = int(file["fp_len"]), str(file["fp_hash"]), int(checkpoint["offset"])
        if fp_len == 0:
            assert offset == 0, f"checkpoint of an empty file at offset {offset}"
            return 0
        found = [i for i, start in enumerate(starts[:-1]) if _sha256(data[start : start + fp_len]) == fp_hash]
        assert len(found) == 1, f"checkpoint {checkpoint.get('path')} matches {len(found)} places in what was written"
        target = starts[found[0]] + offset
        index = bisect.bisect_left(starts, target)
        assert index < len(starts), f"checkpoint offset {offset} is beyond what was written"
        assert starts[index] == target, f"checkpoint offset {offset} is not at a line boundary"
        return index

    def close(self) -> None:
        self.log.close()


# ------------------------------------------------------------------------------------------------ processes


def _drain(pipe: IO[bytes], sink: list[str], ready: queue.Queue[str], log_file: Path | None) -> None:
    out = log_file.open("ab") if log_file is not None else None
    try:
        for raw in pipe:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)
            ready.put(line)
            if out is not None:
                out.write(raw)
                out.flush()
    finally:
        if out is not None:
            out.close()
        ready.put("")  # EOF


class ReceiverProcess:
    """``pyforward receive`` writing one JSON line per record to ``output``."""

    def __init__(
        self,
        workdir: Path,
        *,
        mode: ReceiverMode = "plain",
        certs: CertFiles | None = None,
        output: Path | None = None,
        extra_args: Iterable[str] = (),
        name: str = "receiver",
    ) -> None:
        if mode != "plain" and certs is None:
            raise ValueError("a TLS receiver needs certs")
        self.workdir = workdir
        self.mode = mode
        self.certs = certs
        self.output = output if output is not None else workdir / f"{name}.jsonl"
        self.extra_args = list(extra_args)
        self.name = name
        self.port = 0
        self.stderr_lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        argv = [PYTHON, "-m", "pyforward", "receive", "--bind", f"127.0.0.1:{self.port}", "--output", str(self.output)]
        if self.mode != "plain":
            assert self.certs is not None
            argv += ["--tls-cert", str(self.certs.server_cert), "--tls-key", str(self.certs.server_key)]
            if self.mode == "mtls":
                argv += ["--tls-ca", str(self.certs.ca)]
        return argv + self.extra_args

    def start(self, timeout: float = START_TIMEOUT) -> ReceiverProcess:
        """Start (on port 0 the first time, on the same port after that) and wait for the listening line."""
        assert not self.alive, "already running"
        self.proc = _popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.workdir)
        self.starts += 1
        ready: queue.Queue[str] = queue.Queue()
        assert self.proc.stderr is not None
        threading.Thread(
            target=_drain,
            args=(self.proc.stderr, self.stderr_lines, ready, self.workdir / f"{self.name}.stderr"),
            daemon=True,
        ).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = ready.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line:
                match = LISTENING.search(line)
                if match:
                    self.port = int(match.group(2))
                    return self
                continue
            # EOF or deadline
            code = _stop_proc(self.proc, signal.SIGKILL)
            raise AssertionError(
                f"{self.name} did not start (exit code {code}): {self.stderr_lines[-10:]}"
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        assert self.proc is not None
        return _stop_proc(self.proc, sig, timeout)

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: connections still reach the kernel's backlog, nothing is read, written or acked.

        Returns once the process is stopped (signals are delivered asynchronously)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: _proc_state(self.pid) in ("T", "t"), 10, what=f"{self.name} to be stopped")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def received(self) -> ReceivedIds:
        return ReceivedIds(self.output)

    def describe(self) -> str:
        state = "running" if self.alive else f"exited {self.proc.returncode if self.proc else None}"
        return f"{self.name} ({self.mode}, port {self.port}, {state}); stderr tail: {self.stderr_lines[-8:]}"


class RunProcess:
    """``pyforward run`` with ``env``; its stderr (JSON log lines) is appended to ``stderr_path``.

    ``start()`` may be called again after the process ended (a restart); :meth:`logs` then shows only the lines
    of the current process unless ``all_runs=True``.
    """

    def __init__(self, env: Mapping[str, str], stderr_path: Path, *, cwd: Path, args: Iterable[str] = ()) -> None:
        self.env = dict(env)
        self.stderr_path = stderr_path
        self.cwd = cwd
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_start = 0  # offset in stderr_path where the current process's lines begin

    def start(self) -> RunProcess:
        assert not self.alive, "already running"
        self._log_start = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        with self.stderr_path.open("ab") as err:
            self.proc = _popen(
                [PYTHON, "-m", "pyforward", "run", *self.args],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.cwd,
            )
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def check_alive(self) -> None:
        """Raise (ending a wait) when the process exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"pyforward run exited with {self.proc.returncode}; log tail:\n{self.tail()}")

    def wait_until(self, predicate: Callable[[], T | None], timeout: float = 30.0, *, what: str) -> T:
        """:func:`wait_for` that fails at once if this process exits meanwhile."""

        def check() -> T | None:
            self.check_alive()
            return predicate()

        return wait_for(check, timeout, what=what, diagnostics=self.tail)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pyforward run did not exit within {timeout}s; log tail:\n{self.tail()}") from None
        _ALL.discard(self.proc)
        return code

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait for the exit code (SIGKILL after ``timeout``).

        Waits first until the process handles SIGTERM (pyforward.__main__ installs a handler before the heavy
        imports): a SIGTERM while the interpreter itself starts (~30 ms) ends any Python program by the signal,
        and a test that stops a run it has just started (its events were delivered by the previous one) must not
        depend on how fast the interpreter starts."""
        assert self.proc is not None
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or _catches(proc.pid, signal.SIGTERM), START_TIMEOUT,
                 what="pyforward run to handle SIGTERM", diagnostics=self.tail)
        return _stop_proc(proc, signal.SIGTERM, timeout)

    def kill(self) -> int:
        assert self.proc is not None
        return _stop_proc(self.proc, signal.SIGKILL)

    # --- its log -------------------------------------------------------------------------------------------
    def stderr_text(self, *, all_runs: bool = False) -> str:
        try:
            data = self.stderr_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[0 if all_runs else self._log_start :].decode("utf-8", "replace")

    def logs(self, *, all_runs: bool = False) -> list[dict[str, Any]]:
        """The JSON log lines (complete ones); a line that is not JSON comes as ``{"raw": line}``."""
        text = self.stderr_text(all_runs=all_runs)
        out: list[dict[str, Any]] = []
        for line in text[: text.rfind("\n") + 1].splitlines():
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            out.append(parsed if isinstance(parsed, dict) else {"raw": line})
        return out

    def find_log(self, pattern: str, *, level: str | None = None, all_runs: bool = False) -> re.Match[str] | None:
        regex = re.compile(pattern)
        for entry in self.logs(all_runs=all_runs):
            if level is not None and entry.get("level") != level:
                continue
            match = regex.search(str(entry.get("msg", entry.get("raw", ""))))
            if match:
                return match
        return None

    def wait_log(self, pattern: str, *, level: str | None = None, timeout: float = 30.0) -> re.Match[str]:
        """Wait for a log line of the current process whose msg matches ``pattern`` (fails if it exits)."""

        def found() -> re.Match[str] | None:
            match = self.find_log(pattern, level=level)
            if match is None:
                self.check_alive()
            return match

        return wait_for(found, timeout, what=f"log line /{pattern}/", diagnostics=self.tail)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr_text(all_runs=True).splitlines()[-lines:])

    def open_files(self) -> list[str]:
        """Paths of the regular files the process has open ("... (deleted)" once unlinked)."""
        fd_dir = Path(f"/proc/{self.pid}/fd")
        found = []
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    found.append(os.readlink(fd))
        return found


def metrics(bind: str) -> dict[str, float]:
    """Scrape ``http://bind/metrics`` of `pyforward run` (PYFORWARD_METRICS_BIND): sample name -> value."""
    with urllib.request.urlopen(f"http://{bind}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def try_metrics(bind: str) -> dict[str, float]:
    """:func:`metrics`, or {} while the server is not up yet."""
    try:
        return metrics(bind)
    except OSError:
        return {}


# ------------------------------------------------------------------------------------------------ the fixture


@dataclass
class Harness:
    """One test's processes and files under ``root``; :meth:`close` stops every process (fixture teardown)."""

    root: Path
    receivers: list[ReceiverProcess] = field(default_factory=list)
    runs: list[RunProcess] = field(default_factory=list)
    writers: list[AuditWriter] = field(default_factory=list)
    _certs: CertFiles | None = None

    def __post_init__(self) -> None:
        self.logdir = self.root / "auditlog"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logdir / "audit.log"

    @property
    def checkpoint_path(self) -> Path:
        """Where `pyforward run` keeps its checkpoint by default (beside the log)."""
        return self.logdir / f".{self.log_path.name}.pyforward-checkpoint"

    @property
    def certs(self) -> CertFiles:
        if self._certs is None:
            self._certs = write_certs(self.root / "certs")
        return self._certs

    def receiver(
        self, mode: ReceiverMode = "plain", *, start: bool = True, port: int = 0, extra_args: Iterable[str] = ()
    ) -> ReceiverProcess:
        receiver = ReceiverProcess(
            self.root,
            mode=mode,
            certs=self.certs if mode != "plain" else None,
            extra_args=extra_args,
            name=f"receiver{len(self.receivers) + 1}",
        )
        receiver.port = port
        self.receivers.append(receiver)
        return receiver.start() if start else receiver

    def audit_log(self, **kwargs: Any) -> AuditWriter:
        writer = AuditWriter(self.log_path, **kwargs)
        self.writers.append(writer)
        return writer

    def run_env(
        self, receiver: ReceiverProcess | None = None, *, port: int | None = None, **settings: object
    ) -> dict[str, str]:
        """The environment of `pyforward run`: inherited env without PYFORWARD_*/AUDIT_* variables, then the
        test defaults (JSON logs, fast reconnects), then ``settings`` (name -> value, as PYFORWARD_<NAME>)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYFORWARD_", "AUDIT_"))}
        mode = receiver.mode if receiver is not None else "plain"
        env.update(
            {
                "PYFORWARD_LOG_PATH": str(self.log_path),
                "PYFORWARD_HOST": "127.0.0.1",
                "PYFORWARD_PORT": str(port if port is not None else receiver.port if receiver is not None else 0),
                "PYFORWARD_TLS": "false" if mode == "plain" else "true",
                "PYFORWARD_LOG_FORMAT": "json",
                "PYFORWARD_LOG_LEVEL": "info",
                "PYFORWARD_SELF_HOSTNAME": "pyforward-e2e",
                "PYFORWARD_BACKOFF_INITIAL": "0.05",
                "PYFORWARD_BACKOFF_MAX": "0.5",
                "PYFORWARD_ACK_TIMEOUT": "5",
                "PYFORWARD_CONNECT_TIMEOUT": "5",
                "PYFORWARD_SHUTDOWN_TIMEOUT": "10",
            }
        )
        if mode != "plain":
            env["PYFORWARD_TLS_CA_FILE"] = str(self.certs.ca)
            env["PYFORWARD_TLS_SERVER_NAME"] = "localhost"
        if mode == "mtls":
            env["PYFORWARD_TLS_CERT_FILE"] = str(self.certs.client_cert)
            env["PYFORWARD_TLS_KEY_FILE"] = str(self.certs.client_key)
        for name, value in settings.items():
            env[f"PYFORWARD_{name.upper()}"] = str(value)
        return env

    def run(self, env: Mapping[str, str], *, start: bool = True, args: Iterable[str] = ()) -> RunProcess:
        proc = RunProcess(env, self.root / f"run{len(self.runs) + 1}.stderr", cwd=self.root, args=args)
        self.runs.append(proc)
        return proc.start() if start else proc

    def wait_delivered(
        self,
        ids: Iterable[str],
        output: ReceivedIds,
        *,
        timeout: float = 60.0,
        run: RunProcess | None = None,
    ) -> collections.Counter[str]:
        """Wait until every auditID in ``ids`` is in ``output`` (fails early if ``run`` exits)."""
        wanted = list(ids)

        def done() -> bool:
            counts = output.refresh()
            if all(i in counts for i in wanted):
                return True
            if run is not None:
                run.check_alive()
            return False

        def diagnostics() -> str:
            missing = [i for i in wanted if i not in output.counts]
            return f"{len(missing)} of {len(wanted)} events not arrived (first: {missing[:3]})\n{self.describe()}"

        wait_for(done, timeout, what=f"{len(wanted)} events to arrive", diagnostics=diagnostics)
        return output.counts

    def describe(self) -> str:
        parts = [r.describe() for r in self.receivers]
        for i, run in enumerate(self.runs, 1):
            parts.append(f"run{i} ({'running' if run.alive else f'exited {run.returncode}'}), log tail:\n{run.tail()}")
        return "\n".join(parts)

    def close(self) -> None:
        for run in self.runs:
            if run.proc is not None:
                _stop_proc(run.proc, signal.SIGKILL if run.proc.poll() is None else signal.SIGTERM, 5)
        for receiver in self.receivers:
            if receiver.proc is not None:
                _stop_proc(receiver.proc, signal.SIGTERM, 5)
        for writer in self.writers:
            writer.close()


@contextlib.contextmanager
def harness_at(root: Path) -> Iterator[Harness]:
    h = Harness(root)
    try:
        yield h
    finally:
        h.close()


def checkpoint_doc(path: Path, *, running: bool = False) -> dict[str, object] | None:
    """The checkpoint's JSON, None if there is none. `running`: `pyforward run` may be writing it now, and it writes
    the file in place (checkpoint.CheckpointFile), so a read can see a write half done: None then too (a restart never
    sees that: what is on disk is one whole sector)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        if running:
            return None
        raise
    assert isinstance(doc, dict)
    return doc


__all__ = [
    "AuditWriter",
    "Delivery",
    "Harness",
    "ReceivedIds",
    "ReceiverProcess",
    "RunProcess",
    "assert_delivered",
    "checkpoint_doc",
    "delivery",
    "free_port",
    "harness_at",
    "holds_for",
    "metrics",
    "received_ids",
    "try_metrics",
    "wait_for",
]
