"""The receiver's exactly-once state file (receiver/markfile.py) and its loading into SourceMarks (issue 22): real
files; one sector per source, written in place; what is unreadable is skipped (a duplicate at most), a file that is not
a state file is refused with one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pyforward.receiver.dedup import SourceMarks
from pyforward.receiver.markfile import SLOT_BYTES, MarkFile, MarkFileError, OutputLength, encode_slot

A = "2049:11:0123456789abcdef"
B = "2049:12:fedcba9876543210"


def _marks(path: Path, *, now: float = 1000.0, max_sources: int = 10, forget_after: float = 100.0) -> SourceMarks:
    marks = SourceMarks(MarkFile(path), max_sources=max_sources, forget_after=forget_after, clock=lambda: now)
    marks.load()
    return marks


def test_created_then_written_in_place(tmp_path: Path) -> None:
    path = tmp_path / "marks"
    file = MarkFile(path)
    assert file.load() == ([], [])
    assert path.stat().st_size == SLOT_BYTES
    inode = path.stat().st_ino
    file.write([(1, encode_slot(A, 500, 990.0)), (3, encode_slot(B, 7, 995.0))])
    file.write([(1, encode_slot(A, 900, 999.0))])
    file.close()
    assert path.stat().st_ino == inode  # in place: no rename
    assert path.stat().st_size == 4 * SLOT_BYTES
    saved, free = MarkFile(path).load()
    assert [(m.source, m.end, m.slot) for m in saved] == [(A, 900, 1), (B, 7, 3)]
    assert free == [2]  # a hole (never written) is a free slot


def test_unreadable_slot_is_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "marks"
    file = MarkFile(path)
    file.load()
    file.write([(1, encode_slot(A, 500, 990.0)), (2, b"{garbage".ljust(SLOT_BYTES - 1) + b"\n")])
    file.close()
    with caplog.at_level(logging.WARNING):
        marks = _marks(path)
    assert marks.tracked == 1
    assert [r.getMessage() for r in caplog.records if "unreadable slot" in r.getMessage()] != []


def test_not_a_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"kind":"Event"}\n' * 100)
    with pytest.raises(MarkFileError, match="is not a pyforward receive exactly-once state file") as caught:
        MarkFile(path).load()
    assert "\n" not in str(caught.value)


def test_load_keeps_the_latest_copy_and_forgets_idle_and_excess_sources(tmp_path: Path) -> None:
    path = tmp_path / "marks"
    file = MarkFile(path)
    file.load()
    file.write([
        (1, encode_slot(A, 100, 990.0)),
        (2, encode_slot(A, 300, 995.0)),  # the same source saved twice: the later end wins
        (3, encode_slot(B, 50, 800.0)),  # idle 200 s > forget_after: forgotten
        (4, encode_slot("1:1:0000000000000001", 1, 998.0)),
        (5, encode_slot("1:1:0000000000000002", 1, 999.0)),
    ])  # fmt: skip
    file.close()
    marks = _marks(path, max_sources=2)
    assert marks.tracked == 2  # the two seen last
    marks = _marks(path, max_sources=10)
    assert marks.tracked == 3
    assert marks._sources[A].written == 300


def test_output_lengths_recorded_in_the_header_and_the_slots(tmp_path: Path) -> None:
    """Version 2: each slot a batch writes carries the output's length, the header a batch's without slots."""
    path = tmp_path / "marks"
    file = MarkFile(path)
    file.load()
    assert file.outputs == []
    file.write_output_length(OutputLength(7, 8, 100))
    file.write([(1, encode_slot(A, 500, 990.0, OutputLength(7, 8, 300))), (2, encode_slot(B, 7, 995.0))])
    file.close()
    again = MarkFile(path)
    saved, _ = again.load()
    assert again.outputs == [OutputLength(7, 8, 100), OutputLength(7, 8, 300)]
    assert [(m.source, m.end, m.output) for m in saved] == [(A, 500, OutputLength(7, 8, 300)), (B, 7, None)]


def test_version_1_is_read_without_a_length_and_a_later_version_refused(tmp_path: Path) -> None:
    path = tmp_path / "marks"
    header = b'{"format":"pyforward-receive-marks","version":1,"slot_bytes":512}'
    path.write_bytes(header.ljust(SLOT_BYTES - 1) + b"\n" + encode_slot(A, 40, 990.0))
    file = MarkFile(path)
    saved, _ = file.load()
    assert ([m.end for m in saved], file.outputs) == ([40], [])  # nothing recorded: nothing cut but a torn line
    file.close()
    path.write_bytes(header.replace(b'"version":1', b'"version":3').ljust(SLOT_BYTES - 1) + b"\n")
    with pytest.raises(MarkFileError, match="version 3 is not supported"):
        MarkFile(path).load()
