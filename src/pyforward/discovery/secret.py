"""The client certificate Secret: its keys decoded, and written to files for the TLS layer (only what changed,
each file atomically)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from pyforward.atomic import replace_file_async
from pyforward.discovery.pacing import WarnOnce


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


def decode_secret(where: str, data: Any, keys: tuple[str, ...], warn_once: WarnOnce) -> dict[str, bytes] | None:
    """The Secret's `keys` decoded, in that order; None (with a warning, never a value) when one is missing or not
    base64."""
    missing = [k for k in keys if not (isinstance(data, dict) and data.get(k))]
    if missing:
        present = sorted(data) if isinstance(data, dict) else []
        warn_once(
            f"secretkeys:{','.join(missing)}:{','.join(present)}",
            f"{where} lacks key(s) {', '.join(missing)} (it has: {', '.join(present) or 'none'}); "
            "set PYFORWARD_SECRET_CA_KEY/_CERT_KEY/_KEY_KEY to its key names; keeping the current files",
        )
        return None
    decoded: dict[str, bytes] = {}
    for key in keys:
        try:
            decoded[key] = base64.b64decode(data[key], validate=True)
        except (binascii.Error, ValueError, TypeError):
            # Never show the value.
            warn_once(f"b64:{key}", f"{where} key {key} is not valid base64; keeping the current files")
            return None
    return decoded
