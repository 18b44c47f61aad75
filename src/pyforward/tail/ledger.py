"""Which rotated backups exist, and which disappeared before they were read: losses (issue 12).

lumberjack deletes the backups beyond --audit-log-maxbackup after each rotation. While pyforward is behind (the
receiver is down or slow), a backup it has not read yet can be deleted: its events are gone for good. That must
not be silent: each such file is logged once at ERROR with its name, the bytes it held (and about how many lines),
and what to change, and counted (TailerStats.lost_files / lost_bytes -> pyforward_lost_files_total,
pyforward_lost_bytes_total).

The ledger has no timer of its own: it is fed every listing the tailer makes anyway (start, advance to the next
file, rotation) and the one `Tailer.backlog()` makes when the directory changed (metrics). A backup that was seen
in one listing and is missing from the next one, under both its names (`.log` and `.log.gz`: lumberjack writes the
.gz before it deletes the plain file), is gone. It is a loss if it was unread: newer than the tailer's watermark
and not the file being read (that one is held open, its data stays readable after the unlink).

With inotify, the directory's name events also make a look (tail/watch.py DirectoryEvents: once per rotation,
nothing in between), and a backup whose name appeared and that is gone before any look saw it is a loss of unknown
size (counted as a file, 0 bytes). Without inotify, such a backup is not seen at all. So the byte counter is a lower
bound.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path

from pyforward.checkpoint import FINGERPRINT_BYTES
from pyforward.tail.file import Source, content_match, open_source
from pyforward.tail.scan import Sibling, twin

__all__ = ["Ledger", "Seen", "View", "gz_starts_with"]

log = logging.getLogger("pyforward.tailer")


@dataclass(slots=True)
class Seen:
    """A backup as last seen in a listing."""

    path: Path
    gz: bool
    size: int  # bytes on disk (compressed for a .gz); -1: never seen (known by its name event only)
    dev: int
    ino: int
    not_current: bool = False  # checked: it is not the file being read


@dataclass(frozen=True, slots=True)
class View:
    """The tailer's state that decides what is unread, taken under its lock."""

    watermark: str | None  # backups with this timestamp or older are done
    cur: Source | None  # the file being read (held open)
    started: bool  # the start position is decided (before that, nothing is "unread" yet)
    opening: Set[str]  # timestamps of backups being opened now (their fd may already be ours)
    live: Path  # the log path (to tell whether the file being read is still the live file)
    avg_line: float | None  # bytes per line read so far, for the lines estimate


class Ledger:
    """Known backups and reported losses. Not thread-safe: the tailer calls it under its lock."""

    def __init__(self, on_loss: Callable[[int], None]) -> None:
        self.known: dict[str, Seen] = {}  # timestamp -> last seen
        self._on_loss = on_loss  # called with the bytes of each file lost (TailerStats)
        self._reported: set[str] = set()
        self._pending: dict[str, Seen] = {}  # gone while being opened: decided at the next look
        # Names that appeared (inotify) and no listing has shown yet, with the number of the last listing begun
        # then: a listing begun later that does not show them means they came and went unseen.
        self._unseen: dict[str, tuple[Sibling, int]] = {}
        self._seq = 0
        self._applied = 0
        # The backup timestamp of the file being read, when that file was opened as the live log and rotated since
        # (found by inode, or by its decompressed head once gzipped).
        self._cur: Source | None = None
        self._cur_ts: str | None = None

    def begin(self) -> int:
        """A listing is about to start; pass the number to apply()."""
        self._seq += 1
        return self._seq

    def appeared(self, siblings: list[Sibling]) -> None:
        """Backup names created or renamed into the directory (inotify), before any listing shows them."""
        for sibling in siblings:
            if sibling.ts not in self.known and sibling.ts not in self._reported:
                self._unseen[sibling.ts] = (sibling, self._seq)

    def released(self, ts: str) -> None:
        """The spool's guard let the backup of `ts` go and reported it (issue 21): its disappearance is not reported
        again as the retention's."""
        self._reported.add(ts)
        self._pending.pop(ts, None)

    def current_ts(self, src: Source) -> str | None:
        """The backup timestamp of `src` if it is known for certain (it was the live file, now rotated)."""
        return self._cur_ts if src is self._cur else None

    def apply(self, seq: int, siblings: list[Sibling], view: View) -> None:
        """Take a listing (begun as number `seq`) into account. Blocking: stats new names, rarely opens a .gz."""
        if seq <= self._applied:
            return  # a listing begun before one already applied: it is older news
        self._applied = seq
        present: dict[str, Seen] = {}
        for sibling in siblings:
            seen = self.known.get(sibling.ts)
            if seen is None or seen.path != sibling.path:
                try:
                    st = os.stat(sibling.path)
                except OSError:
                    continue  # gone already: as if not listed
                seen = Seen(sibling.path, sibling.gz, st.st_size, st.st_dev, st.st_ino)
            present[sibling.ts] = seen
        vanished = {ts: seen for ts, seen in self.known.items() if ts not in present}
        for ts, seen in self._pending.items():
            if ts not in present:
                vanished.setdefault(ts, seen)
        self._pending = {}
        for ts, (sibling, before) in list(self._unseen.items()):
            if ts in present or ts in self.known:
                del self._unseen[ts]
            elif before < seq:  # this listing began after the name appeared, and does not have it
                del self._unseen[ts]
                vanished.setdefault(ts, Seen(sibling.path, sibling.gz, -1, 0, 0))
        self.known = present
        self._find_current(view)
        if view.started:
            for ts in sorted(vanished):
                self._gone(ts, vanished[ts], view)

    def unread(self, ts: str, view: View) -> bool:
        if view.watermark is not None and ts <= view.watermark:
            return False
        cur = view.cur
        return cur is None or ts != (cur.ts or self.current_ts(cur))

    def backlog(self, view: View) -> tuple[int, int]:
        """(bytes on disk, files) of the unread backups."""
        size = files = 0
        for ts, seen in self.known.items():
            if self.unread(ts, view):
                size += seen.size
                files += 1
        return size, files

    # -- the file being read --------------------------------------------------------------------------------------

    def _find_current(self, view: View) -> None:
        """If the file being read was opened as the live log and has been rotated since, which backup is it?

        It is the oldest backup newer than the watermark (the tailer reads the live file only once no unread
        backup is left, and lumberjack names backups by rotation time), unless that was deleted already: so check
        that one by inode (plain) or by its decompressed head (.gz: a new inode).
        """
        cur = view.cur
        if cur is not self._cur:
            self._cur, self._cur_ts = cur, None
        if cur is None or cur.ts is not None or self._cur_ts is not None:
            return
        for ts in sorted(self.known):
            seen = self.known[ts]
            if not self.unread(ts, view) or seen.not_current:
                continue
            if not seen.gz:
                if (seen.dev, seen.ino) == (cur.dev, cur.ino):
                    self._cur_ts = ts
                    return
                seen.not_current = True
                continue
            if not _covers_a_line(bytes(cur.head)):
                return  # too little of the current file known to compare: decide at a later look
            if gz_starts_with(seen.path, cur):
                self._cur_ts = ts
                return
            seen.not_current = True

    def _is_current_rotated(self, view: View) -> bool:
        """The file being read was opened as the live log and the log path names another file now."""
        cur = view.cur
        if cur is None or cur.ts is not None:
            return False
        try:
            return not cur.same_inode(os.stat(view.live))
        except OSError:
            return True

    # -- losses ---------------------------------------------------------------------------------------------------

    def _gone(self, ts: str, seen: Seen, view: View) -> None:
        if ts in self._reported or not self.unread(ts, view):
            return
        if ts in view.opening:
            self._pending[ts] = seen  # the tailer may hold it open already: decide at the next look
            return
        # A listing taken while lumberjack replaced the plain file by its .gz can miss both names (readdir does not
        # promise to return a name created or removed meanwhile): look again by name.
        for path in (seen.path, twin(seen.path)):
            with contextlib.suppress(OSError):
                st = os.stat(path)
                self.known[ts] = Seen(path, path.name.endswith(".gz"), st.st_size, st.st_dev, st.st_ino)
                return
        if self._cur_ts is None and self._is_current_rotated(view) and not seen.not_current:
            # The file being read was rotated and its backup is not identified: the oldest unread backup that
            # could be it is taken to be it (its data is held open). Never a false loss; at worst one file uncounted.
            older = [t for t, s in self.known.items() if t < ts and self.unread(t, view) and not s.not_current]
            if not older:
                self._cur_ts = ts
                return
        self._reported.add(ts)
        size = max(0, seen.size)
        self._on_loss(size)
        if seen.size < 0:
            sizes = sorted(s.size for s in self.known.values() if s.gz == seen.gz)
            typical = f"; the other backups here have about {sizes[len(sizes) // 2]} bytes" if sizes else ""
            amount = f"audit events are lost (how many is unknown: it was gone before pyforward could look{typical})"
        elif seen.gz:
            amount = f"{size} bytes (compressed) of audit events are lost"
        elif view.avg_line:
            amount = f"{size} bytes (about {max(1, round(size / view.avg_line))} lines) of audit events are lost"
        else:
            amount = f"{size} bytes of audit events are lost"
        log.error(
            "rotated log file %s was deleted before it was read: its %s. The API server's log retention ran out "
            "while shipping was behind: get the receiver back or faster (pyforward_connected, "
            "pyforward_backlog_bytes), or keep more (--audit-log-maxbackup, --audit-log-maxsize)",
            seen.path,
            amount,
            extra={"rate_key": f"lost {seen.path}", "lost_file": str(seen.path), "lost_bytes": size},
        )


def _covers_a_line(head: bytes) -> bool:
    # content_match() needs the fingerprint to cover a whole line (a unique auditID) or the full 4 KiB.
    return b"\n" in head or len(head) >= FINGERPRINT_BYTES


def gz_starts_with(path: Path, cur: Source) -> bool:
    """Does the .gz at `path` decompress to what `cur` starts with? Blocking: reads up to 4 KiB."""
    try:
        cand = open_source(path, None, True)
    except OSError:
        return False
    try:
        return content_match(cur.identity(), bytes(cand.head))
    finally:
        cand.close()
