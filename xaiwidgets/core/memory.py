"""Giving freed heap memory back to the operating system (glibc's ``malloc_trim``).

Explanations allocate large transient buffers (gradients of a batch, IG chunks, LRP's
graph). PyTorch frees them, but glibc keeps much of the freed heap mapped for reuse:
in a long-running kernel that runs many explanations on fresh Explainers, resident
memory then grows by hundreds of MB although the live tensors stay flat (on a 2 GB
Binder that is as bad as a leak). ``malloc_trim(0)`` hands the free pages back.

:func:`release_memory` is called by the Explainer after each explanation. It trims
only on Linux with glibc (elsewhere it does nothing and never fails), only when the
resident size grew by :data:`GROWTH` since the last trim, and at most once every
:data:`INTERVAL` seconds (a trim walks the heap: a few milliseconds).

>>> release_memory(force=True) in (True, False)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time

#: trim only after the resident size grew by this many bytes since the last trim
GROWTH = 32 * 2**20
#: at most one trim per this many seconds
INTERVAL = 0.5
#: switched off, :func:`release_memory` does nothing (benchmarks measure the retention)
ENABLED = True

_LOCK = threading.Lock()
_STATE = {"last": 0.0, "rss": 0}
_TRIM: list = []  # [malloc_trim or None], looked up once


def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where there is none (not Linux, musl...)."""
    if not _TRIM:
        trim = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if not hasattr(libc, "gnu_get_libc_version"):  # only glibc has it
                    raise AttributeError("not glibc")
                trim = libc.malloc_trim
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                trim = None
        _TRIM.append(trim)
    return _TRIM[0]


def resident_bytes() -> int:
    """This process's resident set size in bytes (0 where /proc is unavailable).

    >>> resident_bytes() >= 0
    True
    """
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory(force: bool = False) -> bool:
    """Give freed heap pages back to the OS (``malloc_trim(0)``); True when it trimmed.

    Without ``force`` it trims only when the resident size grew by :data:`GROWTH`
    since the last trim and :data:`INTERVAL` seconds have passed. Harmless anywhere:
    without glibc (macOS, Windows, musl) it returns False.
    """
    trim = _malloc_trim() if ENABLED else None
    if trim is None:
        return False
    now = time.monotonic()
    with _LOCK:
        if not force:
            if now - _STATE["last"] < INTERVAL:
                return False
            if resident_bytes() - _STATE["rss"] < GROWTH:
                return False
        trim(0)
        _STATE["last"], _STATE["rss"] = time.monotonic(), resident_bytes()
    return True
