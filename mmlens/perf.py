"""Process-wide speed settings for CPU runs.

`HookedTransformer.run_with_cache` calls `retain_freed_cpu_memory()` once, the first time it
runs a model on the CPU, unless the environment sets `MMLENS_KEEP_FREED_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def retain_freed_cpu_memory(pool_bytes: int = 8 << 30) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS at once.

    `run_with_cache` keeps every activation, so each call allocates hundreds of MB afresh. By
    default glibc serves blocks over 32 MB (and, adaptively, smaller ones) with `mmap` and
    unmaps them when freed, so every run pays page faults and zeroing again; on a 2-core CPU
    that made a full-cache run ~1.5x a plain HF forward instead of ~1.06x (see
    `bench/forward.py`). GPUs are unaffected (PyTorch's CUDA caching allocator already reuses).

    Process-wide and irreversible for the process: like PyTorch's CUDA caching allocator, the
    process keeps its peak memory instead of returning it. Returns False where it does not
    apply (not Linux/glibc).

    Examples:
        >>> import mmlens.perf, sys
        >>> mmlens.perf.retain_freed_cpu_memory() == sys.platform.startswith("linux")
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    largest_mmap_threshold = 32 << 20  # glibc's cap on 64-bit systems
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, largest_mmap_threshold),
            (_M_TRIM_THRESHOLD, pool_bytes),
            (_M_TOP_PAD, min(pool_bytes, 1 << 30)),
        )
    )


@functools.cache
def enable_for_cpu_caching() -> bool:
    """`retain_freed_cpu_memory()` once per process, unless `MMLENS_KEEP_FREED_MEMORY=0`."""
    if os.environ.get("MMLENS_KEEP_FREED_MEMORY", "1") == "0":
        return False
    return retain_freed_cpu_memory()
