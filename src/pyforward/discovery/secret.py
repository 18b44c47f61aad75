"""The client certificate Secret's files, for the TLS layer."""

from __future__ import annotations

from pathlib import Path

from pyforward.atomic import replace_file_async


async def write_files(directory: Path, files: dict[str, bytes]) -> list[str]:
    """Write each changed file atomically (temp file in the directory, 0600, fsync, rename, directory fsync), in the
    order given, with aiofiles (no blocking call on the loop). Returns the names written. Each file is replaced
    atomically, the three together are not: the TLS layer (certs.py) checks that key and certificate belong together
    before it uses them, and keeps the last good context until they do."""
    import aiofiles
    import aiofiles.os

    await aiofiles.os.makedirs(directory, exist_ok=True, mode=0o700)
    written: list[str] = []
    for name, content in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"Secret key {name!r} is not a usable file name")
        path = directory / name
        try:
            async with aiofiles.open(path, "rb") as current:
                same = await current.read() == content
            same = same and ((await aiofiles.os.stat(path)).st_mode & 0o777) == 0o600
        except OSError:
            same = False
        if same:
            continue
        await replace_file_async(path, content)
        written.append(name)
    return written
