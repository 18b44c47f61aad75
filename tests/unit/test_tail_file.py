"""tail/file.py's read_plain: what it asks the kernel for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyforward.tail.file import read_plain


def test_read_plain_allocates_no_more_than_the_file_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.pread allocates the whole requested size before shrinking it to what was read: a caught-up tailer
    asking for 1 MiB to get a few KiB left a hole in glibc's heap at every read, and RSS grew over hours
    (issue 11 item 5). The request is capped at what the file holds past the offset."""
    path = tmp_path / "audit.log"
    path.write_bytes(b"x" * 5000 + b"\n")
    asked: list[int] = []
    real_pread = os.pread

    def spy(fd: int, n: int, offset: int) -> bytes:
        asked.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", spy)
    fd = os.open(path, os.O_RDONLY)
    try:
        result = read_plain(fd, 1000, 1 << 20, None)
        assert result.data == b"x" * 4000 + b"\n"
        assert result.size == 5001
        assert asked == [4001]
        asked.clear()
        assert read_plain(fd, 5001, 1 << 20, None).data == b""  # at the end: no read at all
        assert asked == []
        assert read_plain(fd, 0, 100, None).data == b"x" * 100  # a smaller n still wins
        assert asked == [100]
    finally:
        os.close(fd)
