"""C kernels for blockwise E4M3 quantize/dequantize on CPU, built on first use and loaded with ctypes.

Why: in eager PyTorch a 1x128 quantization is five to eight full passes over the tensor,
which together cost about as much as the bf16 GEMM the operand feeds; ``csrc/fp8_cpu.c``
does it in one pass per tile and can write the dequantized GEMM operand in the same pass.
It produces bit-for-bit the numbers of the torch path in :mod:`moeforge.fp8.quant`
(``tests/test_fp8_cpu_kernels.py`` compares them), so it is purely a speed choice.

Choices:

- Built and loaded by :mod:`moeforge.native` (cached per source, compiler, flags and
  CPU; OpenMP on torch's own libgomp threads), with ``-ffp-contract=off`` added: no FMA
  may change a rounding.
- Optional: with no C compiler, a failed build, or ``MOEFORGE_FP8_CPU_KERNELS=0`` every
  caller falls back to the torch path (one warning). Only fp32/bf16 CPU tensors take
  this path (made contiguous first).
- Threads: the kernel splits tiles over ``torch.get_num_threads()`` threads; with
  pthreads of its own instead of torch's OpenMP runtime, the FP8 step at 2 threads was
  1.7x BF16 instead of ~1.3x (torch's idle workers spin and took the second core).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from moeforge.native import BASE_FLAGS, NativeLibrary

SOURCE = Path(__file__).with_name("csrc") / "fp8_cpu.c"
FLAGS = [*BASE_FLAGS, "-ffp-contract=off"]
_XTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _configure(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mf_quantize.argtypes = [ptr, ctypes.c_int, ptr, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                ctypes.c_int, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
    lib.mf_dequantize.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    lib.mf_quantize.restype = lib.mf_dequantize.restype = ctypes.c_int


_LIB = NativeLibrary(SOURCE, FLAGS, _configure, "MOEFORGE_FP8_CPU_KERNELS", "FP8 CPU kernels")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when disabled or unbuildable (warned once)."""
    return _LIB.get()


def disabled():
    """Context manager: run the block on the torch path (tests compare the two)."""
    return _LIB.disabled()


def available() -> bool:
    return library() is not None


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
             dq_dtype: torch.dtype | None = None,
             out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
             x_scale: torch.Tensor | None = None, x_block: tuple[int, int] = (1, 1),
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """E4M3 data, FP32 scales ``[..., ceil(R/br), ceil(C/bc)]`` and optionally the
    dequantized tensor in ``dq_dtype`` (fp32 or bf16), for a contiguous ``x [..., R, C]``.
    ``out``: contiguous (data, scales, dq or None) to write into instead (slices of a
    larger tensor, e.g. one part of a stacked weight). An E4M3 ``x`` with its scales
    ``x_scale`` per ``x_block`` tile is re-tiled: the bits of dequantizing it to FP32 and
    quantizing that, in one pass."""
    b, r, c = _as3d(x.shape)
    br, bc = block
    if out is None:
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
        s = torch.empty(*x.shape[:-2], -(-r // br), -(-c // bc), dtype=torch.float32)
        dq = None if dq_dtype is None else torch.empty(x.shape, dtype=dq_dtype)
    else:
        q, s, dq = out
        assert all(t is None or t.is_contiguous() for t in out) and q.shape == x.shape, "out: contiguous, x's shape"
        dq_dtype = None if dq is None else dq.dtype
    if x.dtype == torch.float8_e4m3fn:
        x_scale = x_scale.contiguous()  # held here: a temporary's pointer would dangle during the call
        xtype = 2
    else:
        xtype = _XTYPES[x.dtype]
    rc = library().mf_quantize(x.data_ptr(), xtype, None if xtype != 2 else x_scale.data_ptr(), *x_block,
                               b, r, c, br, bc, eps, int(power_of_2), q.data_ptr(), s.data_ptr(),
                               None if dq is None else dq.data_ptr(), -1 if dq is None else _XTYPES[dq_dtype],
                               torch.get_num_threads())
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
