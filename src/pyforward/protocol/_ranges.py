"""Where each record of a chunk came from: the ``pyforward.*`` options (issue 22: exactly once into pyforward receive).

A chunk `pyforward run` sends holds records of one source file and says so in three options beside ``size`` and
``chunk``:

* ``pyforward.source`` (str): the file, ``"<dev>:<ino>:<h>"`` (docs/protocol.md; tail/file.py computes it): stable
  across the rename into a backup, its gzip (when the start-up matched it by content) and restarts;
* ``pyforward.offset`` (int): where the first record's line starts in the file's (decompressed) bytes;
* ``pyforward.lengths`` (array of int): the source bytes of each record, in order, newline included: record i covers
  ``[offset + sum(lengths[:i]), offset + sum(lengths[:i + 1]))``. A line cut to max_line_bytes counts its whole
  original length; the unterminated last line of a complete file counts what it had.

An array of msgpack ints rather than a packed form: audit lines are 0.5-4 KiB, so each length is a uint16 (3 bytes),
~0.3 % of a gzipped chunk (measured in docs/protocol.md); a varint blob saves one byte a record and costs a Python
loop per record on both ends, where msgpack packs and unpacks the array in C.

A receiver that does not know these keys ignores them (the Forward spec; fluentd and fluent-bit read only the keys
they know, docs/protocol.md). `pyforward receive` checks them (`parse_ranges`): anything that does not make sense is
a `RangeError`, an error for that connection, with every size bounded before anything is allocated for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyforward.protocol._types import ProtocolError

__all__ = [
    "OPTION_LENGTHS",
    "OPTION_OFFSET",
    "OPTION_SOURCE",
    "RangeError",
    "SourceRanges",
    "parse_ranges",
    "range_options",
]

OPTION_SOURCE = "pyforward.source"
OPTION_OFFSET = "pyforward.offset"
OPTION_LENGTHS = "pyforward.lengths"
_KEYS = (OPTION_SOURCE, OPTION_OFFSET, OPTION_LENGTHS)

#: ``<dev>:<ino>:<16 hex>``: st_dev and st_ino are 64-bit (at most 20 digits), the hash is the first 16 hex digits of
#: a sha256. Checked whole, so a source id is at most 58 characters whatever a peer sends.
_SOURCE_ID = re.compile(r"[0-9]{1,20}:[0-9]{1,20}:[0-9a-f]{16}")
#: Offsets are file offsets (off_t, signed 64-bit): a range beyond this is nonsense, not a file.
MAX_OFFSET = (1 << 63) - 1


class RangeError(ProtocolError):
    """``pyforward.*`` options that make no sense: the request is refused and the connection closed."""


@dataclass(frozen=True, slots=True)
class SourceRanges:
    """The records of one request: `source`, the start `offset` of the first one, each one's `lengths`."""

    source: str
    offset: int
    lengths: Sequence[int]
    end: int  # offset + sum(lengths): just after the last record

    def ends_at_or_before(self, mark: int) -> int:
        """How many records, from the first, end at or before `mark` (those a receiver has already written)."""
        if self.offset + self.lengths[0] > mark:  # the common case: nothing written yet
            return 0
        if self.end <= mark:
            return len(self.lengths)
        end = self.offset
        for count, length in enumerate(self.lengths):
            end += length
            if end > mark:
                return count
        return len(self.lengths)  # (not reached: end > mark)

    def bytes_of(self, count: int) -> int:
        """Source bytes of the first `count` records."""
        return sum(self.lengths[:count])


def range_options(source: str, offset: int, lengths: Sequence[int]) -> dict[str, Any]:
    """The options a sender adds to a chunk (merged with ``size`` and ``chunk`` by `build_chunk`)."""
    return {OPTION_SOURCE: source, OPTION_OFFSET: offset, OPTION_LENGTHS: lengths}


def parse_ranges(options: Mapping[str, Any], entries: int, skipped: int = 0) -> SourceRanges | None:
    """The ranges of a request with `entries` decoded records (`skipped`: malformed ones dropped), or None when the
    request has none of the options (another sender, or a pyforward with the feature off). Raises RangeError."""
    if OPTION_SOURCE not in options and OPTION_OFFSET not in options and OPTION_LENGTHS not in options:
        return None
    missing = [key for key in _KEYS if key not in options]
    if missing:
        raise RangeError(f"record ranges without {', '.join(missing)}")
    source = options[OPTION_SOURCE]
    if type(source) is not str or len(source) > 64 or _SOURCE_ID.fullmatch(source) is None:
        raise RangeError(f"{OPTION_SOURCE} is not <dev>:<ino>:<16 hex digits>: {_short(source)}")
    offset = options[OPTION_OFFSET]
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise RangeError(f"{OPTION_OFFSET} is not an offset: {_short(offset)}")
    lengths = options[OPTION_LENGTHS]
    if type(lengths) is not list:
        raise RangeError(f"{OPTION_LENGTHS} is not an array: {_short(lengths)}")
    if skipped:
        # The ranges follow the records as sent: with some of them dropped, which range is whose is unknown.
        raise RangeError(f"record ranges with {skipped} malformed entries")
    if len(lengths) != entries:
        raise RangeError(f"{len(lengths)} record lengths for {entries} records")
    if not lengths:
        raise RangeError("record ranges of an empty request")
    # Each length a positive int (a record is at least its newline, or one byte of an unterminated last line); the
    # sum cannot overflow Python ints, but it must stay a file offset. Positive lengths make the ranges increasing.
    # Checked with builtins (map, set, min: no Python code per record, ~10 ns a record).
    if set(map(type, lengths)) != {int} or min(lengths) < 1:
        bad = next(n for n in lengths if type(n) is not int or n < 1)
        raise RangeError(f"{OPTION_LENGTHS} holds {_short(bad)}, not a positive length")
    end = offset + sum(lengths)
    if end > MAX_OFFSET:
        raise RangeError(f"record ranges end at {end}, beyond any file offset")
    return SourceRanges(source, offset, lengths, end)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
