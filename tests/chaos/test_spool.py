"""The spool (issue 21) with real `pyforward run` processes and a lumberjack-faithful writer (RotatingAuditLog with
mill=True: rotation by rename, then in a thread of its own the retention deletes the backups beyond maxbackup and
gzips the rest, the plain file deleted once its .gz is written): the receiver down ten times longer than the API
server's retention loses nothing while the spool's budget holds it, and the spool is empty once everything is
shipped; a budget too small releases the oldest files (logged, counted) and ships the rest; SIGKILLs during linking
and releasing, and restarts mid-outage, come out right; a spool on another file system says so once and is off; on a
small file system the free-space floor holds and the writer is never refused a byte.

The writer writes at a steady rate (an API server does not wait for pyforward): about one rotation per PACE seconds,
so a backup lives about KEEP x PACE before the retention deletes it, long enough for the link an inotify name event
makes (a few milliseconds). It does not catch up after a stall of the test process (a burst of rotations would let
the retention delete a backup before any process could look: a loss the ledger reports, but not the spool's to
prevent). While `pyforward run` is down between a SIGKILL and its restart, the writer waits: a backup created and
deleted while nothing runs is the retention's loss, which no spool can prevent.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import Figures
from tests.chaos.test_faults import SETTINGS, budget_events, in_flight, seed_from_env
from tests.chaos.test_storage import tiny_tmpfs
from tests.chaos.tools import env_for
from tests.harness import AuditWriter, Harness, RunProcess, assert_delivered, free_port, try_metrics, wait_for

pytestmark = pytest.mark.chaos

FILE = 16 << 10  # lumberjack's maxsize, small: many rotations in little time
KEEP = 3  # lumberjack's maxbackup: the retention is (KEEP + 1) x FILE of log
PACE = 0.15  # seconds between two files written (a rate, not synchronisation)
EVENTS_PER_FILE = 16  # ~1 KB each

#: The checkpoint is written soon after acks, so that the spool's links go soon after the receiver is back.
SPOOL_SETTINGS = {**SETTINGS, "checkpoint_interval": 0.2}


def spooled(harness: Harness) -> list[str]:
    spool = harness.logdir / ".pyforward-spool"
    return sorted(p.name for p in spool.iterdir()) if spool.is_dir() else []


def write_files(
    writer: AuditWriter, files: int, *, check: list[list[str]] | None = None, harness: Harness | None = None,
    pace: float = PACE,
) -> None:  # fmt: skip
    """About `files` files of log, one every `pace` seconds. With `check`, the spool's listing after each file (to
    look at what it held)."""
    for _ in range(files):
        writer.write(EVENTS_PER_FILE)
        if check is not None and harness is not None:
            check.append(spooled(harness))
        time.sleep(pace)  # the writer's rate


def lost_metric(bind: str, name: str, reason: str) -> float:
    return try_metrics(bind).get(f'pyforward_{name}_total{{reason="{reason}"}}', 0.0)


def missing_bytes(writer: AuditWriter, received: set[str]) -> int:
    return sum(len(line) for line, i in zip(writer.lines, writer.ids, strict=True) if i not in received)


def released_logged(run: RunProcess) -> tuple[int, int]:
    """(files, unread bytes) the spool's guard logged as lost, over every start of `run`."""
    entries = [e for e in run.logs(all_runs=True) if str(e.get("msg", "")).startswith("released ")
               and e.get("level") == "error"]  # fmt: skip
    return len(entries), sum(int(e["lost_bytes"]) for e in entries)


def both_forms(listings: list[list[str]]) -> list[str]:
    return [name for names in listings for name in names if name.endswith(".gz") and name[:-3] in names]


def lumberjack(harness: Harness) -> AuditWriter:
    return harness.audit_log(max_bytes=FILE, max_backups=KEEP, compress=True, mill=True)


def test_an_outage_ten_times_the_retention_loses_nothing_and_the_spool_empties(
    harness: Harness, figures: Figures
) -> None:
    receiver = harness.receiver("plain", start=False, port=free_port())  # down
    writer = lumberjack(harness)
    bind = f"127.0.0.1:{free_port()}"
    run = harness.run(env_for(harness, receiver, settings=SPOOL_SETTINGS, metrics_bind=bind))
    run.wait_log(r"^shipping ")
    files = 10 * (KEEP + 1)
    listings: list[list[str]] = []
    write_files(writer, files, check=listings, harness=harness)
    assert writer.log.settle(30)

    def holding() -> dict[str, float] | None:
        values = try_metrics(bind)
        return values if values.get("pyforward_spool_files", 0) >= files - KEEP else None

    values = run.wait_until(holding, 30, what="the spool to hold what the retention deleted")
    assert values['pyforward_lost_files_total{reason="retention"}'] == 0
    assert values['pyforward_lost_files_total{reason="spool_budget"}'] == 0
    assert values["pyforward_spool_active"] == 1
    held = int(values["pyforward_spool_bytes"])
    assert held > 0  # kept by the spool alone: the retention deleted lumberjack's names
    peak = max(len(names) for names in listings)
    assert not both_forms(listings), "the spool held a backup twice (plain and .gz)"
    # The plain file, linked as its name appears (inotify); a .gz only when lumberjack's mill had gzipped the plain
    # file and deleted it first (a 16 KiB file takes it a millisecond; an API server's 100 MB, a second or two).
    gz = len({name for names in listings for name in names if name.endswith(".gz")})

    receiver.start()
    counts = harness.wait_delivered(writer.ids, receiver.received(), run=run, timeout=120)
    result = assert_delivered(writer.ids, counts, max_duplicates=in_flight(writer.lines))
    wait_for(lambda: spooled(harness) == [], 30, what="every spool link to be removed once the checkpoint passed it",
             diagnostics=lambda: f"{spooled(harness)}\n{run.tail()}")  # fmt: skip
    assert run.terminate() == 0
    assert not [e for e in run.logs(all_runs=True) if e.get("level") == "error"]
    figures.update(
        scenario=f"receiver down 10x the API server's retention (lumberjack: maxbackup {KEEP}, gzip by its mill), "
        "spool budget holds it",
        group="spool", faults=1, written=len(writer.ids), lost=len(result.lost), duplicated=result.duplicated,
        bound=in_flight(writer.lines),
        notes=f"{writer.rotations} rotations of {FILE >> 10} KiB; retention {(KEEP + 1) * FILE >> 10} KiB; the spool "
        f"held up to {peak} files ({held >> 10} KiB only it kept), never a backup twice ({gz} as .gz: gzipped "
        "before the link); empty at the end",
    )  # fmt: skip


def test_a_budget_too_small_releases_the_oldest_logged_and_counted_and_ships_the_rest(
    harness: Harness, figures: Figures
) -> None:
    receiver = harness.receiver("plain", start=False, port=free_port())
    writer = lumberjack(harness)
    bind = f"127.0.0.1:{free_port()}"
    budget = 12 * FILE  # above max_inflight_bytes (128 KiB), as the defaults are (1 GiB, 16 MiB)
    run = harness.run(env_for(harness, receiver, settings=SPOOL_SETTINGS, metrics_bind=bind, spool_max_bytes=budget))
    run.wait_log(r"^shipping ")
    write_files(writer, 10 * (KEEP + 1))
    assert writer.log.settle(30)
    released = run.wait_until(lambda: lost_metric(bind, "lost_files", "spool_budget") or None, 30,
                              what="the guard to release files")  # fmt: skip
    values = try_metrics(bind)
    assert values["pyforward_spool_bytes"] <= budget
    receiver.start()
    output = receiver.received()
    newest = writer.ids[-(KEEP + 1) * EVENTS_PER_FILE :]  # never released: the newest are kept
    harness.wait_delivered(newest, output, run=run, timeout=120)
    logged_files, logged_bytes = released_logged(run)
    lost_bytes = lost_metric(bind, "lost_bytes", "spool_budget")
    assert logged_files == lost_metric(bind, "lost_files", "spool_budget") >= released
    assert logged_bytes == lost_bytes > 0
    # Everything but what was released arrives: the bytes missing are exactly the unread bytes logged as lost.
    wait_for(lambda: missing_bytes(writer, set(output.refresh())) == lost_bytes, 60,
             what="every event not released to arrive",
             diagnostics=lambda: f"missing {missing_bytes(writer, set(output.counts))} bytes, lost {lost_bytes}: "
             f"{sorted({i.split('-')[0] for i in writer.ids if i not in output.counts})}")
    assert lost_metric(bind, "lost_files", "retention") == 0
    wait_for(lambda: spooled(harness) == [], 30, what="the spool to empty")
    lost = len([i for i in writer.ids if i not in output.counts])
    assert run.terminate() == 0
    figures.update(
        scenario="receiver down 10x the retention, spool budget 12 files: the oldest unread released",
        group="spool", faults=1, written=len(writer.ids), lost=lost, duplicated=sum(output.counts.values()) - len(
            output.counts), bound=in_flight(writer.lines),
        notes=f"lost = released by the guard, on purpose: {logged_files} files, {logged_bytes} bytes logged at ERROR "
        "and counted (reason spool_budget), equal to the bytes of the events missing; every other event shipped",
    )  # fmt: skip


@pytest.mark.parametrize("budget", ["holds", "releases"])
def test_sigkill_while_linking_and_releasing_and_restarts_mid_outage(
    harness: Harness, figures: Figures, budget: str
) -> None:
    """SIGKILL `pyforward run` at random moments while the retention deletes and the spool links (and, with a small
    budget, releases), five times, the receiver down throughout; then it comes back."""
    kills = 5
    seed = seed_from_env()
    rng = random.Random(seed)
    receiver = harness.receiver("plain", start=False, port=free_port())
    writer = lumberjack(harness)
    # (above max_inflight_bytes, 128 KiB: what is read and not acked is released last, see tail/spool.py _guard)
    spool_max = {"holds": 1 << 30, "releases": 12 * FILE}[budget]
    run = harness.run(env_for(harness, receiver, settings=SPOOL_SETTINGS, spool_max_bytes=spool_max), start=False)
    for kill in range(kills):
        run.start()
        run.wait_log(r"^shipping ")  # (the spool is adopted and linked before it says so)
        write_files(writer, rng.randrange(4, 10), pace=PACE * rng.uniform(0.6, 1.4))
        assert run.kill() == -signal.SIGKILL, f"kill {kill}: it had exited already\n{run.tail()}"
    assert writer.log.settle(30)
    run.start()
    receiver.start()
    output = receiver.received()
    if budget == "holds":
        counts = harness.wait_delivered(writer.ids, output, run=run, timeout=120)
        result = assert_delivered(writer.ids, counts, max_duplicates=kills * budget_events(writer.lines))
        lost, duplicated = len(result.lost), result.duplicated
        note = "spool budget holds: lost 0"
    else:
        # What is missing is no more than what the guard logged as released (a SIGKILL after the log line and before
        # the unlink over-reports, never under-reports).
        def settled() -> bool:
            return missing_bytes(writer, set(output.refresh())) <= released_logged(run)[1]

        wait_for(settled, 60, what="every event not released to arrive",
                 diagnostics=lambda: f"missing {missing_bytes(writer, set(output.counts))}, "
                 f"released {released_logged(run)}\n{run.tail()}")  # fmt: skip
        lost = len([i for i in writer.ids if i not in output.counts])
        duplicated = sum(output.counts.values()) - len(output.counts)
        files, size = released_logged(run)
        note = f"spool budget 12 files: {files} released ({size} bytes logged and counted), the events missing within"
    errors = [e for e in run.logs(all_runs=True) if e.get("level") == "error"]
    assert not [e for e in errors if "was deleted before it was read" in str(e.get("msg"))
                or "the checkpoint names" in str(e.get("msg"))], errors  # fmt: skip
    wait_for(lambda: spooled(harness) == [], 30, what="no spooled file left behind",
             diagnostics=lambda: f"{spooled(harness)}\n{run.tail()}")  # fmt: skip
    assert run.terminate() == 0
    figures.update(
        scenario=f"SIGKILL of `pyforward run` while the spool links and releases, restarts mid-outage ({budget})",
        group="spool", faults=kills, written=len(writer.ids), lost=lost, duplicated=duplicated,
        bound=kills * budget_events(writer.lines),
        notes=f"{note}; {writer.rotations} rotations, lumberjack maxbackup {KEEP} + gzip; every spool link gone at the "
        f"end; seed {seed}",
    )  # fmt: skip


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` bind-mounted read-only onto itself: the same file system, not writable (skip where mounting is not
    allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    for argv in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,ro,bind", str(path)]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
            pytest.skip(f"cannot bind-mount a read-only directory here ({done.stderr.strip() or done.returncode})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.mark.parametrize("where", ["another file system", "read-only"])
def test_a_spool_that_cannot_work_says_so_once_and_is_off(harness: Harness, figures: Figures, where: str) -> None:
    """A tmpfs mounted at the spool's directory (EXDEV), or the spool in a read-only directory of the log's file system
    (EROFS): one WARNING naming the reason and the setting, the spool off, every event shipped as without it."""
    if where == "read-only":
        spool, mounted, errno_name = harness.root / "ro" / "spool", read_only(harness.root / "ro"), "EROFS"
    else:
        spool = harness.logdir / ".pyforward-spool"
        mounted, errno_name = tiny_tmpfs(spool, "1m"), "EXDEV"
    with mounted:
        receiver = harness.receiver("plain")
        writer = harness.audit_log(max_bytes=FILE)  # (no retention: without the spool it would lose the backups)
        bind = f"127.0.0.1:{free_port()}"
        run = harness.run(env_for(harness, receiver, settings=SPOOL_SETTINGS, metrics_bind=bind, spool_dir=spool))
        ids = writer.write(5 * EVENTS_PER_FILE)
        harness.wait_delivered(ids, receiver.received(), run=run)
        warnings = [e["msg"] for e in run.logs() if "cannot be used" in str(e.get("msg"))]
        assert len(warnings) == 1, warnings
        assert f"({errno_name})" in warnings[0]
        assert "PYFORWARD_SPOOL_DIR" in warnings[0]
        assert try_metrics(bind)["pyforward_spool_active"] == 0
        assert not spool.exists() or os.listdir(spool) == []
        assert run.terminate() == 0
    figures.update(
        scenario="spool directory "
        + ("in a read-only directory (a read-only bind mount)" if where == "read-only" else "on another file system "
           "(a tmpfs mounted there)"),
        group="spool", inputs=1,
        notes=f"one WARNING naming {errno_name} and PYFORWARD_SPOOL_DIR; pyforward_spool_active 0; nothing linked; "
        "every event shipped as without the spool",
    )  # fmt: skip


def test_on_a_small_file_system_the_floor_holds_and_the_writer_is_never_refused(
    harness: Harness, figures: Figures
) -> None:
    size = 4 << 20
    big = 8 * FILE  # larger files: the volume fills in a few seconds
    with tiny_tmpfs(harness.logdir, "4m"):
        receiver = harness.receiver("plain", start=False, port=free_port())
        writer = harness.audit_log(max_bytes=big, max_backups=KEEP, compress=True, mill=True)
        bind = f"127.0.0.1:{free_port()}"
        run = harness.run(env_for(harness, receiver, settings=SPOOL_SETTINGS, metrics_bind=bind))
        run.wait_log(r"^shipping ")
        floor = max(size // 10, 2 * big)  # the default: 10 % of the file system, or twice the largest backup
        lowest = size
        for _ in range(2 * size // big):  # twice the volume's size written while the receiver is down
            writer.write(8 * EVENTS_PER_FILE)  # raises if the file system refuses the writer a byte (ENOSPC)
            vfs = os.statvfs(harness.logdir)
            lowest = min(lowest, vfs.f_bavail * vfs.f_frsize)
            time.sleep(PACE)  # the writer's rate: ~0.8 MB/s, an API server at ~800 events/s
        assert writer.log.settle(30)
        assert writer.log.mill_errors == []  # lumberjack's gzip always had room too
        # Between a rotation and the guard's look the volume may dip below the floor by about one file, never more.
        assert lowest >= floor - 2 * big, f"free space fell to {lowest} bytes (floor {floor})"
        released = lost_metric(bind, "lost_files", "spool_budget")
        assert released >= 1
        receiver.start()
        output = receiver.received()
        lost_bytes = lost_metric(bind, "lost_bytes", "spool_budget")
        wait_for(lambda: missing_bytes(writer, set(output.refresh())) == lost_bytes, 60,
                 what="every event not released to arrive",
                 diagnostics=lambda: f"missing {missing_bytes(writer, set(output.counts))}, lost {lost_bytes}")
        floor_lines = [e for e in run.logs() if "below the floor" in str(e.get("msg"))]
        assert floor_lines
        assert re.search(r"floor \(\d+ bytes, PYFORWARD_SPOOL_MIN_FREE\)", floor_lines[0]["msg"])
        lost = len([i for i in writer.ids if i not in output.counts])
        assert run.terminate() == 0
    figures.update(
        scenario="a 4 MiB tmpfs log volume filling up while the receiver is down (spool budget 1 GiB: the floor acts)",
        group="spool", faults=1, written=len(writer.ids), lost=lost,
        duplicated=sum(output.counts.values()) - len(output.counts), bound=in_flight(writer.lines),
        notes=f"{writer.rotations} rotations of {big >> 10} KiB, 8 MiB written; free space never below "
        f"{lowest >> 10} KiB (floor {floor >> 10} KiB); the writer and its gzip never refused a byte; lost = "
        f"{int(released)} files released (ERROR, counted), equal to the bytes missing",
    )  # fmt: skip
