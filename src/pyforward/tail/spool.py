"""The spool: a second name for every rotated backup not yet shipped, so that the API server's log retention cannot
delete it first (issue 21).

A backup is a name pointing at an inode. lumberjack's retention removes its own name; a hard link made here, in a
directory of pyforward's own on the same file system (default `<log dir>/.pyforward-spool/`, which lumberjack never
lists: it reads only the log directory itself), keeps the inode, and so the data, until pyforward has shipped the
file, had it acked and saved a checkpoint past it. No byte is copied. The link has lumberjack's name for the backup,
so `scan.list_siblings` merges the spool with the log directory by timestamp and every reader (start, the next file,
the loss ledger) sees a spooled backup as present.

Which copy: the spool holds the PLAIN backup, the inode the live file had: the one the checkpoint and the receiver's
source id name, read without decompressing, offsets unchanged. lumberjack's `.gz` is a new inode of its own that goes at
retention like the rest; it is linked only when the plain file was already gone when pyforward first saw the backup
(pyforward was down through the rotation and the gzip). The spool never holds both forms of one backup.

When: a link is made as soon as a listing of the tailer shows a backup that the last saved checkpoint has not passed
(the tailer lists on inotify name events, at each rotation and each advance, and at start); it is removed when a
SAVED checkpoint names a newer file (a later backup, or the live log): never on "read to the end" alone, since a
crash resumes at the checkpoint.

The guard: what the spool costs the disk is the bytes of the files whose only remaining name is the spool's (a backup
lumberjack still keeps costs nothing more). When that exceeds `spool_max_bytes`, or the file system's free space is
below the floor (`spool_min_free`, default the larger of 10 % of the file system and twice the largest backup seen: the
API server must always have room for its next file and lumberjack's gzip of the previous one), such files go (order:
_guard): a plain file whose .gz lumberjack still keeps is swapped for it (no loss), else the oldest file not read
yet is released. That is a loss like the retention's: one ERROR with its size and lines, counted with
reason="spool_budget". It is checked when a link is added and whenever the backups' names changed (each rotation,
each retention delete), never by a timer.

Where it cannot work (another file system: EXDEV; a read-only or forbidden directory; a file system without hard
links, or fs.protected_hardlinks refusing a file of another user: EPERM, EOPNOTSUPP, EMLINK), one WARNING names the
reason and the setting, and the spool is off: everything else works as without it.

Crash safety: a link is made under its final name with link(2), which is atomic; unlink(2) is atomic; an EEXIST for the
same inode is a link made by an earlier run. A spool left by an earlier run is adopted at start; its files that the
checkpoint has passed are removed (INFO); a name in it that is not a backup name is left alone (one WARNING).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyforward.checkpoint import Position
from pyforward.tail.scan import Sibling, specs

__all__ = ["DEFAULT_SPOOL_NAME", "Mark", "Released", "Spool", "SpoolStatus", "default_spool_dir"]

log = logging.getLogger("pyforward.tailer")

DEFAULT_SPOOL_NAME = ".pyforward-spool"

#: A probe file made at start to learn whether the spool's file system takes hard links (removed at once; a leftover of
#: a SIGKILL is removed at the next start).
_PROBE = ".pyforward-spool-probe"

#: Fraction of the file system kept free by default (with twice the largest backup, whichever is larger).
_FLOOR_FRACTION = 0.10

#: Errors that say the spool cannot work here at all (not a passing condition such as ENOSPC).
_CANNOT = {
    errno.EXDEV: "it is on another file system than the log (hard links cannot cross file systems)",
    errno.EPERM: "the file system refuses hard links here (or fs.protected_hardlinks forbids linking a file this user "
    "does not own: run pyforward with the uid or group that may write the log)",
    errno.EOPNOTSUPP: "the file system does not support hard links",
    errno.EMLINK: "a backup has too many links already",
    errno.EROFS: "it is on a read-only file system",
    errno.EACCES: "this user may not write there",
}

#: (timestamp, 1): backups with this timestamp and older are done; (timestamp, 0): those older than it are.
Mark = tuple[str, int]


def default_spool_dir(log_path: Path) -> Path:
    return log_path.parent / DEFAULT_SPOOL_NAME


@dataclass(slots=True)
class _Entry:
    path: Path  # in the spool
    ts: str
    dev: int
    ino: int
    size: int
    nlink: int

    @property
    def gz(self) -> bool:
        return self.path.name.endswith(".gz")


@dataclass(frozen=True, slots=True)
class Released:
    """A spooled backup the guard let go, told to the tailer (which says how much of it was not read yet)."""

    path: Path
    ts: str
    dev: int
    ino: int
    size: int  # bytes of data: decompressed for a .gz (offsets and lines are counted in those)


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    active: bool
    reason: str | None  # why it is off
    directory: Path
    files: int  # files in the spool
    bytes: int  # bytes of those whose only name is the spool's: what the budget limits
    linked_bytes: int  # bytes of every file in the spool (most still kept by lumberjack too)
    budget: int
    free: int | None  # free bytes of the spool's file system (for an unprivileged user)
    floor: int | None  # the free-space floor in force


class Spool:
    """The spool of one log. Thread-safe: the tailer's listings run in worker threads, the checkpoint on the loop."""

    def __init__(
        self,
        log_path: Path,
        directory: Path | None = None,
        *,
        max_bytes: int = 1 << 30,
        min_free: int | None = None,
        unread: Callable[[Released], tuple[int, float | None]] | None = None,
        reading: Callable[[str, int, int], int] | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.directory = Path(directory) if directory is not None else default_spool_dir(self.log_path)
        self.max_bytes = max_bytes
        self.min_free = min_free
        # Asked with each release: (bytes of it not read yet, average bytes per line); the tailer skips the rest of
        # the file if it is the one being read. None: all of it counts as unread.
        self._unread = unread
        # Where the tailer stands in a backup (timestamp, dev, ino): 0 not read yet, 1 being read, 2 read to its end
        # (its lines in flight, not acked). The guard releases in that order (see _guard). None: all 0.
        self._reading = reading
        self.active = max_bytes > 0
        self.reason: str | None = None if self.active else "turned off (spool_max_bytes is 0)"
        self.released_files = 0  # released with bytes not read yet: losses (pyforward_lost_files_total{spool_budget})
        self.released_bytes = 0
        self._lock = threading.Lock()
        self._ready = False  # the directory exists and takes hard links (_prepare)
        self._begun = False
        self._mark: Mark | None = None  # what the last saved checkpoint (or the start position) has passed
        self._entries: dict[str, _Entry] = {}  # timestamp -> the spool's link
        self._patterns = [pattern for _, pattern in specs(self.log_path)]  # lumberjack's names for the backups
        self._stats: dict[Path, os.stat_result] = {}  # of the names in the last listing
        self._names: frozenset[Path] = frozenset()  # the last listing's names (the guard runs when they change)
        self._last: list[Sibling] = []
        self._newest: str | None = None  # newest backup timestamp listed
        self._largest = 0  # largest backup seen (bytes): the default floor keeps twice that free
        self._released: set[str] = set()  # let go by the guard: never linked again by this process
        # Plain spooled backups the last listing found lumberjack's .gz of, in the log directory: timestamp -> the .gz.
        self._gz_in_log_dir: dict[str, Path] = {}

    # -- start ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Make the directory and find out whether hard links work there (one WARNING and off if not). Blocking."""
        if not self.active:
            log.info("the spool is off (spool_max_bytes is 0): backups deleted by the API server's retention before "
                     "they are shipped are lost")  # fmt: skip
            return
        self._prepare()

    def _prepare(self) -> bool:
        """The directory exists and takes hard links. False while the log directory is missing (not mounted yet:
        tried again at the next listing) or when the spool went off."""
        if self._ready or not self.active:
            return self._ready
        log_dir = Path(os.path.realpath(self.log_path)).parent
        try:
            log_dev = os.stat(log_dir).st_dev
        except OSError:
            return False
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.directory, 0o750)
            if os.stat(self.directory).st_dev != log_dev:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            probe = self.directory / f"{_PROBE}-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            try:
                os.link(probe, probe.with_name(probe.name + ".link"))
                os.unlink(probe.with_name(probe.name + ".link"))
            finally:
                probe.unlink()
        except OSError as e:
            self._off(e)
            return False
        self._ready = True
        return True

    def _off(self, error: OSError) -> None:
        what = _CANNOT.get(error.errno or 0, error.strerror or str(error))
        name = errno.errorcode.get(error.errno or 0, "error")
        self.active = self._ready = False
        self.reason = f"{what} ({name})"
        log.warning(
            "the spool %s cannot be used: %s. The spool is off: backups deleted by the API server's retention before "
            "they are shipped are lost, as without it. Fix: set PYFORWARD_SPOOL_DIR to a writable directory on the "
            "log's file system (%s), or PYFORWARD_SPOOL_MAX_BYTES=0 to turn the spool off without this warning",
            self.directory,
            self.reason,
            self.log_path.parent,
            extra={"spool_dir": str(self.directory), "reason": name},
        )

    def begin(self, mark: Mark | None) -> None:
        """The start position is decided (`mark`: what it has passed). Adopt the spool an earlier run left, remove
        what the checkpoint has passed, link the rest of the backups. Blocking."""
        with self._lock:
            self._mark = mark
            self._begun = True
            self._adopt()
            self._take(self._last, force=True)

    def _adopt(self) -> None:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        patterns = self._patterns
        strangers = []
        for entry in entries:
            if entry.name.startswith(_PROBE):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            match = next((m for p in patterns if (m := p.fullmatch(entry.name))), None)
            if match is None:
                strangers.append(entry.name)
                continue
            if self._done(match["ts"]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    log.info("removed %s from the spool: left by an earlier run, and the checkpoint is past it",
                             entry.path)  # fmt: skip
        if strangers:
            log.warning(
                "the spool %s holds names that are not backups of %s, left alone: %s",
                self.directory,
                self.log_path.name,
                ", ".join(sorted(strangers)[:5]) + (" ..." if len(strangers) > 5 else ""),
            )

    # -- listings -------------------------------------------------------------------------------------------------

    def take(self, siblings: list[Sibling]) -> None:
        """A listing of the tailer (scan.list_siblings with the spool): link what it shows that the checkpoint has not
        passed, and run the guard if the backups' names changed. Blocking."""
        with self._lock:
            self._take(siblings)

    def appeared(self, siblings: list[Sibling]) -> None:
        """Backup names that just appeared (inotify, on the event loop, before any listing): link the plain ones at
        once. lumberjack's mill gzips a backup right after the rotation and deletes the plain file; a link made by the
        listing that follows (a thread round trip later) can come after that for a small file, and then only the .gz
        is left to keep. A link and a stat on the loop, once per rotation; the guard runs at that listing."""
        with self._lock:
            if not (self._begun and self.active and self._ready):
                return
            for sibling in siblings:
                ts = sibling.ts
                if not sibling.gz and ts not in self._entries and not self._done(ts) and ts not in self._released:
                    self._link(sibling)

    def _take(self, siblings: list[Sibling], *, force: bool = False) -> None:
        self._last = siblings
        stats: dict[Path, os.stat_result] = {}
        entries: dict[str, _Entry] = {}
        gz_in_log_dir: dict[str, Path] = {}
        spool = self.directory
        for sibling in siblings:
            for name in sibling.names or (sibling.path,):
                # A backup's size and inode do not change: one stat per name. The spool's own links are looked at
                # each time (their link count says whether lumberjack still keeps the file).
                st = self._stats.get(name) if name.parent != spool else None
                if st is None:
                    try:
                        st = os.stat(name)
                    except OSError:
                        continue
                stats[name] = st
                self._largest = max(self._largest, st.st_size)
                if name.parent == spool:
                    entry = _Entry(name, sibling.ts, st.st_dev, st.st_ino, st.st_size, st.st_nlink)
                    other = entries.get(sibling.ts)
                    if other is not None:  # both forms: a swap (_swap) a SIGKILL cut short; finish it
                        plain, entry = (other, entry) if entry.gz else (entry, other)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(plain.path)
                    entries[sibling.ts] = entry
                elif name.name.endswith(".gz"):
                    gz_in_log_dir[sibling.ts] = name
            if self._newest is None or sibling.ts > self._newest:
                self._newest = sibling.ts
        self._stats, self._entries = stats, entries
        self._gz_in_log_dir = {ts: gz for ts, gz in gz_in_log_dir.items() if ts in entries and not entries[ts].gz}
        names = frozenset(stats)
        changed = force or names != self._names
        self._names = names
        if not self._begun:
            return
        if self.active and self._prepare():
            for sibling in siblings:
                if sibling.ts not in entries and not self._done(sibling.ts) and sibling.ts not in self._released:
                    changed = self._link(sibling) or changed
                    if not self._ready:  # it went off (or its directory went away)
                        break
        if changed:
            self._guard()

    def _link(self, sibling: Sibling) -> bool:
        """Link the backup into the spool: its plain name if there is one (see the module doc), else its .gz."""
        names = [n for n in sibling.names or (sibling.path,) if n.parent != self.directory]
        plain = [n for n in names if not n.name.endswith(".gz")]
        for source in plain or names[:1]:
            target = self.directory / source.name
            try:
                os.link(source, target)
            except FileExistsError:  # an earlier run's link (a SIGKILL before it was listed), or a name of another file
                try:
                    same = os.path.samefile(source, target)
                except OSError:
                    continue
                if not same:
                    log.warning("the spool already has a %s that is another file: left alone", target)
                    continue
            except FileNotFoundError:
                if not self.directory.is_dir():  # the log directory was replaced: make the spool again next time
                    self._ready = False
                    return False
                continue  # gzipped or deleted since the listing: the next listing shows what is left
            except OSError as e:
                if e.errno in _CANNOT:
                    self._off(e)
                    return False
                log.warning("cannot link %s into the spool (%s): trying again at the next listing", source, e.strerror)
                return False
            try:
                st = os.stat(target)
            except OSError:
                return False
            self._entries[sibling.ts] = _Entry(target, sibling.ts, st.st_dev, st.st_ino, st.st_size, st.st_nlink)
            return True
        return False

    # -- the checkpoint ---------------------------------------------------------------------------------------------

    def _done(self, ts: str) -> bool:
        mark = self._mark
        return mark is not None and (ts, 1) <= mark

    def saved(self, position: Position) -> bool:
        """A checkpoint naming `position` was written. True if spooled files are passed now (call prune() in a
        thread). Cheap: the checkpoint's file is known by the backup name it was read under; only a position in the
        live log costs a look at the log (once per rotation: then nothing is left to learn until the next one)."""
        with self._lock:
            name = Path(position.path).name
            ts = next((m["ts"] for p in self._patterns if (m := p.fullmatch(name))), None)
            if ts is not None:  # read as a backup: its name is its timestamp (unique), whatever its inode is now
                mark: Mark = (ts, 0)
            elif self._newest is None or (self._mark is not None and self._mark >= (self._newest, 1)):
                return False  # nothing listed that this could pass
            elif _is_file(self.log_path, position):
                mark = (self._newest, 1)  # still the live log: every backup there is is older
            else:
                return False  # the live log rotated since: the next position names its backup
            if self._mark is None or mark > self._mark:
                self._mark = mark
            return any(self._done(e.ts) for e in self._entries.values())

    def prune(self) -> None:
        """Remove the links the checkpoint has passed. Blocking."""
        with self._lock:
            for ts, entry in list(self._entries.items()):
                if self._done(ts):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    del self._entries[ts]
                    self._stats.pop(entry.path, None)

    # -- the guard ------------------------------------------------------------------------------------------------

    def _floor(self, total: int) -> int:
        if self.min_free is not None:
            return self.min_free
        return max(int(total * _FLOOR_FRACTION), 2 * self._largest)

    def _space(self) -> tuple[int, int] | None:
        try:
            vfs = os.statvfs(self.directory)
        except OSError:
            return None
        return vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize

    def _guard(self) -> None:
        """Release files only the spool keeps while over the budget or under the floor (_take has just looked at every
        link: their link counts are fresh). The oldest file not read yet goes first; the file being read and those
        read to their end but not acked go last: a crash resumes at the checkpoint and reads them again, so releasing
        one of those would lose lines no log line counts (they hold at most max_inflight_bytes and one file). Before
        all of them: a plain file lumberjack still keeps as its .gz, which is linked in its place (no loss, a
        fraction of the size; offsets into a .gz are the plain file's, so a checkpoint in it still holds)."""
        reading = self._reading

        def order(entry: _Entry) -> tuple[int, str]:
            if entry.ts in self._gz_in_log_dir:
                return 0, entry.ts  # lumberjack still keeps it (its .gz): releasing the plain file loses nothing
            return 1 + (reading(entry.ts, entry.dev, entry.ino) if reading is not None else 0), entry.ts

        alone = sorted((e for e in self._entries.values() if e.nlink <= 1), key=order)
        only = sum(e.size for e in alone)
        space = self._space()
        free, floor = (space[0], self._floor(space[1])) if space is not None else (None, None)
        for entry in alone:
            over_budget = self.max_bytes > 0 and only > self.max_bytes
            under_floor = free is not None and floor is not None and free < floor
            if not over_budget and not under_floor:
                return
            why = (
                f"the files only the spool keeps ({only} bytes) are above PYFORWARD_SPOOL_MAX_BYTES ({self.max_bytes})"
                if over_budget
                else f"the free space of its file system ({free} bytes) is below the floor ({floor} bytes, "
                "PYFORWARD_SPOOL_MIN_FREE)"
            )
            gz = self._gz_in_log_dir.get(entry.ts)
            if gz is not None:
                if not self._swap(entry, gz, why):
                    continue  # lumberjack's .gz went meanwhile: this one is not free to go, look at the next
            else:
                self._release(entry, why)
            only -= entry.size
            if free is not None:
                free += entry.size

    def _swap(self, entry: _Entry, gz: Path, why: str) -> bool:
        """Keep lumberjack's .gz of `entry` instead of the plain file: link the .gz, then unlink the plain file (a
        SIGKILL between the two leaves both forms, which the next run's guard swaps again). False if the .gz is gone."""
        target = self.directory / gz.name
        try:
            os.link(gz, target)
        except FileExistsError:
            pass  # linked by an earlier run
        except OSError:
            return False
        try:
            st = os.stat(target)
        except OSError:
            return False
        log.info("kept %s in the spool instead of %s (%d bytes) because %s: nothing is lost", target, entry.path,
                 entry.size, why)  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
        self._stats.pop(entry.path, None)
        self._entries[entry.ts] = _Entry(target, entry.ts, st.st_dev, st.st_ino, st.st_size, st.st_nlink)
        return True

    def _release(self, entry: _Entry, why: str) -> None:
        # Said and counted before the unlink: a SIGKILL between the two leaves a file reported lost that the next run
        # adopts and ships (a false alarm), never a file gone unreported.
        self._entries.pop(entry.ts, None)
        self._stats.pop(entry.path, None)
        self._released.add(entry.ts)
        data = _gzip_size(entry.path) if entry.gz else entry.size
        released = Released(entry.path, entry.ts, entry.dev, entry.ino, data if data is not None else entry.size)
        unread, avg_line = self._unread(released) if self._unread is not None else (released.size, None)
        if unread <= 0:
            log.warning(
                "released %s (%d bytes) from the spool because %s. It was read already: its lines are in flight to the "
                "receiver, and would be lost only if pyforward stopped before they are acked",
                entry.path, entry.size, why,
            )  # fmt: skip
        else:
            self.released_files += 1
            self.released_bytes += unread
            lines = f" (about {max(1, round(unread / avg_line))} lines)" if avg_line else ""
            log.error(
                "released %s (%d bytes) from the spool because %s: its %d unread bytes%s of audit events are lost. The "
                "receiver has been away longer than the spool can hold: get it back (pyforward_connected, "
                "pyforward_backlog_bytes), or give the spool more room (PYFORWARD_SPOOL_MAX_BYTES, a larger volume)",
                entry.path, entry.size, why, unread, lines,
                extra={"rate_key": f"released {entry.path}", "lost_file": str(entry.path), "lost_bytes": unread,
                       "reason": "spool_budget"},
            )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)

    # -- the operator's view --------------------------------------------------------------------------------------

    def status(self) -> SpoolStatus:
        """What the metrics and `pyforward check` show. Blocking: a stat per spooled file and a statvfs."""
        with self._lock:
            files = size = linked = 0
            for entry in self._entries.values():
                try:
                    st = os.stat(entry.path)
                except OSError:
                    continue
                files += 1
                linked += st.st_size
                if st.st_nlink <= 1:
                    size += st.st_size
            space = self._space() if self.directory.exists() else None
            return SpoolStatus(
                active=self.active,
                reason=self.reason,
                directory=self.directory,
                files=files,
                bytes=size,
                linked_bytes=linked,
                budget=self.max_bytes,
                free=space[0] if space is not None else None,
                floor=self._floor(space[1]) if space is not None else None,
            )


def _is_file(path: Path, position: Position) -> bool:
    """Does `path` name the file `position` is in: same inode and same first bytes (an inode is reused once a file is
    deleted, and a released backup's inode can be the live log's now)? Blocking: open, fstat, one pread of <= 4 KiB."""
    identity = position.file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (identity.dev, identity.ino):
            return False
        return identity.matches_head(os.pread(fd, identity.fp_len, 0))
    except OSError:
        return False
    finally:
        os.close(fd)


def _gzip_size(path: Path) -> int | None:
    """The decompressed size of a .gz from its trailer (ISIZE: the size mod 2**32 of its last member; lumberjack writes
    one member, and backups are far below 4 GiB). None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return int.from_bytes(f.read(4), "little")
    except OSError:
        return None
