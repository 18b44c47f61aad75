"""lumberjack's backup names, and listing a log's rotated siblings (fluent-bit: tail_scan.c)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DirectoryState",
    "Sibling",
    "directory_state",
    "go_ext",
    "list_siblings",
    "sibling_pattern",
    "specs",
    "twin",
]

#: lumberjack's backup time format "2006-01-02T15-04-05.000" (UTC unless LocalTime is set).
#: Fixed width, so the lexicographic order of the names is their chronological order.
_TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d{1,9})?"


def go_ext(name: str) -> tuple[str, str]:
    """(prefix, ext) as lumberjack splits a name: Go's filepath.Ext, the suffix from the last dot."""
    dot = name.rfind(".")
    return (name, "") if dot < 0 else (name[:dot], name[dot:])


def sibling_pattern(name: str) -> re.Pattern[str]:
    prefix, ext = go_ext(name)
    return re.compile(rf"{re.escape(prefix)}-(?P<ts>{_TIMESTAMP}){re.escape(ext)}(?P<gz>\.gz)?")


@dataclass(frozen=True, slots=True)
class Sibling:
    """One rotated backup (one timestamp), under the name to read it by."""

    path: Path  # a plain name wins over a .gz; between two plain names (log directory, spool), the log directory's
    ts: str
    gz: bool
    # Every name this backup had in the listing, `path` included (the .gz beside the plain file, the spool's link);
    # empty when the Sibling was not made by list_siblings (an inotify event names one file).
    names: tuple[Path, ...] = ()


def specs(path: Path, spool: Path | None = None) -> list[tuple[Path, re.Pattern[str]]]:
    """Where backups are: next to the configured path, next to its target if it is a symlink, and in the spool
    (tail/spool.py: hard links under lumberjack's own names, issue 21), which is last."""
    specs = [(path.parent, sibling_pattern(path.name))]
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(path.parent)):
        specs.append((real.parent, sibling_pattern(real.name)))
    elif real.name != path.name:
        specs.append((path.parent, sibling_pattern(real.name)))
    if spool is not None:
        specs.extend((spool, pattern) for _, pattern in list(specs))
    return specs


def twin(path: Path) -> Path:
    """The other name of a backup: `audit-X.log` <-> `audit-X.log.gz` (lumberjack writes the .gz, then deletes the
    plain file: a backup gone under one name may be there under the other)."""
    name = path.name
    return path.with_name(name[:-3]) if name.endswith(".gz") else path.with_name(name + ".gz")


@dataclass(frozen=True, slots=True)
class DirectoryState:
    """What a listing depends on: (dev, ino, mtime, ctime) of each directory backups live in. Creating, renaming or
    deleting a name changes the directory's mtime, so an unchanged state means an unchanged listing, except for a
    change within the file system's timestamp granularity after the listing began (see `racy`)."""

    key: tuple[object, ...]
    newest_mtime_ns: int

    def racy(self, listed_at_ns: int) -> bool:
        """A listing begun at `listed_at_ns` (time.time_ns()) may have missed a change that left the mtime as it was
        (coarse kernel timestamps: up to a jiffy, 4-10 ms; 100 ms leaves room for NFS/overlay): "racy git"."""
        return self.newest_mtime_ns >= listed_at_ns - 100_000_000


def directory_state(path: Path, spool: Path | None = None) -> DirectoryState:
    """Blocking: one stat per directory in specs(path, spool)."""
    parts: list[object] = []
    newest = 0
    for directory in dict.fromkeys(directory for directory, _ in specs(path, spool)):
        try:
            st = os.stat(directory)
        except OSError as e:
            parts.append(e.errno)
            continue
        parts.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
        newest = max(newest, st.st_mtime_ns)
    return DirectoryState(tuple(parts), newest)


def list_siblings(path: Path, spool: Path | None = None) -> list[Sibling]:
    """Rotated backups, oldest first, one per timestamp; a plain file wins over a .gz of the same time (lumberjack
    removes the plain file only once the .gz is complete). The spool's links are merged in by timestamp: a backup
    whose name lumberjack deleted is read from the spool, in its place (issue 21). Blocking."""
    found: dict[tuple[str, str], Sibling] = {}
    by_ts: dict[str, tuple[str, str]] = {}  # timestamp -> its key in `found` (the spool merges by timestamp)
    spool_dir = os.path.realpath(spool) if spool is not None else None
    listed: dict[str, list[os.DirEntry[str]]] = {}
    for directory, pattern in specs(path, spool):
        real_dir = os.path.realpath(directory)
        entries = listed.get(real_dir)
        if entries is None:
            try:
                entries = listed[real_dir] = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                entries = listed[real_dir] = []
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if m is None:
                continue
            ts, gz, name = m["ts"], m["gz"] is not None, Path(entry.path)
            key = by_ts.get(ts, (real_dir, ts)) if real_dir == spool_dir else (real_dir, ts)
            by_ts.setdefault(ts, key)
            seen = found.get(key)
            if seen is None:
                found[key] = Sibling(name, ts, gz, (name,))
            elif name not in seen.names:
                names = (*seen.names, name)
                wins = seen.gz and not gz
                found[key] = Sibling(name, ts, gz, names) if wins else Sibling(seen.path, ts, seen.gz, names)
    return sorted(found.values(), key=lambda s: (s.ts, str(s.path)))
