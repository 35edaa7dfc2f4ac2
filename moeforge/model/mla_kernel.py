"""MLA's per-head q, k, v for attention by a C kernel (``csrc/mla_qkv_cpu.c``), as one
autograd Function.

From the up-projections' outputs q_lin [B, S, H*(nope+rope)], kv_lin [B, S, H*(nope+v)]
and the rope key k_pe [B, S, rope], :func:`qkv` writes q, k [B, H, S, nope+rope] and v
[B, H, S, max(v, nope+rope)] contiguous: the rope parts rotated (``layers.Rotary``'s
convention), the rope key broadcast over heads, V zero-padded. In torch that was the
rotary embedding's ~nine FP32 passes, two concatenations, a pad and the copies behind
transposed views, forward, in the recomputing backward and in their own backward (~5% of
a small-preset bf16 step); here one pass each way.

Choices:

- The forward is bit-identical to the torch path (same FP32 operations in the same
  order, no FMA contraction). The backward applies the inverse rotation in FP32 and
  rounds once; the rope key's gradient sums the heads in FP32 first. It agrees with
  autograd through the torch path to bf16 rounding (tests compare both with an FP64
  reference).
- Contiguous [B, H, S, D] outputs are what the attention kernels read without a copy.
- Applies to plain bf16 CPU tensors with the kernel built (``MOEFORGE_MLA_KERNEL=0``
  turns it off), not under torch.compile (inductor fuses the torch ops) and not for
  DTensors (tensor parallelism keeps the ordinary graph); ``MLA`` asks :func:`applies`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from moeforge.native import BASE_FLAGS, NativeLibrary


class _Shape(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "S", "H", "nope", "rope", "vdim", "D", "Dv", "ld_kpe")]


def _configure(lib: ctypes.CDLL) -> None:
    ptr, i32, shp = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Shape)
    lib.mf_mla_qkv_fwd.argtypes = [ptr, ptr, ptr, ptr, ptr, shp, ptr, ptr, ptr, i32]
    lib.mf_mla_qkv_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, shp, ptr, ptr, ptr, i32]
    lib.mf_mla_qkv_fwd.restype = lib.mf_mla_qkv_bwd.restype = None


KERNEL = NativeLibrary(Path(__file__).with_name("csrc") / "mla_qkv_cpu.c", [*BASE_FLAGS, "-ffp-contract=off"],
                       _configure, "MOEFORGE_MLA_KERNEL", "MLA q/k/v kernel")
MAX_ROPE = 512  # the kernel's per-row buffer


def applies(rope: int, *ts: torch.Tensor) -> bool:
    """Whether :func:`qkv` can take these tensors (plain bf16 CPU) and rope width."""
    return (all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in ts)
            and rope % 2 == 0 and rope <= MAX_ROPE and not torch.compiler.is_compiling()
            and KERNEL.get() is not None)


def _shape(b, s, h, nope, rope, vdim, ld_kpe) -> _Shape:
    return _Shape(b, s, h, nope, rope, vdim, nope + rope, max(vdim, nope + rope), ld_kpe)


class _MLAQKVFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_lin, kv_lin, k_pe, cos, sin, heads: int, nope: int, rope: int, vdim: int):
        b, s = q_lin.shape[:2]
        q_lin, kv_lin = q_lin.contiguous(), kv_lin.contiguous()
        if k_pe.stride(-1) != 1 or k_pe.stride(0) != s * k_pe.stride(1):
            k_pe = k_pe.contiguous()
        sh = _shape(b, s, heads, nope, rope, vdim, k_pe.stride(1))
        q = q_lin.new_empty(b, heads, s, sh.D)
        k = q_lin.new_empty(b, heads, s, sh.D)
        v = q_lin.new_empty(b, heads, s, sh.Dv)
        KERNEL.get().mf_mla_qkv_fwd(q_lin.data_ptr(), kv_lin.data_ptr(), k_pe.data_ptr(), cos.data_ptr(),
                                    sin.data_ptr(), ctypes.byref(sh), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    torch.get_num_threads())
        ctx.tables, ctx.dims, ctx.shapes = (cos, sin), (heads, nope, rope, vdim), (q_lin.shape, kv_lin.shape)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.tables
        heads, nope, rope, vdim = ctx.dims
        q_shape, kv_shape = ctx.shapes
        b, s = q_shape[:2]
        dq, dk, dv = (g.to(torch.bfloat16).contiguous() for g in (dq, dk, dv))
        sh = _shape(b, s, heads, nope, rope, vdim, rope)
        dq_lin, dkv_lin = dq.new_empty(q_shape), dq.new_empty(kv_shape)
        dk_pe = dq.new_empty(b, s, rope)
        KERNEL.get().mf_mla_qkv_bwd(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                    ctypes.byref(sh), dq_lin.data_ptr(), dkv_lin.data_ptr(), dk_pe.data_ptr(),
                                    torch.get_num_threads())
        return dq_lin, dkv_lin, dk_pe, None, None, None, None, None, None


def qkv(q_lin: torch.Tensor, kv_lin: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        heads: int, nope: int, rope: int, vdim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S, D] (V's width max(vdim, D)) from q_lin [B, S, H*(nope+rope)], kv_lin
    [B, S, H*(nope+vdim)], k_pe [B, S, rope] (rows may be strided: a slice of wkv_a's output)
    and the rotary tables cos, sin [S, rope/2] (FP32) of these positions."""
    return _MLAQKVFn.apply(q_lin, kv_lin, k_pe, cos.contiguous(), sin.contiguous(), heads, nope, rope, vdim)
