"""At start, cut from the output what a killed receiver wrote but never acked (issue 22: the receiver's crash bound).

A `SIGKILL` while the writer writes a batch leaves part of it in the output (complete lines, maybe a torn last one)
that nothing acked: the sender sends the whole batch again, so those lines would be written twice and a torn line
joined onto the next one. So every batch records the output's (device, inode) and its length after the batch in the
state file (markfile.py), and start-up cuts the output back to the largest length recorded for it, with ftruncate,
before the writer starts and before listening. What lies beyond it was never acked: the ack comes after the record.

Every batch, marks or not: a batch that recorded nothing would leave the length behind it, and the next start would
cut acked lines (a loss). Where: in each source slot the batch writes (exactly once), beside that source's new end,
in the same sector; a batch that writes no slot (a sender without ranges, --no-exactly-once with a state file left
by an earlier run) records it in the header. Each batch, in order (output.py's writer): (1) the output written, (2)
its slots (or the header), (3) the acks. A kill:

* during (1) or before the first slot of (2): the batch lies beyond every length recorded and is cut; none of its
  marks was saved, so its re-send is written once. Neither a duplicate nor a loss.
* between two slots of (2), a batch that advanced several sources (a rotation, several senders at once): the slot
  written holds the new length, so the batch is kept; the sources whose slots were not written yet re-send their
  records of it and they are written again, a duplicate of at most that batch. Never a loss: a mark saved always comes
  with a length that keeps what it covers. A batch of one source (the common case) has no such window: its end and
  the length are one sector, written whole or not at all.
* after (2): the batch is kept and marked; its re-send is dropped. Nothing repeated.

Why not the length alone in the header, before the slots: two pwrites, and between them the writer thread waits for
the GIL (up to a switch interval, 5 ms, while the event loop parses requests), so a kill there would repeat the
batch far more often than the slots' window above. The slots after the length in the header would be a loss.

Not cut, each with one WARNING: an output that is not the file recorded (replaced or rotated while the receiver was
down: a stale length says nothing about it) and an output shorter than recorded (truncated by someone else, or a power
loss without --sync that kept the state's sector but not the output's pages). With no length recorded (memory only:
standard output; --no-exactly-once without a state file; a version 1 state file) only a torn last line is cut: every
batch ends with a newline, so the bytes after the last one were never acked either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pyforward.receiver.config import log
from pyforward.receiver.markfile import OutputLength

__all__ = ["cut_output", "torn_tail"]

_BLOCK = 64 * 1024


def torn_tail(path: Path, size: int) -> int:
    """The bytes after the last newline of the first `size` bytes of `path`, read back from there (the output is open
    write-only: read through another descriptor). Raises OSError."""
    with path.open("rb", buffering=0) as f:
        end = size
        while end > 0:
            start = max(0, end - _BLOCK)
            block = os.pread(f.fileno(), end - start, start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                return size - (start + newline + 1)
            end = start
    return size


def cut_output(fd: int, path: Path, recorded: list[OutputLength]) -> int:
    """Cut the output open at `fd` back to what may have been acked, by the lengths `recorded` in the state file
    (module doc); returns the bytes cut. Blocking, at start-up. Raises OSError if the cut fails."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return 0
    size = st.st_size
    mine = [r.length for r in recorded if (r.dev, r.ino) == (st.st_dev, st.st_ino)]
    if not recorded:
        cut = torn_tail(path, size) if size else 0
        why = "a torn last line (after the last newline), never acked"
    elif not mine:
        log.warning(
            "output %s is not the file the exactly-once state recorded (device:inode %d:%d; recorded: %s; replaced or "
            "rotated?): nothing cut",
            path, st.st_dev, st.st_ino, ", ".join(sorted({f"{r.dev}:{r.ino}" for r in recorded})),
        )  # fmt: skip
        return 0
    elif size < max(mine):
        log.warning(
            "output %s is shorter (%d bytes) than the exactly-once state recorded (%d: truncated by someone else, or a "
            "power loss without --sync): nothing cut",
            path, size, max(mine),
        )  # fmt: skip
        return 0
    else:
        cut = size - max(mine)
        why = "written after the last length recorded in the exactly-once state, never acked"
    if cut:
        os.ftruncate(fd, size - cut)
        log.warning(
            "cut %d bytes from the end of output %s (%s: a receiver killed while writing them; the senders send them "
            "again)",
            cut, path, why,
        )  # fmt: skip
    return cut
