"""Crash-safe file replacement, for the checkpoint and the certificate files written from the Secret."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["fsync_directory", "replace_file", "replace_file_async"]


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a crash leaves the old file or the new one, never a mix.

    The temp file lives in the same directory (rename is atomic only within a file system) and is created
    mode 0600 (mkstemp); it is fsynced before the rename. Call :func:`fsync_directory` afterwards for the
    rename itself to survive a power loss. Raises OSError (read-only dir, disk full); ``path`` is then untouched.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def replace_file_async(path: Path, data: bytes) -> None:
    """:func:`replace_file` then :func:`fsync_directory`, from the event loop: every blocking step (create, write,
    fsync, rename, directory fsync) runs in aiofiles' worker threads, so a slow disk never stalls the loop.

    The Secret's files (when the Secret changes) are written this way; aiofiles is imported on the first write, not at
    start-up. (The checkpoint is not: one thread round trip for its whole save is cheaper, see checkpoint.py.)
    """
    import aiofiles.os
    import aiofiles.tempfile

    out = await aiofiles.tempfile.NamedTemporaryFile(  # mkstemp underneath: mode 0600, O_EXCL
        "wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    tmp = str(out.name)
    try:
        try:
            await out.write(data)
            await out.flush()
            await aiofiles.os.wrap(os.fsync)(out.fileno())
        finally:
            await out.close()
        await aiofiles.os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # one unlink of a file we just made: not worth a thread, and it must run even if cancelled
        raise
    await aiofiles.os.wrap(fsync_directory)(path.parent)
