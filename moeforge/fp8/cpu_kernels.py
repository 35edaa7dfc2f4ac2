"""C kernels for blockwise E4M3 quantize/dequantize on CPU, built on first use and loaded with ctypes.

Why: in eager PyTorch a 1x128 quantization is five to eight full passes over the tensor,
which together cost about as much as the bf16 GEMM the operand feeds; ``csrc/fp8_cpu.c``
does it in one pass per tile and can write the dequantized GEMM operand in the same pass.
It produces bit-for-bit the numbers of the torch path in :mod:`moeforge.fp8.quant`
(``tests/test_fp8_cpu_kernels.py`` compares them), so it is purely a speed choice.

Choices:

- Plain C and ctypes, not a torch C++ extension: gcc builds it in about a second with no
  torch headers, and ctypes releases the GIL during the call.
- Built once per source, compiler, flags and CPU model/features into ``$MOEFORGE_CACHE`` (default
  ``~/.cache/moeforge``), with ``-O3 -march=native -ffp-contract=off`` (no FMA may change a
  rounding) and ``-fno-strict-aliasing`` (floats are read as their bits); written to a temporary name and renamed, so concurrent ranks do not race.
- Optional: with no C compiler, a failed build, or ``MOEFORGE_FP8_CPU_KERNELS=0`` every
  caller falls back to the torch path (one warning). Only fp32/bf16 CPU tensors take
  this path (made contiguous first).
- Threads: the kernel splits tiles over ``torch.get_num_threads()`` OpenMP threads. It
  links ``libgomp.so.1``, the runtime torch's CPU wheel has already loaded, so it runs on
  torch's own worker threads; with pthreads of its own, torch's idle OpenMP workers (which
  spin for a while after each parallel region) took the second core and the FP8 step at
  2 threads was 1.7x BF16 instead of ~1.3x.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "fp8_cpu.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing", "-shared", "-fPIC", "-fopenmp"]
_XTYPES = {torch.float32: 0, torch.bfloat16: 1}

_lib: ctypes.CDLL | None = None
_tried = False
_disabled = os.environ.get("MOEFORGE_FP8_CPU_KERNELS", "1") == "0"


def _cache_dir() -> Path:
    return Path(os.environ.get("MOEFORGE_CACHE") or Path.home() / ".cache" / "moeforge")


def _cpu_id() -> str:
    """The CPU's model and feature flags: ``-march=native`` code must not be reused by a
    different CPU sharing the cache directory (it could die of SIGILL)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, platform.machine(), _cpu_id()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"fp8_cpu_{key}.so"
    if not out.is_file():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(out.parent, os.W_OK):
                raise OSError(f"{out.parent} is not writable")
        except OSError:  # e.g. a read-only home: build under the temporary directory instead
            out = Path(tempfile.gettempdir()) / f"moeforge-{os.getuid()}" / out.name
            out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
            os.replace(tmp, out)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{cc} failed: {e.stderr.strip()[:500]}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mf_quantize.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int,
                                ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
    lib.mf_dequantize.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    lib.mf_quantize.restype = lib.mf_dequantize.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when disabled or unbuildable (warned once)."""
    global _lib, _tried
    if _disabled:
        return None
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except (OSError, RuntimeError) as e:
            warnings.warn(f"moeforge FP8 CPU kernels unavailable, using the slower torch path: {e}", stacklevel=2)
    return _lib


@contextlib.contextmanager
def disabled():
    """Run the block on the torch path (tests compare the two)."""
    global _disabled
    old, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = old


def available() -> bool:
    return not _disabled and library() is not None


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` (made contiguous) can be quantized by the kernels: fp32/bf16 on CPU."""
    return x.device.type == "cpu" and x.dtype in _XTYPES and available()


def _as3d(shape: torch.Size) -> tuple[int, int, int]:
    r, c = shape[-2:]
    b = 1
    for d in shape[:-2]:
        b *= d
    return b, r, c


def quantize(x: torch.Tensor, block: tuple[int, int], eps: float, power_of_2: bool,
             dq_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """E4M3 data, FP32 scales ``[..., ceil(R/br), ceil(C/bc)]`` and optionally the
    dequantized tensor in ``dq_dtype`` (fp32 or bf16), for a contiguous ``x [..., R, C]``."""
    b, r, c = _as3d(x.shape)
    br, bc = block
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(*x.shape[:-2], -(-r // br), -(-c // bc), dtype=torch.float32)
    dq = None if dq_dtype is None else torch.empty(x.shape, dtype=dq_dtype)
    rc = library().mf_quantize(x.data_ptr(), _XTYPES[x.dtype], b, r, c, br, bc, eps, int(power_of_2), q.data_ptr(),
                               s.data_ptr(), None if dq is None else dq.data_ptr(),
                               -1 if dq is None else _XTYPES[dq_dtype], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("mf_quantize failed")
    return q, s, dq


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``q * s`` per tile for a contiguous E4M3 ``q [..., R, C]``, rounded once to fp32 or bf16."""
    b, r, c = _as3d(q.shape)
    out = torch.empty(q.shape, dtype=dtype)
    scale = scale.contiguous()  # held here: a temporary's pointer would dangle during the call
    rc = library().mf_dequantize(q.data_ptr(), scale.data_ptr(), b, r, c, block[0], block[1],
                                 out.data_ptr(), _XTYPES[dtype], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("mf_dequantize failed")
    return out
