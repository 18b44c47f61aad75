"""Waiting for the log to change: inotify on its directories, else polling (fluent-bit: tail_fs_inotify.c,
tail_fs_stat.c)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyforward.tail.file import Source
from pyforward.tail.scan import Sibling, specs

try:  # Linux only (a dependency only there); elsewhere wait() polls
    import inotify_simple

    _HAVE_INOTIFY = True
    _F = inotify_simple.flags
    _WATCH_MASK = int(
        _F.CREATE | _F.MODIFY | _F.MOVED_TO | _F.MOVED_FROM | _F.DELETE | _F.ATTRIB | _F.CLOSE_WRITE | _F.DELETE_SELF
        | _F.MOVE_SELF
    )  # fmt: skip
    _IGNORED = int(_F.IGNORED)
    _OVERFLOW = int(_F.Q_OVERFLOW)
    _RENAMED = int(_F.CREATE | _F.DELETE | _F.MOVED_FROM | _F.MOVED_TO)
    _NAMES_MASK = _RENAMED  # DirectoryEvents: names only, no event per write
    _APPEARED = int(_F.CREATE | _F.MOVED_TO)
except ImportError:  # pragma: no cover
    _HAVE_INOTIFY = False

__all__ = ["DirectoryEvents", "Watcher", "stat_key"]

log = logging.getLogger("pyforward.tailer")

#: mark() drains the inotify queue at most this often (seconds).
_DRAIN_INTERVAL = 1.0

#: wait() returns at least this often even without any event: inotify can miss changes (queue overflow,
#: a directory replaced under the watch) and errors such as EACCES are retried only when wait() returns.
_SAFETY_WAKEUP = 5.0


def stat_key(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError as e:
        return e.errno
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


@dataclass(frozen=True, slots=True)
class _Layout:
    dirs: list[Path]  # directories to watch: the log's, and its target's if it is a symlink elsewhere
    names: frozenset[str]  # the log's name and its target's
    patterns: list[re.Pattern[str]]  # backup names


def _resolve(future: asyncio.Future[None]) -> None:
    # Level-triggered: the reader callback may run again before the waiting task resumes and removes it.
    if not future.done():
        future.set_result(None)


class Watcher:
    """Tells the tailer when the log may have changed. `current` gives the file being read (its size is part of
    what polling compares)."""

    def __init__(
        self, path: Path, *, poll_interval: float, use_inotify: bool, current: Callable[[], Source | None]
    ) -> None:
        self._path = path
        self._poll_interval = poll_interval
        self._use_inotify = use_inotify
        self._current = current
        self._baseline: object = None  # signature() when the last read_batch began (polling)
        # The last wait() polled. (If the next one falls back to polling, its stale baseline makes it return at
        # once: one spurious wakeup, after which read_batch takes baselines again.)
        self._polled = True
        # inotify_simple, not asyncinotify: the events are parsed with struct into plain tuples, ~9 us each instead of
        # ~60 us (ctypes, pathlib and enum.Flag per event), two of them per chunk at steady rates (issue 11).
        self.inotify: inotify_simple.INotify | None = None
        self._watched: dict[Path, tuple[int, int]] = {}  # dir -> (dev, ino) watched
        self._watch_paths: dict[int, Path] = {}  # watch descriptor -> dir
        self._layout: _Layout | None = None
        self._drained = float("-inf")  # monotonic time of mark()'s last drain

    async def mark(self) -> None:
        """Called as a read begins: a change after this makes the next wait() return."""
        if self.inotify is None and self._use_inotify:
            # Watch before the first read, not at the first wait: a write in between would go unnoticed until the
            # safety wakeup, and until a wait a reader that never needs one (steady rates) would take a polling
            # baseline in a thread before every read.
            self._polled = self._ensure_inotify() is None
        if self._polled:  # only polling needs the baseline: with inotify, one thread round trip less per read
            self._baseline = await asyncio.to_thread(self.signature)
        elif self.inotify is not None:
            # The read that follows sees every change made so far: the events queued for them would only make the
            # next wait() return at once for nothing (one read that finds nothing). That is cheaper than draining them
            # before every read (a syscall or two and the parsing, a good part of a chunk's CPU at steady rates,
            # issue 11), so they are drained only once in a while, to keep the kernel's queue short (the checkpoint's
            # writes beside the log interleave with the log's write events, which inotify would otherwise merge).
            # A change after a drain queues a new event: never a missed wakeup.
            now = time.monotonic()
            if now - self._drained >= _DRAIN_INTERVAL:
                self._drained = now
                relevant = self._matcher()
                for event in self.inotify.read(timeout=0):
                    relevant(event)

    async def wait(self, timeout: float | None) -> None:
        """Return when the log may have changed (inotify, else polling every poll_interval) or on timeout.

        May return early without a change; the caller just calls read_batch again.
        """
        limit = _SAFETY_WAKEUP if timeout is None else min(max(timeout, 0.0), _SAFETY_WAKEUP)
        inotify = self._ensure_inotify()
        self._polled = inotify is None
        if inotify is not None:
            await self._wait_inotify(inotify, limit)
        else:
            await self._wait_poll(limit)

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

    def signature(self) -> object:
        """What polling compares: the log, its directories, the size of the open file. Blocking."""
        parts: list[object] = [stat_key(self._path), stat_key(self._path.parent)]
        real_parent = Path(os.path.realpath(self._path)).parent
        if real_parent != self._path.parent:
            parts.append(stat_key(real_parent))
        src = self._current()
        if src is not None and src.gz is None and not src.closed:
            try:
                parts.append(os.fstat(src.fd).st_size)
            except OSError as e:
                parts.append(e.errno)
        return tuple(parts)

    async def _wait_poll(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if await asyncio.to_thread(self.signature) != self._baseline:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(self._poll_interval, remaining))

    def _watch_dirs(self) -> list[Path]:
        return self._get_layout().dirs

    def _get_layout(self) -> _Layout:
        """Where the log really is (it may be a symlink) and the names that matter, worked out once and again only after
        a change of the log's name, its directories or a quiet wait: realpath costs a few syscalls each time, and
        doing it per wait and per event was a good part of the CPU at steady rates (issue 11)."""
        if self._layout is None:
            real = Path(os.path.realpath(self._path))
            dirs = [self._path.parent]
            if real.parent != Path(os.path.realpath(self._path.parent)):
                dirs.append(real.parent)
            names = frozenset({self._path.name, real.name})
            self._layout = _Layout(dirs, names, [pattern for _, pattern in specs(self._path)])
        return self._layout

    def _ensure_inotify(self) -> inotify_simple.INotify | None:
        """An inotify watching the log's directories, or None to poll (disabled, unavailable, a dir is
        missing: inotify cannot watch for a directory to appear)."""
        if not self._use_inotify:
            return None
        if self.inotify is None:
            if not _HAVE_INOTIFY:
                log.info("inotify is not available here: polling %s every %ss", self._path, self._poll_interval)
                self._use_inotify = False
                return None
            try:
                self.inotify = inotify_simple.INotify()
            except OSError as e:  # EMFILE: fs.inotify.max_user_instances reached
                log.warning(
                    "cannot use inotify (%s): polling %s every %ss", e.strerror, self._path, self._poll_interval
                )
                self._use_inotify = False
                return None
        if self._layout is not None and len(self._watched) == len(self._layout.dirs):
            # Watched, and no event since said a directory went (IGNORED) or the log's name changed: nothing to look
            # at (a stat per directory per wait was a syscall per chunk at steady rates).
            return self.inotify
        mask = _WATCH_MASK
        complete = True
        for directory in self._watch_dirs():
            try:
                st = os.stat(directory)
                key = (st.st_dev, st.st_ino)
                if self._watched.get(directory) != key:  # new, or deleted and recreated
                    self._watch_paths[self.inotify.add_watch(directory, mask)] = directory
                    self._watched[directory] = key
            except OSError:
                self._watched.pop(directory, None)
                complete = False
        return self.inotify if complete else None

    def _matcher(self) -> Callable[[inotify_simple.Event], bool]:
        """A test of whether an event is about the log, its directories or its backups. (Masks are tested as plain
        ints: enum.Flag operators run Python code, a few of them per event added up at steady rates.)"""
        layout = self._get_layout()
        names, patterns = layout.names, layout.patterns

        def relevant(event: inotify_simple.Event) -> bool:
            mask = event.mask
            if mask & _IGNORED:  # the watched directory is gone: re-watch once it is back
                directory = self._watch_paths.pop(event.wd, None)
                if directory is not None:
                    self._watched.pop(directory, None)
                self._layout = None
                return True
            name = event.name
            if not name or mask & _OVERFLOW:
                self._layout = None
                return True  # about the directory itself, or queue overflow
            if name in names:
                if mask & _RENAMED:  # a new file or symlink at the log's name: it may point elsewhere now
                    self._layout = None
                return True
            return any(pattern.fullmatch(name) for pattern in patterns)

        return relevant

    async def _wait_inotify(self, inotify: inotify_simple.INotify, limit: float) -> None:
        # Events queued while we were reading make this return at once: that can be one spurious wakeup, never a
        # missed one (mark() drains what came before a read; any change after it makes a new event).
        relevant = self._matcher()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        fd = inotify.fileno()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._layout = None  # the safety wakeup looks at the layout afresh (a missed event, a moved dir)
                return
            # (Queued events make the fd readable at once: no read before waiting, one syscall less per wait.)
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, readable)
            timer = loop.call_at(deadline, _resolve, readable)
            try:
                await readable
            finally:
                timer.cancel()
                loop.remove_reader(fd)
            found = False
            for event in inotify.read(timeout=0):  # every event is looked at (IGNORED, overflow: see relevant)
                found = relevant(event) or found
            if found:
                return


class DirectoryEvents:
    """Names appearing and disappearing in the log's directories, as they happen (issue 12: a backup that lumberjack
    creates and deletes between two of the tailer's listings would be lost unseen).

    A separate inotify instance with names only (create, rename, delete: no event per write), read by the event loop
    as events come (`loop.add_reader`): no timer, no cost while nothing rotates. `on_change(appeared)` gets the
    backup names that appeared (renamed to or created) since the last call; it is called for any change of a backup
    name or of the live log's name, and on an inotify queue overflow (with what it could read).
    """

    def __init__(self, path: Path, on_change: Callable[[list[Sibling]], None]) -> None:
        self._path = path
        self._on_change = on_change
        self._inotify: inotify_simple.INotify | None = None
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory
        self._loop: asyncio.AbstractEventLoop | None = None
        self.active = False  # watching now

    def start(self) -> bool:
        """Watch the directories (again, after one was replaced). False if inotify cannot be used here; call from
        the event loop."""
        if self.active:
            return True
        self.close()
        if not _HAVE_INOTIFY:
            return False
        try:
            inotify = inotify_simple.INotify()
        except OSError:
            return False
        try:
            self._dirs = {
                inotify.add_watch(directory, _NAMES_MASK): str(directory) for directory, _ in specs(self._path)
            }
        except OSError:  # a directory is missing (not yet mounted): the tailer's listings still see everything
            inotify.close()
            return False
        self._inotify = inotify
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(inotify.fileno(), self._readable)
        self.active = True
        return True

    def close(self) -> None:
        self.active = False
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def _readable(self) -> None:
        inotify = self._inotify
        if inotify is None:
            return
        patterns = [pattern for _, pattern in specs(self._path)]
        live_names = {self._path.name, Path(os.path.realpath(self._path)).name}
        appeared: list[Sibling] = []
        changed = False
        try:
            for event in inotify.read(timeout=0):
                if event.mask & (_IGNORED | _OVERFLOW) or not event.name:
                    changed = True
                    if event.mask & _IGNORED:
                        self.active = False  # a watched directory is gone: start() again at the next advance
                    continue
                name = event.name
                match = next((m for pattern in patterns if (m := pattern.fullmatch(name))), None)
                if match is not None:
                    changed = True
                    directory = self._dirs.get(event.wd)
                    if event.mask & _APPEARED and directory is not None:
                        path = Path(directory, name)
                        appeared.append(Sibling(path, match["ts"], match["gz"] is not None))
                elif name in live_names:
                    changed = True
        except OSError as e:  # the fd is broken: fall back to the tailer's listings
            log.warning("inotify on the log directory failed (%s): losses are found by listings only", e)
            self.close()
            changed = True
        if not self.active:
            self.close()
        if changed:
            self._on_change(appeared)
