"""The receiver's exactly-once state on disk: per source, the end of what is written to the output (issue 22).

One file of 512-byte slots, each one sector, written in place as the sender's checkpoint is (checkpoint.CheckpointFile:
a disk writes a sector whole, so a power loss leaves the old record or the new one, never half of each). Slot 0 is a
header naming the format; slot i >= 1 holds one source: ``{"source": ..., "end": ..., "seen": ..., "output": ...}``
padded with spaces and ended by a newline, or only spaces when free. Since version 2, ``"output": {"dev", "ino",
"length"}`` is the output file and its length after the batch that wrote the slot: every batch records it, in the
slots it writes or, writing none, in the header (recovery.py: the largest for the output file is cut back to at start,
and why in the slots). A write changes only the slots of the sources a batch
advanced: one pwrite each, no rename, no journal commit. One JSON document in one sector cannot hold thousands of
sources; a slot per source keeps every write one sector.

The file is created atomically (temp file, fsync, rename, directory fsync) with its header; a slot that does not parse
(only a hand edit can make one) is skipped with one warning: forgetting a source can only cause a duplicate.
Blocking: the writer thread calls `write` and `sync`, start-up calls `load`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import orjson

from pyforward.atomic import fsync_directory, replace_file
from pyforward.checkpoint import RECORD_BYTES
from pyforward.receiver.config import log

__all__ = ["SLOT_BYTES", "MarkFile", "MarkFileError", "OutputLength", "SavedMark"]

SLOT_BYTES = RECORD_BYTES  # one sector
_FORMAT = "pyforward-receive-marks"
# Version 2 adds the output's length to the header. Version 1 files are read (no length: nothing cut) and become
# version 2 at the first batch. An older receiver refuses version 2: it would append without moving the length,
# and the next start of a newer one would cut what it had acked (a loss); refused, its operator removes the file
# (duplicates at most).
_VERSION = 2
_READABLE = (1, 2)


class MarkFileError(OSError):
    """The state file cannot be used (``str()`` is one line naming it)."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True, slots=True)
class OutputLength:
    """The output file (device, inode) and its length after the last batch written (recovery.py)."""

    dev: int
    ino: int
    length: int


@dataclass(slots=True)
class SavedMark:
    source: str
    end: int
    seen: float  # wall-clock time of the source's last request
    slot: int
    output: OutputLength | None = None  # the output's length recorded with it (version 2)


def _pad(data: bytes) -> bytes:
    return data.ljust(SLOT_BYTES - 1) + b"\n"


def encode_slot(source: str, end: int, seen: float, output: OutputLength | None = None) -> bytes:
    """A slot's bytes (a source id is at most 58 characters: the record is at most ~200 bytes)."""
    doc: dict[str, object] = {"source": source, "end": end, "seen": round(seen, 3)}
    if output is not None:
        doc["output"] = _output_doc(output)
    return _pad(orjson.dumps(doc))


def _output_doc(output: OutputLength) -> dict[str, int]:
    return {"dev": output.dev, "ino": output.ino, "length": output.length}


def encode_header(output: OutputLength | None) -> bytes:
    doc: dict[str, object] = {"format": _FORMAT, "version": _VERSION, "slot_bytes": SLOT_BYTES}
    if output is not None:
        doc["output"] = _output_doc(output)
    return _pad(orjson.dumps(doc))


_HEADER = encode_header(None)


class MarkFile:
    """The slots file at `path`: `load` once (creates it if missing), then `write` slots in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.outputs: list[OutputLength] = []  # the output lengths recorded (header and slots), by `load`

    def load(self) -> tuple[list[SavedMark], list[int]]:
        """The marks saved, and the slots that are free (blank or unreadable). Raises MarkFileError."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise MarkFileError(exc.errno, f"cannot read the exactly-once state {self.path}: {exc.strerror}") from None
        if not data:
            self._create()
            return [], []
        header = _decode_output(self._check_header(data[:SLOT_BYTES]))
        self.outputs = [header] if header is not None else []
        marks: list[SavedMark] = []
        free: list[int] = []
        bad = 0
        for slot in range(1, len(data) // SLOT_BYTES):
            record = data[slot * SLOT_BYTES : (slot + 1) * SLOT_BYTES]
            if not record.strip():
                free.append(slot)
                continue
            mark = _decode_slot(record, slot)
            if mark is None:
                bad += 1
                free.append(slot)
            else:
                marks.append(mark)
                if mark.output is not None:
                    self.outputs.append(mark.output)
        if bad:
            log.warning(
                "exactly-once state %s: %d unreadable slot(s) skipped; events of those sources sent again are "
                "written again (a duplicate at most)",
                self.path,
                bad,
            )
        self._open()
        return marks, free

    def _check_header(self, header: bytes) -> dict[str, object]:
        try:
            doc = orjson.loads(header)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise MarkFileError(
                errno.EINVAL, f"{self.path} is not a pyforward receive exactly-once state file (remove it or choose "
                "another --dedup-state)",
            )  # fmt: skip
        if doc.get("version") not in _READABLE or doc.get("slot_bytes") != SLOT_BYTES:
            raise MarkFileError(
                errno.EINVAL, f"{self.path}: exactly-once state version {doc.get('version')!r} is not supported"
            )
        return doc

    def _create(self) -> None:
        try:
            replace_file(self.path, _HEADER)
            fsync_directory(self.path.parent)
        except OSError as exc:
            raise MarkFileError(
                exc.errno, f"cannot create the exactly-once state {self.path}: {exc.strerror}"
            ) from None
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise MarkFileError(exc.errno, f"cannot open the exactly-once state {self.path}: {exc.strerror}") from None

    def write(self, slots: list[tuple[int, bytes]]) -> None:
        """Write these slots in place (one pwrite each; no fdatasync: see `sync`). Raises OSError."""
        fd = self._fd
        if fd is None:
            raise OSError(errno.EBADF, "the exactly-once state is closed")
        for slot, record in slots:
            if os.pwrite(fd, record, slot * SLOT_BYTES) != SLOT_BYTES:
                raise OSError(errno.EIO, f"short write to {self.path}")

    def write_output_length(self, output: OutputLength) -> None:
        """Record the output's length in the header (one pwrite: after a batch that wrote no slot). Raises OSError."""
        self.write([(0, encode_header(output))])

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _decode_output(header: dict[str, object]) -> OutputLength | None:
    doc = header.get("output")
    if not isinstance(doc, dict):
        return None
    dev, ino, length = doc.get("dev"), doc.get("ino"), doc.get("length")
    if type(dev) is int and type(ino) is int and type(length) is int and min(dev, ino, length) >= 0:
        return OutputLength(dev, ino, length)
    return None  # (only a hand edit makes one: as if not recorded)


def _decode_slot(record: bytes, slot: int) -> SavedMark | None:
    try:
        doc = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    source, end, seen = doc.get("source"), doc.get("end"), doc.get("seen")
    if type(source) is not str or type(end) is not int or end < 0 or not isinstance(seen, (int, float)):
        return None
    return SavedMark(source, end, float(seen), slot, _decode_output(doc))
