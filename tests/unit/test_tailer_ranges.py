"""Where each line came from (issue 22): LineBatch.source names the file across rotation, gzip and restarts, and
LineBatch.lengths gives each line's exact bytes in it (cut lines, unterminated last lines, decompressed .gz)."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from pyforward.checkpoint import FINGERPRINT_BYTES
from pyforward.tail import LineBatch, Tailer
from tests.unit.test_tailer import Apiserver, MiB, _read_some, batches


def _content(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def _expected_id(path: Path, inode_of: Path | None = None) -> str:
    data = _content(path)
    newline = data.find(b"\n")
    first = data[: newline + 1] if 0 <= newline < FINGERPRINT_BYTES else data[:FINGERPRINT_BYTES]
    st = os.stat(inode_of or path)
    return f"{st.st_dev}:{st.st_ino}:{hashlib.sha256(first).hexdigest()[:16]}"


def _check_ranges(batch: LineBatch, data: bytes, max_line: int) -> None:
    """Each line is the bytes its range covers: the line, then its newline (none for an unterminated last line),
    a cut line its first max_line bytes; the ranges are contiguous and end at the batch's end."""
    lengths = batch.lengths()
    start = batch.end.offset - sum(lengths)
    assert start >= 0
    for line, length in zip(batch.lines, lengths, strict=True):
        covered = data[start : start + length]
        assert covered.startswith(line)
        body = covered[:-1] if covered.endswith(b"\n") else covered
        assert b"\n" not in body
        assert line == body[:max_line]
        start += length
    assert start == batch.end.offset
    assert covered.endswith(b"\n") != batch.unterminated


async def test_ranges_cover_each_line_exactly(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.write(30)
    api.append(b"x" * 300 + b"\n")  # cut to 100 bytes
    api.write(5)
    tailer = make_tailer(api.path, max_line_bytes=100)
    await tailer.open()
    live_id = _expected_id(api.path)
    first = await batches(tailer, 700)
    assert len(first) > 3
    for batch in first:
        assert batch.source == live_id
        _check_ranges(batch, api.path.read_bytes(), 100)
    api.append(b"tail without newline")
    backup = api.rotate()
    api.write(4)
    rest = await batches(tailer, MiB)
    assert [b.source for b in rest] == [live_id, _expected_id(api.path)]  # the rename keeps the source
    assert rest[0].lines == [b"tail without newline"]
    _check_ranges(rest[0], backup.read_bytes(), 100)
    _check_ranges(rest[1], api.path.read_bytes(), 100)


async def test_restart_into_the_gzipped_file_keeps_its_source(
    api: Apiserver, make_tailer: Callable[..., Tailer]
) -> None:
    api.write(100)
    live_id = _expected_id(api.path)
    _, checkpoint = await _read_some(api, make_tailer, 2000)
    gz = Apiserver.compress(api.rotate())  # a new inode, matched by content at start
    api.write(3)
    tailer = make_tailer(api.path, start=checkpoint)
    await tailer.open()
    got = await batches(tailer, MiB)
    assert got[0].source == live_id  # the checkpoint's dev and inode, not the .gz's
    assert got[0].end.offset - sum(got[0].lengths()) == checkpoint.offset  # decompressed offsets
    _check_ranges(got[0], _content(gz), 4 << 20)
    assert got[-1].source == _expected_id(api.path)


async def test_unread_gz_backup_is_a_source_of_its_own(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.write(10)
    gz = Apiserver.compress(api.rotate())
    api.write(2)
    tailer = make_tailer(api.path)
    await tailer.open()
    got = await batches(tailer, MiB)
    assert got[0].source == _expected_id(gz)
    _check_ranges(got[0], _content(gz), 4 << 20)


async def test_truncated_file_is_a_new_source(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.write(10)
    tailer = make_tailer(api.path)
    await tailer.open()
    before = await batches(tailer, MiB)
    os.truncate(api.path, 0)
    api.count = 1000
    api.write(3)  # another first line, the same inode
    after = await batches(tailer, MiB)
    assert before[0].source != after[0].source == _expected_id(api.path)
    _check_ranges(after[0], api.path.read_bytes(), 4 << 20)


async def test_first_line_longer_than_the_fingerprint(api: Apiserver, make_tailer: Callable[..., Tailer]) -> None:
    api.append(b"y" * (FINGERPRINT_BYTES + 900) + b"\n")
    api.write(3)
    tailer = make_tailer(api.path, max_line_bytes=1000)
    await tailer.open()
    got = await batches(tailer, MiB)
    st = os.stat(api.path)
    head = api.path.read_bytes()[:FINGERPRINT_BYTES]
    assert got[0].source == f"{st.st_dev}:{st.st_ino}:{hashlib.sha256(head).hexdigest()[:16]}"
    assert got[0].lengths()[0] == FINGERPRINT_BYTES + 901  # the whole line, although it was cut to 1000 bytes
    _check_ranges(got[0], api.path.read_bytes(), 1000)
