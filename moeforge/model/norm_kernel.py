"""RMSNorm on bf16 rows by a C kernel (``csrc/norm_cpu.c``): one pass forward, one backward.

``recompute.rms_norm`` (and the rebuilds of norm outputs in backward) call
:func:`forward` / :func:`backward` here first; they return None when the kernel does not
apply, and the torch path runs instead. It applies to CPU tensors with bf16 x and dy
(rows may be strided: the MLA latents are slices), an FP32 weight, and the kernel built
(``MOEFORGE_NORM_KERNEL=0`` turns it off), not while torch.compile traces (a ctypes call
on fake tensors would crash; inductor fuses the torch ops itself). FP32 models, DTensors
and CUDA keep the torch path, whose results the kernel matches to FP32 rounding (not bit for bit: its sums run in
another order), so the FP32 equality tests across parallel layouts are untouched.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from moeforge.native import BASE_FLAGS, NativeLibrary


def _configure(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.mf_rmsnorm_fwd.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, f32, i32]
    lib.mf_rmsnorm_fwd.restype = None
    lib.mf_rmsnorm_bwd.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i32]
    lib.mf_rmsnorm_bwd.restype = i32


KERNEL = NativeLibrary(Path(__file__).with_name("csrc") / "norm_cpu.c", BASE_FLAGS, _configure,
                       "MOEFORGE_NORM_KERNEL", "RMSNorm kernel")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [N, D] rows with unit column stride (a view when possible), or None."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _applies(x: torch.Tensor, weight: torch.Tensor):
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.float32
            or type(x) is not torch.Tensor or x.numel() == 0 or torch.compiler.is_compiling()):
        return None
    return KERNEL.get()


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(y [..., D] bf16, rstd [..., 1] FP32), or None (use the torch path)."""
    lib = _applies(x, weight)
    if lib is None:
        return None
    x2, w = _rows(x), weight.detach().contiguous()
    n, d = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    lib.mf_rmsnorm_fwd(x2.data_ptr(), x2.stride(0), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), n, d,
                       float(eps), torch.get_num_threads())
    return y, rstd


def backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, rstd: torch.Tensor,
             need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(dx like x, dw [D] in the weight's dtype or None), or None (use the torch path)."""
    lib = _applies(x, weight)
    if lib is None or dy.dtype != torch.bfloat16 or type(dy) is not torch.Tensor:
        return None
    x2, w = _rows(x), weight.detach().contiguous()
    g, r = dy.reshape(-1, dy.shape[-1]).contiguous(), rstd.reshape(-1).contiguous()
    n, d = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype)
    dw = torch.empty(d, dtype=torch.float32) if need_dw else None
    rc = lib.mf_rmsnorm_bwd(x2.data_ptr(), x2.stride(0), w.data_ptr(), g.data_ptr(), r.data_ptr(), dx.data_ptr(),
                            None if dw is None else dw.data_ptr(), n, d, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("RMSNorm kernel: out of memory for the weight-gradient partials")
    return dx, dw
