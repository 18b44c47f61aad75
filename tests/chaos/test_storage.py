"""Faults of the file system: the checkpoint directory read-only or full, the checkpoint file corrupt; the log
directory deleted and recreated, the log replaced by a symlink, permissions denied.

Root ignores file permissions; the scenarios that need them run `pyforward run` under setpriv without
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (tools.UnprivilegedRun), and skip with the reason where that is impossible.
A full disk is a 64 KiB tmpfs mounted for the test (skipped where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import Figures
from tests.chaos.test_faults import SETTINGS, in_flight, metric
from tests.chaos.tools import MODES, env_for, permissions_apply, unprivileged_run
from tests.harness import AuditWriter, Harness, assert_delivered, checkpoint_doc, free_port

pytestmark = pytest.mark.chaos


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "64k") -> Iterator[None]:
    """A tmpfs of `size` (64 KiB) at ``path``: a full or small file system, or another one (skip when this sandbox
    does not allow mounting)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: cannot make a file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _remove_tree(path: Path) -> None:
    """rm -r while `pyforward run` still writes its checkpoint there: a temp file it renames (or creates) between
    rmtree's listing and its unlink (or rmdir) is not an error of the test; go again, a bounded number of times."""

    def gone_meanwhile(function: Any, name: str, exc_info: Any) -> None:
        error = exc_info[1]
        if not isinstance(error, OSError) or error.errno not in (errno.ENOENT, errno.ENOTEMPTY):
            raise error

    for _ in range(20):
        if not path.exists():
            return
        shutil.rmtree(path, onerror=gone_meanwhile)
    assert not path.exists(), f"{path} could not be removed"


def fill(directory: Path) -> None:
    """Fill the file system of ``directory`` up to the last byte."""
    for name, piece in (("filler", 4096), ("filler2", 1)):  # then the last bytes of a partly used page
        with contextlib.suppress(OSError), (directory / name).open("wb", buffering=0) as f:
            while True:
                f.write(b"\0" * piece)


def covers(writer: AuditWriter, path: Path, count: int) -> bool:
    doc = checkpoint_doc(path, running=True)
    return doc is not None and writer.events_covered(doc) >= count


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_checkpoint_directory_read_only_or_full(harness: Harness, figures: Figures, fault: str) -> None:
    """The checkpoint cannot be written: one clear error, shipping continues, the last good checkpoint stays as it
    was (and a restart resumes from it: duplicates, no loss); once writable again the checkpoint catches up."""
    state = harness.root / "state"
    if fault == "read-only":
        reason = permissions_apply()
        if reason:
            pytest.skip(reason)
        state.mkdir()
        fs: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        fs = tiny_tmpfs(state)
    with fs:
        checkpoint = state / "checkpoint"
        receiver_bind = f"127.0.0.1:{free_port()}"
        receiver = harness.receiver("plain", extra_args=["--metrics-bind", receiver_bind])
        writer = harness.audit_log()
        bind = f"127.0.0.1:{free_port()}"
        env = env_for(harness, receiver, checkpoint_path=checkpoint, metrics_bind=bind, settings=SETTINGS)
        run = unprivileged_run(harness, env) if fault == "read-only" else harness.run(env)
        output = receiver.received()
        first = writer.write(500)
        run.wait_until(lambda: covers(writer, checkpoint, len(first)), 60, what="the checkpoint to cover batch 1")
        good = checkpoint.read_bytes()
        # Neither fault stops pyforward from overwriting the checkpoint it has open (in place: CheckpointFile); they
        # stop the creation of a new file. So the checkpoint is replaced by a copy (same bytes, owner and mode), which
        # pyforward's next write must create anew. The replaced file stays open here until the repair: its space
        # stays taken when pyforward lets go of it (else that page would be room enough on the full tmpfs).
        held = os.open(checkpoint, os.O_RDONLY)
        copy = state / "checkpoint.copy"
        shutil.copy2(checkpoint, copy)
        os.replace(copy, checkpoint)

        if fault == "read-only":
            state.chmod(0o555)
        else:
            fill(state)
        second = writer.write(500)
        harness.wait_delivered(second, output, run=run)  # shipping goes on
        error = run.wait_log(r"^cannot write checkpoint .*keeping the last good one", level="error")
        assert str(checkpoint) in error.string
        run.wait_until(lambda: metric(bind, 'pyforward_checkpoint_writes_total{result="error"}') >= 1, 30,
                       what="the checkpoint error metric")  # fmt: skip
        assert checkpoint.read_bytes() == good, "the last good checkpoint was changed"
        assert not [p for p in state.iterdir() if p.name.endswith(".tmp")], "a temp file was left behind"

        # A crash now resumes from the last good checkpoint: batch 2 is sent again, nothing is lost; pyforward receive
        # recognises the re-sent records by their ranges and writes them once (issue 22).
        assert run.kill() == -signal.SIGKILL
        run.start()
        dropped = 'pyforward_receiver_duplicates_dropped_total{unit="records"}'
        run.wait_until(lambda: metric(receiver_bind, dropped) >= len(second), 60, what="batch 2 re-sent")

        os.close(held)
        if fault == "read-only":
            state.chmod(0o755)
        else:
            (state / "filler").unlink()
            (state / "filler2").unlink(missing_ok=True)
        third = writer.write(100)
        harness.wait_delivered(third, output, run=run)
        run.wait_until(lambda: covers(writer, checkpoint, len(writer.ids)), 60, what="the checkpoint to catch up")
        assert run.terminate() == 0
    result = assert_delivered(writer.ids, output.refresh(), max_duplicates=len(second) + 2 * in_flight(writer.lines))
    figures.update(
        scenario=f"checkpoint directory {fault}" + (" (64 KiB tmpfs filled up)" if fault == "full" else ""),
        group="storage", faults=1, written=len(writer.ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=len(second) + 2 * in_flight(writer.lines),
        notes="one error line, shipping went on, last good checkpoint kept byte for byte; a SIGKILL in the "
        "failing state re-sent the events acked since it (pyforward receive dropped them: written once), then the "
        "checkpoint caught up",
    )  # fmt: skip


CORRUPT = {
    "empty": b"",
    "truncated": b'{"version":1,"file":{"dev":2049,"ino":1234,"fp_len":4096,"fp_h',
    "garbage": bytes(range(256)) * 4,
    "nul-filled": b"\0" * 4096,
}
CORRUPT_LONG = {
    **CORRUPT,
    "wrong-types": b'{"version":1,"file":{"dev":"x","ino":1,"fp_len":1,"fp_hash":"0"},"offset":-5,"path":1}',
    "future-version": b'{"version":99}',
}


@pytest.mark.parametrize("mode", MODES)
def test_corrupt_checkpoint_is_a_clear_startup_error_with_a_documented_recovery(
    harness: Harness, figures: Figures, mode: str
) -> None:
    """A truncated or garbage checkpoint: exit code 2 and one line naming the file and the recovery, nothing
    shipped; the documented recovery (delete it) then starts from the head and ships everything."""
    receiver = harness.receiver("plain")
    writer = harness.audit_log()
    ids = writer.write(200)
    env = env_for(harness, receiver, settings=SETTINGS)
    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    assert "### Corrupt checkpoint" in docs
    assert "rm /auditlog/.audit.log.pyforward-checkpoint" in docs
    cases = CORRUPT if mode == "ci" else CORRUPT_LONG
    for name, content in cases.items():
        harness.checkpoint_path.write_bytes(content)
        run = harness.run(env)
        assert run.wait(60) == 2, f"{name}: {run.tail()}"
        lines = run.stderr_text().splitlines()
        assert len(lines) == 1, f"{name}: {lines}"
        assert lines[0].startswith("pyforward run: checkpoint "), f"{name}: {lines[0]}"
        assert str(harness.checkpoint_path) in lines[0]
        assert "delete it" in lines[0], f"{name}: no recovery in {lines[0]!r}"
        assert "Traceback" not in lines[0]
        assert harness.checkpoint_path.read_bytes() == content, f"{name}: the checkpoint was overwritten"
    assert not receiver.received().refresh(), "something was shipped"
    harness.checkpoint_path.unlink()  # the documented recovery
    run = harness.run(env)
    output = receiver.received()
    harness.wait_delivered(ids, output, run=run)
    assert run.terminate() == 0
    result = assert_delivered(ids, output.refresh())
    figures.update(
        scenario="checkpoint " + " / ".join(cases),
        group="storage", faults=len(cases), written=len(ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=0, notes="each: exit 2, one stderr line naming the file and the recovery; after `rm` of the "
        "checkpoint (docs/operations.md) everything shipped once",
    )  # fmt: skip


def test_log_directory_deleted_and_recreated(harness: Harness, figures: Figures) -> None:
    """The log directory is deleted (with the checkpoint in it) while `pyforward run` still reads the open file,
    then recreated with a new log: what was in the deleted file and everything in the new one arrives, and the
    checkpoint is written again in the new directory."""
    receiver = harness.receiver("plain")
    writer = harness.audit_log()  # no rotation here: a backup deleted before it was opened is lost, by definition
    run = harness.run(env_for(harness, receiver, settings=SETTINGS))
    output = receiver.received()
    harness.wait_delivered(writer.write(300), output, run=run)
    writer.write(300)  # maybe not read yet when the directory goes: the open file is still read to its end
    _remove_tree(harness.logdir)
    writer.close()
    assert not harness.logdir.exists()
    again = harness.audit_log(max_bytes=128 << 10, prefix="again")
    again.write(300)
    harness.wait_delivered(writer.ids + again.ids, output, run=run)
    run.wait_until(lambda: covers(again, harness.checkpoint_path, len(again.ids)), 60,
                   what="the checkpoint in the recreated directory")  # fmt: skip
    assert run.terminate() == 0
    run.start()  # resumes at the end of the new log: nothing again
    more = again.write(50)
    harness.wait_delivered(more, output, run=run)
    assert run.terminate() == 0
    written = writer.ids + again.ids
    per_fault = in_flight(writer.lines + again.lines)
    result = assert_delivered(written, output.refresh(), max_duplicates=per_fault)
    figures.update(
        scenario="log directory deleted (checkpoint with it) and recreated",
        group="storage", faults=1, written=len(written), lost=len(result.lost), duplicated=result.duplicated,
        bound=per_fault, notes="the open file was read to its end; checkpoint written again in the new directory",
    )  # fmt: skip


def test_log_replaced_by_a_symlink(harness: Harness, figures: Figures) -> None:
    """audit.log is atomically replaced by a symlink into another directory where a rotating log is written
    (the Kubernetes ..data pattern): the old file is read to its end, then the target and its rotated siblings."""
    receiver = harness.receiver("plain")
    writer = harness.audit_log()
    run = harness.run(env_for(harness, receiver, settings=SETTINGS))
    output = receiver.received()
    harness.wait_delivered(writer.write(300), output, run=run)
    writer.write(200)  # maybe unread at the swap
    elsewhere = AuditWriter(harness.root / "elsewhere" / "audit.log", max_bytes=64 << 10, prefix="sym")
    harness.writers.append(elsewhere)
    elsewhere.write(300)  # rotates in elsewhere/
    link = harness.logdir / ".audit.log.new"
    link.symlink_to(elsewhere.path)
    os.replace(link, harness.log_path)
    assert harness.log_path.is_symlink()
    elsewhere.write(300)
    written = writer.ids + elsewhere.ids
    harness.wait_delivered(written, output, run=run)
    assert elsewhere.rotations >= 4
    assert run.terminate() == 0
    result = assert_delivered(written, output.refresh())
    figures.update(
        scenario="log replaced by a symlink to a rotating log elsewhere",
        group="storage", faults=1, written=len(written), lost=len(result.lost), duplicated=result.duplicated,
        bound=0, notes=f"{elsewhere.rotations} rotations behind the symlink",
    )  # fmt: skip


def test_permission_denied_on_the_log_and_its_directory(harness: Harness, figures: Figures) -> None:
    """The log is unreadable at start, later its directory is not searchable: one clear error each (naming the
    path and the permission problem), `pyforward run` keeps running and retrying, and ships everything once
    the permissions are fixed."""
    reason = permissions_apply()
    if reason:
        pytest.skip(reason)
    receiver = harness.receiver("plain")
    writer = harness.audit_log(max_bytes=128 << 10)
    first = writer.write(100)  # below max_bytes: all in the unreadable live file
    assert writer.rotations == 0
    harness.log_path.chmod(0)
    run = unprivileged_run(harness, env_for(harness, receiver, settings=SETTINGS))
    output = receiver.received()
    error = run.wait_log(r"(?i)cannot read .*audit\.log: permission denied", level="error")
    assert "permission" in error.string.lower()
    assert not output.refresh()
    harness.log_path.chmod(0o644)
    harness.wait_delivered(first, output, run=run)

    run.wait_log(r"works again")  # the first problem is over (and said so)

    def denials() -> int:
        return len([e for e in run.logs() if e.get("level") == "error" and "ermission denied" in str(e.get("msg"))])

    before = denials()
    harness.logdir.chmod(0)
    second = writer.write(400)  # rotates inside the unsearchable directory (the test runs with root's powers)
    run.wait_until(lambda: denials() > before, 30, what="the permission error on the directory")
    harness.logdir.chmod(0o755)
    harness.wait_delivered(second, output, run=run, timeout=60)
    assert run.alive
    assert run.terminate() == 0
    result = assert_delivered(writer.ids, output.refresh())
    errors = [e for e in run.logs(all_runs=True) if e.get("level") == "error"]
    figures.update(
        scenario="permission denied on the log file, then on its directory",
        group="storage", faults=2, written=len(writer.ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=0, notes=f"run kept running; {len(errors)} error lines; "
        + json.dumps(sorted({str(e.get('msg'))[:60] for e in errors}))[:200],
    )  # fmt: skip
