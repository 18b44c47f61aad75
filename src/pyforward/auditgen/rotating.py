"""`RotatingAuditLog`: a log written the way kube-apiserver writes it with lumberjack (size-based rotation by
rename, timestamped backups, optional gzip by a mill, max backups)."""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final

_BACKUP_FORMAT: Final = "%Y-%m-%dT%H-%M-%S.%f"  # lumberjack's backupTimeFormat "2006-01-02T15-04-05.000"
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RotatingAuditLog:
    """Append lines to ``path`` and rotate it like lumberjack (kube-apiserver's audit log writer).

    Before a write that would make the file exceed ``max_bytes``, the file is closed, renamed to
    ``<stem>-<UTC %Y-%m-%dT%H-%M-%S.mmm><ext>`` (``audit-2026-11-26T12-00-00.000.log``) and a new file is
    created at ``path`` with the old file's mode. Names are unique and increase: when the millisecond is already
    taken (or earlier than the previous backup's), the next free millisecond is used. ``max_backups`` keeps only
    the newest rotated files; ``compress`` gzips each rotated file to ``<name>.gz`` and deletes the original.

    By default that happens synchronously inside the write that rotates, so that tests are deterministic. With
    ``mill=True`` it happens as lumberjack v2.2.1 does it (``millRunOnce``): in one background thread, at most one
    pass queued, after the write returned. A pass lists the backups newest first, removes those beyond
    ``max_backups`` (a ``.log`` and its ``.log.gz`` count once), then gzips each remaining plain backup: the
    ``.gz`` is created (truncating a leftover), written and closed, and only then is the plain file removed. So a
    reader sees backups vanish and plain files replaced by a ``.gz`` concurrently (tests of issue 12, the bench's
    soak scenario). :meth:`settle` waits for the mill to be idle; :meth:`close` settles it.

    Lines are never split across files: a write holds whole lines only (a missing trailing ``\\n`` is
    added), and a single line longer than ``max_bytes`` goes alone into a fresh file (lumberjack refuses such
    writes; kube-apiserver would lose the event, a test corpus should not). Writes are unbuffered, one
    ``write(2)`` per :meth:`write` call, as lumberjack does; :meth:`write_many` batches whole lines.

    ``clock`` (UTC now) is injectable for tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_backups: int | None = None,
        compress: bool = False,
        clock: Callable[[], datetime] = _utc_now,
        mill: bool = False,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"RotatingAuditLog: max_bytes must be > 0, got {max_bytes}")
        if max_backups is not None and max_backups < 0:
            raise ValueError(f"RotatingAuditLog: max_backups must be >= 0, got {max_backups}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self.compress = compress
        self._clock = clock
        self._stem = self.path.stem
        self._ext = self.path.suffix
        self._backup_re = re.compile(
            re.escape(self._stem + "-")
            + r"(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})"
            + re.escape(self._ext)
            + r"(?:\.gz)?"
        )
        self._last_backup_ms: int | None = None
        self._rotations = 0
        self._fd: int | None = None
        self._size = 0
        self.mill = mill
        self.mill_errors: list[OSError] = []  # what the background mill could not do (lumberjack ignores them too)
        self._mill_cond = threading.Condition()
        self._mill_queued = False
        self._mill_running = False
        self._mill_closing = False
        self._mill_thread: threading.Thread | None = None
        self._open()

    @property
    def rotations(self) -> int:
        return self._rotations

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._size

    def _open(self, mode: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:  # an existing file is appended to (lumberjack's openExistingOrNew)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:  # after a rotation: openNew, O_CREATE|O_TRUNC with the old file's mode
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, mode)
        self._size = os.fstat(self._fd).st_size

    def _write_all(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"RotatingAuditLog: {self.path} is closed")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    def write(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            line += b"\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._write_all(line)

    def write_many(self, lines: Iterable[bytes]) -> None:
        batch: list[bytes] = []
        batch_size = 0
        for line in lines:
            if not line.endswith(b"\n"):
                line += b"\n"
            size = len(line)
            if self._size + batch_size and self._size + batch_size + size > self.max_bytes:
                if batch:
                    self._write_all(b"".join(batch))
                    batch.clear()
                    batch_size = 0
                self._rotate()
            batch.append(line)
            batch_size += size
            if batch_size >= 1 << 20:
                self._write_all(b"".join(batch))
                batch.clear()
                batch_size = 0
        if batch:
            self._write_all(b"".join(batch))

    def _backup_name(self) -> Path:
        now = self._clock()
        if now.tzinfo is not None:
            now = now.astimezone(UTC).replace(tzinfo=None)
        ms = (now - _EPOCH_NAIVE) // timedelta(milliseconds=1)
        if self._last_backup_ms is not None and ms <= self._last_backup_ms:
            ms = self._last_backup_ms + 1
        while True:
            stamp = (_EPOCH_NAIVE + timedelta(milliseconds=ms)).strftime(_BACKUP_FORMAT)[:-3]
            candidate = self.path.with_name(f"{self._stem}-{stamp}{self._ext}")
            if not candidate.exists() and not candidate.with_name(candidate.name + ".gz").exists():
                self._last_backup_ms = ms
                return candidate
            ms += 1

    def _rotate(self) -> None:
        mode = 0o600  # lumberjack's default when there was no file
        if self._fd is not None:
            mode = os.fstat(self._fd).st_mode & 0o7777
            os.close(self._fd)
            self._fd = None
        backup = self._backup_name()
        os.rename(self.path, backup)
        self._open(mode)
        self._rotations += 1
        if self.mill:
            self._request_mill()
            return
        if self.compress:
            compressed = backup.with_name(backup.name + ".gz")
            with backup.open("rb") as source, gzip.open(compressed, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target, 1 << 20)
            backup.unlink()
        if self.max_backups is not None:
            self._remove_old_backups(self.max_backups)

    def backups(self) -> list[Path]:
        """Rotated files (``.log`` or ``.log.gz``), oldest first."""
        found: list[tuple[str, str, Path]] = []
        for entry in self.path.parent.iterdir():
            match = self._backup_re.fullmatch(entry.name)
            if match is not None:
                found.append((match.group(1), entry.name, entry))
        found.sort()
        return [entry for _, _, entry in found]

    def _remove_old_backups(self, keep: int) -> None:
        by_stamp: dict[str, list[Path]] = {}
        for backup in self.backups():
            match = self._backup_re.fullmatch(backup.name)
            assert match is not None
            by_stamp.setdefault(match.group(1), []).append(backup)
        stamps = sorted(by_stamp)
        for stamp in stamps[: max(0, len(stamps) - keep)]:
            for old in by_stamp[stamp]:
                old.unlink(missing_ok=True)

    # -- lumberjack's mill (mill=True) ------------------------------------------------------------------------

    def _request_mill(self) -> None:
        # lumberjack: `select { case l.millCh <- true: default: }` on a channel of capacity 1.
        with self._mill_cond:
            self._mill_queued = True
            if self._mill_thread is None:
                self._mill_thread = threading.Thread(target=self._mill_loop, name="auditgen-mill", daemon=True)
                self._mill_thread.start()
            self._mill_cond.notify_all()

    def _mill_loop(self) -> None:
        while True:
            with self._mill_cond:
                while not self._mill_queued and not self._mill_closing:
                    self._mill_cond.wait()
                if not self._mill_queued:
                    return
                self._mill_queued = False
                self._mill_running = True
            try:
                self._mill_run_once()
            finally:
                with self._mill_cond:
                    self._mill_running = False
                    self._mill_cond.notify_all()

    def _mill_run_once(self) -> None:
        files = sorted(self.backups(), key=lambda p: self._stamp(p), reverse=True)  # newest first
        remaining = files
        if self.max_backups is not None:
            preserved: set[str] = set()
            remaining = []
            for path in files:
                preserved.add(path.name.removesuffix(".gz"))
                if len(preserved) > self.max_backups:
                    self._mill_do(path.unlink)
                else:
                    remaining.append(path)
        if self.compress:
            for path in remaining:
                if not path.name.endswith(".gz"):
                    self._mill_do(functools.partial(self._compress_file, path))

    def _stamp(self, path: Path) -> str:
        match = self._backup_re.fullmatch(path.name)
        assert match is not None
        return match.group(1)

    def _mill_do(self, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError as e:
            self.mill_errors.append(e)

    @staticmethod
    def _compress_file(source: Path) -> None:
        target = source.with_name(source.name + ".gz")
        with source.open("rb") as src:
            mode = os.fstat(src.fileno()).st_mode & 0o7777
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            except BaseException:
                target.unlink(missing_ok=True)  # lumberjack removes a partial .gz
                raise
        source.unlink()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the mill has nothing queued or running. True if it is idle."""
        with self._mill_cond:
            return self._mill_cond.wait_for(lambda: not self._mill_queued and not self._mill_running, timeout)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with self._mill_cond:
            self._mill_closing = True
            self._mill_cond.notify_all()
            thread = self._mill_thread
        if thread is not None:
            thread.join()  # the pass queued last runs first: nothing is left half done

    def __enter__(self) -> RotatingAuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
