"""The host allocator, set for serving: memory a step frees is kept for the next step.

A prefill step of 8,192 tokens allocates and frees 20-50 MB activations dozens of times
per layer. glibc serves blocks over 32 MB (and, after a free, whatever lies above its
trim threshold) straight from the kernel and gives them back on free, so every step
faults in and zeroes the same gigabytes again: ~5-15% of a W1 prefill step here. With
mmap off and trimming high, freed blocks stay in the heap for reuse, as a serving process
wants (vLLM's CPU guide has tcmalloc preloaded for the same reason). Opt out with
``INFINITE_LLM_KEEP_HOST_MEMORY=0``; a ``MALLOC_*`` setting of the user's own wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def keep_freed_host_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (once per process); whether it did."""
    if os.environ.get("INFINITE_LLM_KEEP_HOST_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc: its allocator has its own rules
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1: never trim (mallopt(3)); 0 mmaps: every block comes from the heap.
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, -1)) and bool(libc.mallopt(_M_MMAP_MAX, 0))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") else None


def trim_host_memory() -> bool:
    """Give the memory glibc holds free back to the system (``malloc_trim``): for a
    process that has nothing to reuse it for now, e.g. a server with no step running,
    after a large request was refused. Whether anything was returned."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(libc.malloc_trim(0))


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc does not say)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
