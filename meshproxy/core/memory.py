"""Giving freed memory back to the system (glibc).

The proxy allocates buffers per connection; when thousands of connections close, glibc keeps
the freed memory in the process's heap for reuse, so the resident size stays at its peak.
``release_free_memory()`` (glibc's ``malloc_trim(0)``) returns the free pages; the L7 server
calls it after many connections closed. ``fix_mmap_threshold()`` stops glibc from raising its
mmap threshold as large blocks are freed (its default, dynamic behaviour), so blocks of 128 KiB
and more keep coming from mmap and go back to the system as soon as they are freed. Both are
no-ops where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["fix_mmap_threshold", "release_free_memory"]

log = logging.getLogger("meshproxy.memory")

_M_MMAP_THRESHOLD = -3      # mallopt parameter (malloc.h)
_MMAP_THRESHOLD = 128 * 1024


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return lib
    except (OSError, AttributeError):   # not glibc
        return None


_LIBC = _libc()


def release_free_memory() -> bool:
    """Return free heap pages to the system; True when glibc did something."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def fix_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at 128 KiB (see the module docstring)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
