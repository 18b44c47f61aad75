"""protocol.gzip_compress: ISA-L (python-isal, optional) and zlib produce the same, standard gzip member."""

from __future__ import annotations

import zlib

import pytest

from pyforward import protocol
from pyforward.auditgen import generate_events

DATA = b"".join(generate_events(500, seed=3))


@pytest.mark.parametrize("backend", ["zlib", "isal"])
@pytest.mark.parametrize("level", [1, 6])
def test_one_standard_member_either_way(monkeypatch: pytest.MonkeyPatch, backend: str, level: int) -> None:
    if backend == "isal":
        if protocol._isal_zlib() is None:
            pytest.skip("python-isal is not installed")
    else:
        monkeypatch.setattr(protocol, "_ISAL_ZLIB", None)
    blob = protocol.gzip_compress(DATA, level)
    decompressor = zlib.decompressobj(wbits=31)
    assert decompressor.decompress(blob) == DATA
    assert decompressor.eof
    assert decompressor.unused_data == b""
    assert len(blob) < len(DATA) / 4
