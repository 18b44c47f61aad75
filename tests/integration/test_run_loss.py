"""Issue 12 end to end, with real `pyforward run` processes: a backup deleted unread while the receiver is down is
an ERROR (once) and in /metrics while it happens; a configuration that needs a missing package fails at start with
one line; a background task that fails is logged with its traceback and restarted, or ends the process."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from pyforward.auditgen import audit_id
from tests.harness import Harness, assert_delivered, free_port, try_metrics, wait_for

EXIT_USAGE = 2


def with_pythonpath(env: dict[str, str], directory: Path) -> dict[str, str]:
    """`env` with `directory` first on PYTHONPATH (before the code under test's own entries)."""
    rest = env.get("PYTHONPATH", "")
    return {**env, "PYTHONPATH": f"{directory}:{rest}" if rest else str(directory)}


def test_unread_backup_deleted_while_the_receiver_is_down_is_reported_and_counted(harness: Harness) -> None:
    writer = harness.audit_log(max_bytes=64 << 10)
    ids = writer.write(600)  # ~600 KB: about ten 64 KB backups and the live file
    backups = writer.log.backups()
    assert len(backups) >= 8
    receiver = harness.receiver(start=False, port=free_port())  # down
    bind = f"127.0.0.1:{free_port()}"
    env = harness.run_env(
        receiver,
        metrics_bind=bind,
        max_inflight_bytes=32 << 10,
        chunk_max_bytes=16 << 10,
        max_line_bytes=16 << 10,
        flush_interval=0.05,
        spool_max_bytes=0,  # the spool (issue 21) would keep the deleted file: this is the loss without it
    )
    run = harness.run(env)

    def looked() -> dict[str, float] | None:
        values = try_metrics(bind)
        return values if values.get("pyforward_log_files") == len(backups) + 1 else None

    values = run.wait_until(looked, 30, what="pyforward_log_files to count every file")
    for reason in ("retention", "spool_budget"):  # created at 0
        assert values[f'pyforward_lost_files_total{{reason="{reason}"}}'] == 0
        assert values[f'pyforward_lost_bytes_total{{reason="{reason}"}}'] == 0
    assert values["pyforward_spool_active"] == 0
    assert values["pyforward_checkpoint_misses_total"] == 0
    assert values["pyforward_unreadable_files_total"] == 0
    assert values['pyforward_task_restarts_total{task="discovery"}'] == 0
    assert values["pyforward_backlog_files"] == len(backups) + 1
    total = sum(p.stat().st_size for p in (*backups, harness.log_path))
    assert total - (64 << 10) <= values["pyforward_backlog_bytes"] <= total  # at most ~one file read (in flight)

    doomed = backups[4]  # far beyond what 32 KB in flight let it read
    lost_ids = [audit_id(line) for line in doomed.read_bytes().splitlines()]
    size = doomed.stat().st_size
    doomed.unlink()  # lumberjack's retention ran out
    match = run.wait_log(r"rotated log file (\S+) was deleted before it was read", level="error")
    assert match.group(1) == str(doomed)

    def counted() -> dict[str, float] | None:
        values = try_metrics(bind)
        return values if values.get('pyforward_lost_files_total{reason="retention"}') == 1 else None

    values = run.wait_until(counted, 30, what="pyforward_lost_files_total to count the file")
    assert values['pyforward_lost_bytes_total{reason="retention"}'] == size
    assert values["pyforward_log_files"] == len(backups)
    [entry] = [e for e in run.logs() if "was deleted before it was read" in str(e.get("msg"))]
    assert entry["lost_bytes"] == size
    assert f"{size} bytes (about " in entry["msg"] or f"its {size} bytes" in entry["msg"]

    receiver.start()  # back: the rest arrives, and only the deleted file's events are missing
    rest = [i for i in ids if i not in set(lost_ids)]
    counts = harness.wait_delivered(rest, receiver.received(), run=run)
    assert_delivered(rest, counts, max_duplicates=len(ids))
    assert not set(lost_ids) & set(counts)
    assert len([e for e in run.logs() if "was deleted before it was read" in str(e.get("msg"))]) == 1
    assert run.terminate() == 0


def _fake_package(root: Path) -> Path:
    """A directory whose kubernetes_asyncio cannot be imported (as if it were not installed)."""
    site = root / "broken-site"
    (site / "kubernetes_asyncio").mkdir(parents=True)
    (site / "kubernetes_asyncio" / "__init__.py").write_text(
        'raise ImportError("No module named \'kubernetes_asyncio\' (simulated)")\n'
    )
    return site


def test_discovery_without_kubernetes_asyncio_exits_2_with_one_line(harness: Harness) -> None:
    harness.audit_log().write(10)
    env = {k: v for k, v in harness.run_env().items() if k not in ("PYFORWARD_HOST", "PYFORWARD_PORT")}
    # audit-forwarder's env, as the user had it: discovery of Service audit/audittailer.
    env.update({"AUDIT_NAMESPACE": "audit", "AUDIT_SERVICE_NAME": "audittailer", "PYFORWARD_LOG_LEVEL": "warning"})
    run = harness.run(with_pythonpath(env, _fake_package(harness.root)))
    assert run.wait(60) == EXIT_USAGE
    lines = [line for line in run.stderr_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pyforward run: discovery of the receiver (Service audit/audittailer")
    assert "kubernetes-asyncio" in lines[0]
    assert "simulated" in lines[0]
    assert "PYFORWARD_HOST" in lines[0]
    assert not harness.checkpoint_path.exists()  # nothing started


_CRASH = '''
import os

_task = os.environ["PYFORWARD_TEST_CRASH"]

if _task == "discovery":
    import asyncio

    import pyforward.discovery as discovery

    _calls = {"n": 0}

    async def _run(self):
        _calls["n"] += 1
        if _calls["n"] == 1:
            raise RuntimeError("injected failure in discovery")
        await asyncio.Event().wait()  # then it runs (quietly: no cluster here)

    discovery.Discovery.run = _run
elif _task == "tailer":
    import pyforward.pipeline as pipeline

    async def _read_loop(self, tailer, building):
        await tailer.read_batch(1)
        raise RuntimeError("injected failure in the read loop")

    pipeline.Pipeline._read_loop = _read_loop
'''


def _crashing(root: Path) -> Path:
    """sitecustomize.py that makes one task of `pyforward run` fail (PYFORWARD_TEST_CRASH names it)."""
    site = root / "crash-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_CRASH))
    return site


def test_a_failing_restartable_task_is_logged_with_its_traceback_and_restarted(harness: Harness) -> None:
    harness.audit_log().write(50)
    bind = f"127.0.0.1:{free_port()}"
    env = harness.run_env(metrics_bind=bind, shutdown_timeout=1)
    env = {k: v for k, v in env.items() if k not in ("PYFORWARD_HOST", "PYFORWARD_PORT")}
    env.update({"PYFORWARD_TEST_CRASH": "discovery", "PYFORWARD_SERVICE_NAME": "audittailer"})
    run = harness.run(with_pythonpath(env, _crashing(harness.root)))
    run.wait_log(r"task discovery failed: RuntimeError: injected failure in discovery; restarting it in", level="error")
    [entry] = [e for e in run.logs() if str(e.get("msg")).startswith("task discovery failed")]
    assert "Traceback" in entry["exc"]
    assert "injected failure in discovery" in entry["exc"]
    assert entry["task"] == "discovery"

    def restarted() -> dict[str, float] | None:
        values = try_metrics(bind)
        return values if values.get('pyforward_task_restarts_total{task="discovery"}') == 1 else None

    run.wait_until(restarted, 30, what="the discovery task to be counted as restarted")
    assert run.alive
    assert run.terminate() == 0


def test_a_failing_read_loop_ends_the_process_with_exit_code_1(harness: Harness) -> None:
    receiver = harness.receiver()
    harness.audit_log().write(50)
    env = harness.run_env(receiver)
    env["PYFORWARD_TEST_CRASH"] = "tailer"
    run = harness.run(with_pythonpath(env, _crashing(harness.root)))
    assert run.wait(60) == 1
    errors = [e for e in run.logs() if e.get("level") == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["msg"].startswith("task tailer failed: RuntimeError: injected failure in the read loop")
    assert "exit code 1" in errors[0]["msg"]
    assert "Traceback" in errors[0]["exc"]
    assert json.dumps(errors[0])  # one JSON line, traceback included
    wait_for(lambda: not run.alive, 5, what="the process to be gone")
