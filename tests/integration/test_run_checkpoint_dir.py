"""`pyforward run` with a checkpoint it cannot write (issue 13: a volume not writable by the image's uid 65532).

At start-up it says so in one ERROR line naming the path, the uid and the fix, then ships anyway: without a
checkpoint every event is still delivered, only a restart cannot resume where it stopped. The container test
(tests/image) shows the same line for the real case, a root-owned volume and uid 65532.
"""

from __future__ import annotations

import os

from tests.harness import Harness

START_LINE = r"^cannot write the checkpoint (\S+): its directory is not writable by uid (\d+) gid \d+ \((.+?)\);"


def test_unwritable_checkpoint_is_one_error_line_at_start_and_shipping_goes_on(harness: Harness) -> None:
    # As root (CI) a permission cannot be taken away from this process: a missing directory stands in for it.
    receiver = harness.receiver("plain")
    ids = harness.audit_log().write(200)
    checkpoint = harness.root / "no-such-dir" / "checkpoint"
    run = harness.run(harness.run_env(receiver, checkpoint_path=checkpoint))

    harness.wait_delivered(ids, receiver.received(), run=run)
    match = run.find_log(START_LINE, level="error")
    assert match is not None, run.tail()
    assert match.group(1) == str(checkpoint)
    assert int(match.group(2)) == os.getuid()
    assert match.group(3) == "No such file or directory"
    line = match.string
    assert "Fix: make the volume writable by uid" in line
    assert "PYFORWARD_CHECKPOINT_PATH" in line
    starts = [e for e in run.logs() if str(e.get("msg", "")).startswith("cannot write the checkpoint ")]
    assert len(starts) == 1, starts
    # Reported before anything was shipped: it precedes the "shipping ..." line.
    messages = [str(e.get("msg", "")) for e in run.logs()]
    first_shipping = next(i for i, m in enumerate(messages) if m.startswith("shipping "))
    assert messages.index(line) < first_shipping
    assert run.terminate() == 0


def test_writable_checkpoint_directory_says_nothing(harness: Harness) -> None:
    receiver = harness.receiver("plain")
    ids = harness.audit_log().write(50)
    run = harness.run(harness.run_env(receiver))
    harness.wait_delivered(ids, receiver.received(), run=run)
    assert run.find_log(START_LINE) is None
    # The probe file is gone: only the log and the checkpoint are in the directory.
    leftovers = [p.name for p in harness.log_path.parent.iterdir() if ".probe" in p.name]
    assert leftovers == []
    assert run.terminate() == 0
