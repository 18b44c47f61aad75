"""pyforward.memory: glibc's mmap threshold stays where it is, so big freed buffers leave the heap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Frees a 1 MiB buffer, then allocates another and says whether glibc served it with mmap (mallinfo2's hblkhd:
# bytes in mmapped blocks). With glibc's dynamic threshold the first free raises the threshold to 1 MiB and the
# second buffer comes from the heap, where freeing it keeps it resident.
PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from pyforward.memory import pin_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
    first = bytes(1 << 20)
    del first
    second = bytearray(1 << 20)
    print(pinned, libc.mallinfo2().hblkhd >= 1 << 20)
    """
)


def probe(mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(SRC)
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="glibc only")  # fmt: skip
def test_a_big_buffer_is_still_mmapped_after_another_was_freed() -> None:
    assert probe("dynamic") == "False False"  # glibc's default: the threshold rose, the buffer is in the heap
    assert probe("pin") == "True True"


def test_an_operator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyforward.memory import pin_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold() is False
