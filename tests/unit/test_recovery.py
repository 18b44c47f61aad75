"""What `pyforward receive` cuts from its output at start (receiver/recovery.py, issue 22): back to the largest length
the state file recorded for that very file; nothing, with one warning, for another file or a shorter one; only a torn
last line when nothing is recorded. Real files."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyforward.receiver.markfile import OutputLength
from pyforward.receiver.recovery import cut_output

LINES = b'{"seq":0}\n{"seq":1}\n{"seq":2}\n'
ACKED = len(b'{"seq":0}\n{"seq":1}\n')


@pytest.fixture
def output(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "out.jsonl"
    path.write_bytes(LINES + b'{"se')  # the last batch: one complete line, one torn
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # as the writer opens it
    try:
        yield path, fd
    finally:
        os.close(fd)


def _recorded(path: Path, *lengths: int) -> list[OutputLength]:
    st = path.stat()
    return [OutputLength(st.st_dev, st.st_ino, length) for length in lengths]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_cut_back_to_the_largest_length_recorded(output: tuple[Path, int], caplog: pytest.LogCaptureFixture) -> None:
    path, fd = output
    with caplog.at_level(logging.WARNING):
        recorded = [*_recorded(path, 10, ACKED), OutputLength(1, 2, 10**6)]  # (another file's: not counted)
        assert cut_output(fd, path, recorded) == len(LINES) + 4 - ACKED
    assert path.read_bytes() == LINES[:ACKED]
    [warning] = _warnings(caplog)
    assert f"cut {len(LINES) + 4 - ACKED} bytes from the end of output {path}" in warning
    os.write(fd, b'{"seq":2}\n')  # the writer appends from there
    assert path.read_bytes() == LINES


def test_equal_length_cuts_nothing(output: tuple[Path, int], caplog: pytest.LogCaptureFixture) -> None:
    path, fd = output
    with caplog.at_level(logging.WARNING):
        assert cut_output(fd, path, _recorded(path, path.stat().st_size)) == 0
    assert path.read_bytes() == LINES + b'{"se'
    assert _warnings(caplog) == []


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("shorter", "is shorter (34 bytes) than the exactly-once state recorded (1000000"),
        ("another inode", "is not the file the exactly-once state recorded"),  # replaced or rotated
    ],
)
def test_not_cut(output: tuple[Path, int], caplog: pytest.LogCaptureFixture, case: str, why: str) -> None:
    path, fd = output
    st = path.stat()
    recorded = _recorded(path, ACKED, 10**6) if case == "shorter" else [OutputLength(st.st_dev, st.st_ino + 1, ACKED)]
    with caplog.at_level(logging.WARNING):
        assert cut_output(fd, path, recorded) == 0
    assert path.read_bytes() == LINES + b'{"se'
    [warning] = _warnings(caplog)
    assert why in warning
    assert warning.endswith("nothing cut")


def test_nothing_recorded_cuts_only_a_torn_line(output: tuple[Path, int], caplog: pytest.LogCaptureFixture) -> None:
    path, fd = output
    with caplog.at_level(logging.WARNING):
        assert cut_output(fd, path, []) == 4
        assert cut_output(fd, path, []) == 0  # ends with a newline: nothing
    assert path.read_bytes() == LINES
    [warning] = _warnings(caplog)
    assert f"cut 4 bytes from the end of output {path} (a torn last line" in warning


@pytest.mark.parametrize("tail", [70_000, 200_000])
def test_a_torn_line_longer_than_a_read_block(tmp_path: Path, tail: int) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"x" * tail)  # no newline at all: all of it is torn
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert cut_output(fd, path, []) == tail
        assert path.stat().st_size == 0
        os.write(fd, b"a\n" + b"y" * tail)  # its newline more than one read block back
        assert cut_output(fd, path, []) == tail
        assert path.read_bytes() == b"a\n"
    finally:
        os.close(fd)


def test_not_a_regular_file_is_left_alone(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)  # (O_RDWR: opening a FIFO does not wait for a reader)
    try:
        assert cut_output(fd, fifo, []) == 0
    finally:
        os.close(fd)
