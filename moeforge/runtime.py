"""Process-level settings that make CPU training faster: the C allocator and a caching
allocator for torch's large CPU tensors.

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
- Blocks of 32 MiB and more, which glibc must still map fresh, go through a caching
  allocator installed as torch's CPU allocator (``csrc/cpu_cache_alloc.cpp``, built with
  the C++ compiler on first use like the C kernels): a freed block is kept and the next
  tensor of about its size reuses it, as torch's CUDA allocator does on a GPU. The MoE
  layer with 256 experts (``bench_moe``'s scaling rows: 100M expert parameters, whose bf16
  casts, bf16 and FP32 gradients are each this large) paid ~150k page faults and ~35% of
  its time for them; a ``small`` step at 32 x 512 tokens 1.2M faults and 3.3 s of system
  time (``benchmarks/results/allocator.md``). Torch keeps no such cache on CPU.
- The cost is resident memory that stays mapped after a peak (it is reused by the next
  step): glibc's heap keeps up to 2 GiB, the caching allocator up to
  ``MOEFORGE_CPU_CACHE_MB`` (default 2048 per host, divided among torchrun's local ranks;
  least recently freed blocks go first).
  ``MOEFORGE_NO_MALLOC_TUNING=1`` turns both off, ``MOEFORGE_CPU_CACHE=0`` only the
  second; without a C++ compiler it is skipped with one warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound for this option on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): 2 GiB of free heap kept

CACHE_THRESHOLD = MMAP_THRESHOLD  # smaller blocks stay in glibc's (tuned) heap
CACHE_LIMIT_MB = 2048

_done = False
_cache = None  # the NativeLibrary of the caching allocator, once made


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds and install the caching allocator, once per
    process; True if the glibc part took effect."""
    global _done
    if _done or os.environ.get("MOEFORGE_NO_MALLOC_TUNING"):
        return _done
    install_cpu_cache()
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


def _cache_library():
    global _cache
    if _cache is None:
        from moeforge.native import NativeLibrary, torch_cxx_flags

        def configure(lib):
            lib.mf_cache_install.argtypes = [ctypes.c_int64, ctypes.c_int64]
            lib.mf_cache_install.restype = ctypes.c_int
            lib.mf_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
            lib.mf_cache_set_limit.argtypes = [ctypes.c_int64]

        _cache = NativeLibrary(Path(__file__).with_name("csrc") / "cpu_cache_alloc.cpp",
                               ["-O2", "-shared", "-fPIC", *torch_cxx_flags()], configure,
                               "MOEFORGE_CPU_CACHE", "caching CPU allocator")
    return _cache.get()


def default_cache_limit_mb() -> float:
    """``MOEFORGE_CPU_CACHE_MB``, else 2048 MiB shared by the ranks torchrun starts on this
    host (``LOCAL_WORLD_SIZE``): eight CPU ranks keep 256 MiB each, not 2 GiB each."""
    if "MOEFORGE_CPU_CACHE_MB" in os.environ:
        return float(os.environ["MOEFORGE_CPU_CACHE_MB"])
    return CACHE_LIMIT_MB / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def install_cpu_cache(threshold: int = CACHE_THRESHOLD, limit_mb: float | None = None) -> bool:
    """Make the caching allocator torch's CPU allocator for blocks of ``threshold`` bytes
    and more, keeping at most ``limit_mb`` (default: :func:`default_cache_limit_mb`) of
    freed blocks. The threshold is fixed by the first call; later calls set the limit.
    True if the allocator is in place."""
    lib = _cache_library()
    if lib is None:
        return False
    if limit_mb is None:
        limit_mb = default_cache_limit_mb()
    lib.mf_cache_install(threshold, int(limit_mb * 2**20))
    return True


def cpu_cache_stats() -> dict[str, int]:
    """The caching allocator's counters: hits and misses (large allocations served from the
    cache or newly made), evictions, cached and live bytes, cached blocks (zeros when it
    is not installed)."""
    lib = _cache_library()
    out = (ctypes.c_int64 * 6)()
    if lib is not None:
        lib.mf_cache_stats(out)
    return dict(zip(["hits", "misses", "evictions", "cached_bytes", "live_bytes", "cached_blocks"], out))


def empty_cpu_cache() -> None:
    """Give every cached (free) block back to the system."""
    lib = _cache_library()
    if lib is not None:
        lib.mf_cache_empty()


def set_cpu_cache_limit(limit_mb: float) -> None:
    """Keep at most ``limit_mb`` of freed blocks (0: free every block when its tensor dies,
    i.e. no caching; benchmarks A/B with it)."""
    lib = _cache_library()
    if lib is not None:
        lib.mf_cache_set_limit(int(limit_mb * 2**20))
