"""The tailer's looks at the directory between its own listings: each time a backup name changes (inotify, names only),
a listing in a thread, told to the loss ledger and the spool (issue 12: a backup deleted unread is seen while the
tailer stays in one file for long; issue 21: a rotated backup is linked into the spool before the retention deletes
it).

A mixin of the Tailer: the code reads and sets the Tailer's state as the Tailer does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pyforward.tail.scan import Sibling

if TYPE_CHECKING:
    import threading
    from pathlib import Path

    from pyforward.tail.ledger import Ledger
    from pyforward.tail.watch import DirectoryEvents

__all__ = ["DirectoryLooks"]

log = logging.getLogger("pyforward.tailer")


class DirectoryLooks:
    """The Tailer's directory looks (see the module doc); Tailer inherits it and provides what it uses."""

    if TYPE_CHECKING:  # the Tailer's, which mypy checks against these
        _path: Path
        _use_inotify: bool
        _dir_events: DirectoryEvents
        _lock: threading.RLock
        _ledger: Ledger
        _closed: bool
        _look: asyncio.Task[None] | None
        _look_again: bool

        def _list(self) -> list[Sibling]: ...
        def _spool_appeared(self, siblings: list[Sibling]) -> None: ...

    def _watch_directory(self) -> None:
        """Look at the directory each time a backup name changes (inotify, names only), not only when the tailer
        advances: a backup lumberjack deletes unread is then seen, with its size, even while the tailer stays in
        one file for long (receiver down). Retried at each advance until it works (directory not there yet)."""
        if self._use_inotify and not self._dir_events.active:
            self._dir_events.start()

    def _dir_changed(self, appeared: list[Sibling]) -> None:
        if appeared:
            with self._lock:
                self._ledger.appeared(appeared)
            self._spool_appeared(appeared)
        if self._closed:
            return
        if self._look is None or self._look.done():
            self._look = asyncio.get_running_loop().create_task(self._look_at_directory(), name="tailer-look")
        else:
            self._look_again = True  # changed while a look runs: one more after it

    async def _look_at_directory(self) -> None:
        while True:
            self._look_again = False
            try:
                await asyncio.to_thread(self._list)
            except OSError:
                pass  # reading reports I/O problems (rate-limited); the next change looks again
            except Exception:  # a bug: not silent (issue 12); the next change looks again
                log.exception("looking at %s for deleted backups failed", self._path.parent)
            if not self._look_again or self._closed:
                return
