"""protocol.gzip_compress: ISA-L (python-isal, optional) and zlib produce the same, standard gzip member."""

from __future__ import annotations

import zlib

import pytest

from pyforward import protocol
from pyforward.auditgen import generate_events
from pyforward.protocol import _writers

DATA = b"".join(generate_events(500, seed=3))
SMALL = DATA[: DATA.index(b"\n", 8000) + 1]  # a chunk at a steady rate: ISA-L's small state


@pytest.mark.parametrize("backend", ["zlib", "isal"])
@pytest.mark.parametrize("level", [1, 6])
@pytest.mark.parametrize("data", [DATA, SMALL], ids=["bulk", "steady"])
def test_one_standard_member_either_way(
    monkeypatch: pytest.MonkeyPatch, backend: str, level: int, data: bytes
) -> None:
    if backend == "isal":
        if _writers._igzip() is None:
            pytest.skip("python-isal is not installed")
    else:
        monkeypatch.setattr(_writers, "_IGZIP", None)
    assert (len(data) <= _writers._SMALL_GZIP_STATE_BYTES) == (data is SMALL)
    blob = protocol.gzip_compress(data, level)
    decompressor = zlib.decompressobj(wbits=31)
    assert decompressor.decompress(blob) == data
    assert decompressor.eof
    assert decompressor.unused_data == b""
    assert len(blob) < len(data) / 3
