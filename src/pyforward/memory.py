"""glibc's malloc, told not to keep what a long-running process frees (issue 11 item 5, bench/README.md "soak").

glibc serves allocations of 128 KiB or more with mmap, and returns them to the kernel when they are freed; but
its threshold is dynamic: each time such a block is freed, the threshold rises to its size (up to 32 MiB). One
freed 1 MiB buffer (a read, a decompressed piece of a .gz backup, a msgpack buffer) is enough: from then on the
1 MiB buffers of every read come from the heaps of the event loop and of the worker threads, and what is freed
there stays resident whenever something small is allocated after it. Catching up on gzip backups left ~70 MB
free but resident (malloc_trim gave it back); the soak's RSS crept up. Pinning the threshold (M_MMAP_THRESHOLD,
which also turns the dynamic adjustment off) keeps big buffers out of the heaps: their memory is returned when
they are freed, at the price of an mmap and its page faults per big buffer (not measurable in the bench).
"""

from __future__ import annotations

import os

__all__ = ["MMAP_THRESHOLD", "pin_mmap_threshold"]

#: glibc's default (and initial) threshold.
MMAP_THRESHOLD = 128 << 10
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def pin_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """mallopt(M_MMAP_THRESHOLD, size) when the C library is glibc. False when it is not (musl has its own
    allocator) or when the operator set MALLOC_MMAP_THRESHOLD_ (glibc's environment variable) themselves."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc: mallopt may be a stub, and the threshold logic above does not apply
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False
