"""`pyforward run` start-up, end to end: bad settings and checkpoints stop it with exit code 2 and one line before
anything starts; without a checkpoint, PYFORWARD_START_AT=tail starts at the end of the log; a SIGTERM during
start-up ends it cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.harness import Harness, assert_delivered

EXIT_USAGE = 2


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket that nobody should connect to (non-blocking accept tells)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def assert_nothing_started(harness: Harness, listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()  # no connection was attempted
    assert not harness.checkpoint_path.exists()


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {lines}"
    return lines[0]


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        pytest.param({"PYFORWARD_TLS_CA_FILE": "{root}/missing-ca.crt"}, "PYFORWARD_TLS_CA_FILE", id="ca-missing"),
        pytest.param({"PYFORWARD_TLS_CA_FILE": "{root}"}, "PYFORWARD_TLS_CA_FILE", id="ca-is-a-directory"),
        pytest.param({"PYFORWARD_TLS_CA_FILE": "{root}/not-pem.crt"}, "PYFORWARD_TLS_CA_FILE", id="ca-not-pem"),
        pytest.param({"PYFORWARD_PORT": "99999"}, "PYFORWARD_PORT", id="port-out-of-range"),
        pytest.param({"PYFORWARD_MAX_LINE_BYTES": "lots"}, "PYFORWARD_MAX_LINE_BYTES", id="not-a-size"),
        pytest.param({"PYFORWARD_CHUNK_MAX_BYTES": "32Mi"}, "PYFORWARD_MAX_INFLIGHT_BYTES", id="chunk-over-budget"),
        pytest.param({"PYFORWARD_TLS_CERT_FILE": "{root}/client.crt"}, "PYFORWARD_TLS_KEY_FILE", id="cert-no-key"),
        pytest.param({"PYFORWARD_START_AT": "middle"}, "PYFORWARD_START_AT", id="start-at"),
        pytest.param({"AUDIT_PROXY_PORT": "proxy"}, "AUDIT_PROXY_PORT", id="audit-forwarder-name"),
    ],
)
def test_invalid_setting_exits_2_with_one_line_naming_it(
    harness: Harness, listener: socket.socket, variables: dict[str, str], named: str
) -> None:
    harness.audit_log().write(10)
    (harness.root / "not-pem.crt").write_text("this is not a certificate\n")
    env = harness.run_env(port=listener.getsockname()[1], tls="true", tls_server_name="localhost")
    env.update({k: v.format(root=harness.root) for k, v in variables.items()})
    run = harness.run(env)
    assert run.wait() == EXIT_USAGE
    line = one_line(run.stderr_text())
    assert line.startswith("pyforward run: ")
    assert named in line
    assert_nothing_started(harness, listener)


# ------------------------------------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"\x00\x17garbage{", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"version": 99, "offset": 1}', id="unknown-version"),
        pytest.param(b'{"version": 1, "file": {"dev": 1, "ino": 2, "fp_len": 3, "fp_hash": "x"}, "offset": -1}',
                     id="invalid-fields"),
    ],
)
def test_corrupt_checkpoint_exits_2_and_says_what_to_do(
    harness: Harness, listener: socket.socket, content: bytes
) -> None:
    harness.audit_log().write(10)
    harness.checkpoint_path.write_bytes(content)
    run = harness.run(harness.run_env(port=listener.getsockname()[1]))
    assert run.wait() == EXIT_USAGE
    line = one_line(run.stderr_text())
    assert line.startswith("pyforward run: ")
    assert str(harness.checkpoint_path) in line
    assert "delete it to start per PYFORWARD_START_AT" in line
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert harness.checkpoint_path.read_bytes() == content  # left for the operator to look at


def test_missing_checkpoint_with_start_at_tail_starts_at_the_end(harness: Harness) -> None:
    """No checkpoint, PYFORWARD_START_AT=tail: neither the live log's old lines nor the rotated backups are sent;
    everything written after the start is."""
    receiver = harness.receiver("plain")
    writer = harness.audit_log(max_bytes=64 << 10)
    old = writer.write(300)
    assert writer.rotations >= 2
    live_size = harness.log_path.stat().st_size
    run = harness.run(harness.run_env(receiver, start_at="tail"))
    match = run.wait_log(r"reading (\S+) from offset (\d+)")
    assert (match.group(1), int(match.group(2))) == (str(harness.log_path), live_size)
    output = receiver.received()
    new = writer.write(300)  # with more rotations
    harness.wait_delivered(new, output, run=run)
    assert run.terminate() == 0
    received = output.refresh()
    assert not set(old) & set(received)
    assert_delivered(new, received)
    # Restarted, it goes on from the checkpoint (not from the tail again).
    checkpoint = json.loads(harness.checkpoint_path.read_bytes())
    assert checkpoint["offset"] == harness.log_path.stat().st_size
    more = writer.write(50)
    run.start()
    harness.wait_delivered(more, output, run=run)
    assert run.terminate() == 0
    assert_delivered(new + more, output.refresh())


def test_start_at_tail_waits_for_a_missing_log(harness: Harness) -> None:
    """The log does not exist yet (apiserver not started): pyforward waits for it, and everything in it is new."""
    receiver = harness.receiver("plain")
    run = harness.run(harness.run_env(receiver, start_at="tail"))
    run.wait_log(r"waiting for \S+ to appear")
    writer = harness.audit_log(max_bytes=64 << 10)
    output = receiver.received()
    harness.wait_delivered(writer.write(200), output, run=run)
    assert run.terminate() == 0
    assert_delivered(writer.ids, output.refresh())


# ------------------------------------------------------------------------------------------------ SIGTERM
# A SIGTERM sent to the process while it imports the settings (pydantic), i.e. after the entry point ran and before
# the asyncio loop handles signals: an import hook sends it, so the moment is exact, not raced.
_SIGTERM_DURING_IMPORTS = """
import os, signal, sys
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == "pyforward.settings":
            os.kill(os.getpid(), signal.SIGTERM)
        return None
sys.meta_path.insert(0, Hook())
sys.argv = ["pyforward", *sys.argv[1:]]
from pyforward.__main__ import main
raise SystemExit(main())
"""


@pytest.mark.parametrize(("command", "code"), [("run", 0), ("check", -signal.SIGTERM)])
def test_sigterm_during_startup_ends_run_cleanly(
    harness: Harness, listener: socket.socket, command: str, code: int
) -> None:
    """`run` is a daemon: a SIGTERM before its loop handles signals ends it at once with status 0 and one line
    (nothing was read: no checkpoint is written, nothing connects). Other commands keep the default: ended by the
    signal."""
    harness.audit_log().write(10)
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_DURING_IMPORTS, command],
        env=harness.run_env(port=listener.getsockname()[1]), capture_output=True, timeout=60, cwd=harness.root,
    )
    assert proc.returncode == code, proc.stderr.decode()
    if command == "run":
        assert one_line(proc.stderr.decode()) == (
            "pyforward run: stopped by SIGTERM before start-up finished; nothing was read")
        assert_nothing_started(harness, listener)
