"""Freed memory kept for the next volume: glibc's malloc set for a process that allocates the same large arrays
request after request (the inference service).

By default glibc hands every block over its mmap threshold (a few MB, moving up to 32 MB) straight to the kernel
and back, and a worker thread's arena cannot hold a block near 64 MB at all. A 160³ inference allocates and frees
several hundred MB of such arrays, so every request faulted them in again: about 81,000 page faults and 320 ms a
call in a worker thread, against 2 faults and 241 ms with the memory kept (and 4.05 against 5.97 volumes/s with two
workers). :func:`keep_freed_memory` sets one arena, an mmap threshold of 1 GiB and a trim threshold of 1 GiB: freed
blocks stay in the process for the next inference, so its resident memory stays at the peak of the largest ones
(which the service's memory budget bounds), and at most ``trim_bytes`` of free memory stays above that.

It changes the whole process, so the processes voxelflow owns call it (``voxelflow serve``), never an import.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
GiB = 1 << 30


def keep_freed_memory(mmap_bytes: int = GiB, trim_bytes: int = GiB, arenas: int = 1) -> bool:
    """Keep freed blocks under ``mmap_bytes`` in the process (one of ``arenas`` arenas, the threads' too) and give
    back only free memory beyond ``trim_bytes``. Call it before the threads that allocate start. True when glibc took
    every setting; False (logged) where the C library is not glibc's or refused one: nothing changes then."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process has loaded: its C library's among them
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has both; another C library's mallopt differs
    except (OSError, AttributeError):
        log.info("freed memory goes back to the system as the C library decides (it is not glibc)")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = {"arenas": mallopt(M_ARENA_MAX, arenas), "mmap": mallopt(M_MMAP_THRESHOLD, min(mmap_bytes, 2**31 - 1)),
             "trim": mallopt(M_TRIM_THRESHOLD, min(trim_bytes, 2**31 - 1))}
    refused = [k for k, ok in taken.items() if ok != 1]
    if refused:
        log.warning("glibc refused the malloc settings %s: large freed blocks may still go back to the system",
                    ", ".join(refused))
    return not refused
