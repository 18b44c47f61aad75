"""auditgen.py: deterministic realistic audit events, lumberjack-style rotation, audit_id, CLI."""

from __future__ import annotations

import gzip
import itertools
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from pyforward.auditgen import RR_EVERY, RotatingAuditLog, audit_id, generate_events, main
from pyforward.protocol import EventTime
from pyforward.records import parse_time

BACKUP_NAME = re.compile(r"audit-(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})\.log(\.gz)?")


@pytest.fixture(scope="module")
def corpus() -> list[bytes]:
    return list(generate_events(10_000, seed=7))


# ------------------------------------------------------------------------------------------ generator


def test_same_seed_same_bytes_and_prefix_property() -> None:
    first = list(generate_events(500, seed=3))
    assert first == list(generate_events(500, seed=3))
    assert first[:100] == list(generate_events(100, seed=3))
    assert first != list(generate_events(500, seed=4))


def test_corpus_size_is_about_a_kilobyte_per_event(corpus: list[bytes]) -> None:
    average = sum(map(len, corpus)) / len(corpus)
    assert 1000 <= average <= 1100
    metadata = sorted(len(line) for i, line in enumerate(corpus) if i % RR_EVERY != RR_EVERY - 1)
    assert 600 <= metadata[len(metadata) // 2] <= 1000  # mostly small Metadata events
    big = [len(line) for i, line in enumerate(corpus) if i % RR_EVERY == RR_EVERY - 1]
    assert min(big) >= 4000  # RequestResponse events: several KB


def test_every_line_is_a_valid_audit_event(corpus: list[bytes]) -> None:
    ids = set()
    previous_stage: EventTime | None = None
    previous_received: EventTime | None = None
    for index, line in enumerate(corpus):
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        event = orjson.loads(line)
        assert event["kind"] == "Event"
        assert event["apiVersion"] == "audit.k8s.io/v1"
        assert event["stage"] == "ResponseComplete"
        assert audit_id(line) == event["auditID"]
        ids.add(event["auditID"])
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", event["auditID"])
        stage = parse_time(event["stageTimestamp"])
        received = parse_time(event["requestReceivedTimestamp"])
        assert stage is not None
        assert received is not None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["stageTimestamp"])
        assert received.to_ns() < stage.to_ns()
        if previous_stage is not None and previous_received is not None:
            assert stage.to_ns() > previous_stage.to_ns()
            assert received.to_ns() > previous_received.to_ns()
        previous_stage, previous_received = stage, received
        if index % RR_EVERY == RR_EVERY - 1:
            assert event["level"] == "RequestResponse"
            assert event["requestObject"]["kind"] in ("ConfigMap", "Pod")
            assert event["responseObject"]["metadata"]["resourceVersion"].isdigit()
            if event["verb"] == "update":
                assert event["responseObject"]["metadata"]["resourceVersion"] == event["objectRef"]["resourceVersion"]
        else:
            assert event["level"] == "Metadata"
            assert "requestObject" not in event
        assert "@@" not in line.decode()
    assert len(ids) == len(corpus)


def test_corpus_contains_unicode(corpus: list[bytes]) -> None:
    text = b"".join(corpus[:500]).decode("utf-8")
    for needle in ("ü", "日本", "🚀", "田中太郎"):
        assert needle in text
    assert "\\u" not in text  # raw UTF-8, as kube-apiserver writes it


def test_id_prefix_start_and_rate() -> None:
    start = datetime(2030, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)
    lines = list(generate_events(41, seed=1, start=start, rate_per_second=10, id_prefix="run-b-"))
    events = [orjson.loads(line) for line in lines]
    assert all(e["auditID"].startswith("run-b-") for e in events)
    assert events[0]["requestReceivedTimestamp"] == "2030-01-02T03:04:05.600000Z"
    assert events[40]["requestReceivedTimestamp"] == "2030-01-02T03:04:09.600000Z"
    assert {audit_id(line) for line in lines}.isdisjoint(audit_id(line) for line in generate_events(41, seed=1))
    naive = list(generate_events(1, start=datetime(2030, 1, 2, 3, 4, 5, 600_000)))
    assert orjson.loads(naive[0])["requestReceivedTimestamp"] == "2030-01-02T03:04:05.600000Z"


def test_very_high_rate_keeps_timestamps_increasing() -> None:
    stamps = [parse_time(orjson.loads(line)["stageTimestamp"]) for line in generate_events(300, rate_per_second=1e8)]
    ns = [s.to_ns() for s in stamps if s is not None]
    assert len(ns) == 300
    assert all(a < b for a, b in itertools.pairwise(ns))


def test_generator_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="count"):
        list(generate_events(-1))
    with pytest.raises(ValueError, match="rate_per_second"):
        list(generate_events(1, rate_per_second=0))
    assert list(generate_events(0)) == []


def test_audit_id_errors() -> None:
    assert audit_id(b'{"a":1,"auditID":"x-1","b":2}\n') == "x-1"
    with pytest.raises(ValueError, match="no auditID"):
        audit_id(b'{"a":1}')
    with pytest.raises(ValueError, match="unterminated"):
        audit_id(b'{"auditID":"abc')


def test_cli_writes_the_generated_events(tmp_path: Path) -> None:
    out = tmp_path / "audit.log"
    assert main(["--count", "5000", "--out", str(out), "--seed", "9", "--id-prefix", "cli-"]) == 0
    assert out.read_bytes() == b"".join(generate_events(5000, seed=9, id_prefix="cli-"))


# ------------------------------------------------------------------------------------------ rotation


class FixedClock:
    """A clock that only moves when told: makes same-millisecond rotations certain."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def read_all(directory: Path) -> list[tuple[str, bytes]]:
    """(name, content) of every backup oldest first, then audit.log."""
    files = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if BACKUP_NAME.fullmatch(entry.name):
            data = gzip.decompress(entry.read_bytes()) if entry.name.endswith(".gz") else entry.read_bytes()
            files.append((entry.name, data))
    current = directory / "audit.log"
    files.append(("audit.log", current.read_bytes()))
    return files


def lines(count: int, size: int = 100) -> Iterator[bytes]:
    for i in range(count):
        head = b"line-%06d " % i
        yield head + b"x" * (size - len(head) - 1) + b"\n"


@pytest.mark.parametrize("batched", [False, True])
def test_rotation_names_sizes_and_no_split_lines(tmp_path: Path, batched: bool) -> None:
    clock = FixedClock(datetime(2026, 11, 26, 12, 0, 0, 999_000, tzinfo=UTC))
    log = RotatingAuditLog(tmp_path / "audit.log", max_bytes=1050, clock=clock)
    data = list(lines(95))
    if batched:
        log.write_many(data)
    else:
        for line in data:
            log.write(line)
    log.close()
    files = read_all(tmp_path)
    assert log.rotations == 9 == len(files) - 1
    # Same millisecond every time: names advance by one millisecond, crossing the second correctly.
    assert [name for name, _ in files[:3]] == [
        "audit-2026-11-26T12-00-00.999.log",
        "audit-2026-11-26T12-00-01.000.log",
        "audit-2026-11-26T12-00-01.001.log",
    ]
    for _, content in files:
        assert len(content) <= 1050
        assert content.endswith(b"\n")
    assert [len(content) for _, content in files[:-1]] == [1000] * 9
    assert b"".join(content for _, content in files) == b"".join(data)


def test_rotation_with_the_real_clock_and_generated_events(tmp_path: Path) -> None:
    events = list(generate_events(2000, seed=2))
    with RotatingAuditLog(tmp_path / "audit.log", max_bytes=100_000) as log:
        log.write_many(events[:1000])
        for line in events[1000:]:
            log.write(line)
    files = read_all(tmp_path)
    assert log.rotations == len(files) - 1 >= 15
    names = [name for name, _ in files[:-1]]
    assert names == sorted(names)
    for name in names:
        match = BACKUP_NAME.fullmatch(name)
        assert match is not None
        stamp = datetime.strptime(match.group(1) + "000", "%Y-%m-%dT%H-%M-%S.%f")
        assert abs(stamp.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=5)  # UTC, not local
    got = [line for _, content in files for line in content.splitlines(keepends=True)]
    assert got == events


def test_max_backups_keeps_the_newest(tmp_path: Path) -> None:
    clock = FixedClock(datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC))
    data = list(lines(100))
    with RotatingAuditLog(tmp_path / "audit.log", max_bytes=1000, max_backups=3, clock=clock) as log:
        for line in data:
            clock.now += timedelta(milliseconds=7)
            log.write(line)
    files = read_all(tmp_path)
    assert log.rotations == 9
    assert len(files) == 4
    assert b"".join(content for _, content in files) == b"".join(data[60:])
    assert len(log.backups()) == 3


def test_max_backups_zero_keeps_only_the_current_file(tmp_path: Path) -> None:
    with RotatingAuditLog(tmp_path / "audit.log", max_bytes=500, max_backups=0) as log:
        log.write_many(lines(20))
    assert [p.name for p in tmp_path.iterdir()] == ["audit.log"]
    assert log.rotations == 3


def test_compress_writes_gzip_backups_with_the_same_content(tmp_path: Path) -> None:
    events = list(generate_events(600, seed=5))
    with RotatingAuditLog(tmp_path / "audit.log", max_bytes=150_000, max_backups=10, compress=True) as log:
        log.write_many(events)
    names = sorted(p.name for p in tmp_path.iterdir())
    backups = [n for n in names if n != "audit.log"]
    assert backups
    assert all(BACKUP_NAME.fullmatch(n) and n.endswith(".log.gz") for n in backups)
    files = read_all(tmp_path)
    for _, content in files:
        assert len(content) <= 150_000
    assert b"".join(content for _, content in files) == b"".join(events)


def test_compress_with_max_backups(tmp_path: Path) -> None:
    clock = FixedClock(datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC))
    data = list(lines(50))
    with RotatingAuditLog(tmp_path / "audit.log", max_bytes=1000, max_backups=2, compress=True, clock=clock) as log:
        log.write_many(data)
    files = read_all(tmp_path)
    assert [name for name, _ in files] == [
        "audit-2026-11-26T12-00-00.002.log.gz",
        "audit-2026-11-26T12-00-00.003.log.gz",
        "audit.log",
    ]
    assert b"".join(content for _, content in files) == b"".join(data[20:])


def test_existing_names_and_backwards_clock_stay_unique_and_ordered(tmp_path: Path) -> None:
    (tmp_path / "audit-2026-11-26T12-00-00.000.log").write_bytes(b"old\n")
    (tmp_path / "audit-2026-11-26T12-00-00.001.log.gz").write_bytes(gzip.compress(b"old2\n"))
    clock = FixedClock(datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC))
    log = RotatingAuditLog(tmp_path / "audit.log", max_bytes=10, clock=clock)
    log.write(b"aaaaaaa\n")
    log.write(b"bbbbbbb\n")  # rotation 1: .000 and .001 taken -> .002
    clock.now -= timedelta(seconds=10)  # NTP step backwards
    log.write(b"ccccccc\n")  # rotation 2: never earlier than the previous backup -> .003
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit-2026-11-26T12-00-00.000.log",
        "audit-2026-11-26T12-00-00.001.log.gz",
        "audit-2026-11-26T12-00-00.002.log",
        "audit-2026-11-26T12-00-00.003.log",
        "audit.log",
    ]
    assert (tmp_path / "audit-2026-11-26T12-00-00.002.log").read_bytes() == b"aaaaaaa\n"
    assert (tmp_path / "audit-2026-11-26T12-00-00.003.log").read_bytes() == b"bbbbbbb\n"


def test_existing_file_size_counts_and_lines_are_completed(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b"x" * 90 + b"\n")
    with RotatingAuditLog(path, max_bytes=100) as log:
        assert log.size == 91
        log.write(b"no newline")  # completed with "\n"; 91 + 11 > 100: rotate first
        assert log.rotations == 1
    assert path.read_bytes() == b"no newline\n"


def test_a_line_longer_than_max_bytes_goes_alone_into_a_file(tmp_path: Path) -> None:
    big = b"y" * 500 + b"\n"
    with RotatingAuditLog(tmp_path / "audit.log", max_bytes=100) as log:
        log.write_many([b"a\n", big, b"b\n"])
    files = read_all(tmp_path)
    assert [content for _, content in files] == [b"a\n", big, b"b\n"]


@pytest.mark.parametrize(
    "make",
    [
        lambda p: RotatingAuditLog(p, max_bytes=0),
        lambda p: RotatingAuditLog(p, max_bytes=10, max_backups=-1),
    ],
)
def test_bad_arguments(tmp_path: Path, make: Callable[[Path], RotatingAuditLog]) -> None:
    with pytest.raises(ValueError, match="RotatingAuditLog"):
        make(tmp_path / "audit.log")


def test_write_after_close_fails_clearly(tmp_path: Path) -> None:
    log = RotatingAuditLog(tmp_path / "audit.log", max_bytes=100)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write(b"x\n")


# --- lumberjack's mill (mill=True): asynchronous retention and compression, as kube-apiserver's writer does it ----


def test_mill_removes_beyond_max_backups_then_gzips_gz_first_then_plain_removed(tmp_path: Path) -> None:
    import inotify_simple

    flags = inotify_simple.flags
    clock = FixedClock(datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC))
    data = list(lines(60))
    inotify = inotify_simple.INotify()
    try:
        inotify.add_watch(tmp_path, flags.CREATE | flags.CLOSE_WRITE | flags.DELETE | flags.MOVED_TO)
        with RotatingAuditLog(
            tmp_path / "audit.log", max_bytes=1000, max_backups=2, compress=True, clock=clock, mill=True
        ) as log:
            for line in data:
                log.write(line)
                if log.size == len(line):  # this write rotated: the mill's pass ends before the next rotation
                    assert log.settle(10)
            assert log.settle(10)
            assert log.mill_errors == []
        events: list[tuple[str, str]] = []
        for event in inotify.read(timeout=0):
            kind = next(k for k in ("CREATE", "CLOSE_WRITE", "DELETE", "MOVED_TO") if flags[k] & event.mask)
            events.append((kind, event.name))
    finally:
        inotify.close()
    files = read_all(tmp_path)
    assert [name for name, _ in files] == [
        "audit-2026-11-26T12-00-00.003.log.gz",
        "audit-2026-11-26T12-00-00.004.log.gz",
        "audit.log",
    ]
    assert b"".join(content for _, content in files) == b"".join(data[30:])
    for stamp in ("000", "001", "002", "003", "004"):
        plain = f"audit-2026-11-26T12-00-00.{stamp}.log"
        gz = plain + ".gz"
        # The .gz is complete (closed) before the plain file goes: a reader never finds neither.
        assert events.index(("CLOSE_WRITE", gz)) < events.index(("DELETE", plain))
        assert events.index(("MOVED_TO", plain)) < events.index(("CREATE", gz))
    # Retention first, then compression: the third-newest backup (a .gz by then) is removed by the pass that
    # follows the next rotation, before that pass gzips the new backup.
    assert events.index(("DELETE", "audit-2026-11-26T12-00-00.000.log.gz")) < events.index(
        ("CREATE", "audit-2026-11-26T12-00-00.002.log.gz")
    )


def test_mill_counts_a_log_and_its_gz_once_and_keeps_the_mode(tmp_path: Path) -> None:
    clock = FixedClock(datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC))
    # A pass interrupted earlier left both names of one backup (lumberjack: the .gz is truncated and written again).
    (tmp_path / "audit-2026-11-26T11-00-00.000.log").write_bytes(b"old\n")
    (tmp_path / "audit-2026-11-26T11-00-00.000.log.gz").write_bytes(b"partial")
    path = tmp_path / "audit.log"
    path.write_bytes(b"")
    path.chmod(0o640)
    with RotatingAuditLog(path, max_bytes=10, max_backups=2, compress=True, clock=clock, mill=True) as log:
        log.write(b"aaaaaaa\n")
        log.write(b"bbbbbbb\n")  # rotates
        assert log.settle(10)
        assert path.stat().st_mode & 0o777 == 0o640  # the new file has the old one's mode
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit-2026-11-26T11-00-00.000.log.gz",
        "audit-2026-11-26T12-00-00.000.log.gz",
        "audit.log",
    ]
    assert gzip.decompress((tmp_path / "audit-2026-11-26T11-00-00.000.log.gz").read_bytes()) == b"old\n"
    assert gzip.decompress((tmp_path / "audit-2026-11-26T12-00-00.000.log.gz").read_bytes()) == b"aaaaaaa\n"
