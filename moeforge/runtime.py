"""Process-level settings that make CPU training faster: the C allocator.

Choices:
- A training step allocates and frees the same large tensors every step (weight casts,
  activations, gradients). glibc's malloc serves blocks above its mmap threshold with
  fresh ``mmap`` pages and gives freed heap memory back to the kernel above its trim
  threshold, so each step pays page faults (the kernel zeroing every page on first
  touch): measured on the ``small`` preset, about 490k minor faults and 1.5 s of system
  time per step. Raising both thresholds keeps those blocks in the heap between steps.
  The mmap threshold cannot go above 32 MiB on 64-bit glibc (``mallopt`` refuses larger
  values), so only the few bigger tensors (logits, the embedding gradient) still map.
- Done with ``mallopt`` through ctypes at start-up rather than by asking users to set
  ``MALLOC_*``/``GLIBC_TUNABLES`` or ``LD_PRELOAD`` jemalloc: nothing to install, works
  for the CLI, benchmarks and tests alike. On a non-glibc libc it does nothing.
- The cost is resident memory that stays mapped after a peak (it is reused by the next
  step). ``MOEFORGE_NO_MALLOC_TUNING=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound for this option on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): 2 GiB of free heap kept

_done = False


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if it took effect."""
    global _done
    if _done or os.environ.get("MOEFORGE_NO_MALLOC_TUNING"):
        return _done
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok_mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok_trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _done = ok_mmap and ok_trim
    return _done
