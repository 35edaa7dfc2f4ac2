"""Causal attention backward on CPU as batched GEMMs around one C pass (``csrc/attn_bwd_cpu.c``).

torch's CPU flash-attention backward ran at ~60 GFLOP/s on the small preset (64 heads of
256 x 256 tokens, head dim 96): ~11% of a bf16 step, the largest cost after the GEMMs.
At such lengths the probabilities fit in memory, so :func:`backward` recomputes them and
runs the five products as batched GEMMs:

    s  = q k^T            (FP32: exp amplifies errors in the logits; bf16 scores doubled
    dp = do v^T            the gradient error of the flash kernel, FP32 ones match it)
    p, ds                 (the C pass: p = exp(s * scale - lse), ds = p (dp - <do, o>) scale,
                           causal mask, each rounded once to bf16)
    dv = p^T do,  dq = ds k,  dk = ds^T q      (bf16 GEMMs with FP32 accumulation)

Choices:

- Heads are processed in chunks so the FP32 scores and their bf16 companions stay below
  ~24 MB at a time, whatever the batch; sequences over 512 tokens keep the flash kernel
  (:data:`MAX_KEYS_X_QUERIES`: it skips the masked half of the S x S products, which
  these GEMMs compute, and is faster from ~640 tokens on).
- V may be zero-padded beyond ``vdim`` (MLA pads it to the q/k width for the fused CPU
  SDPA); the products use only its first ``vdim`` columns and dV's padding is zero.
- Applies to bf16 CPU tensors with the kernel built (``MOEFORGE_ATTN_KERNEL=0`` turns it
  off), not under torch.compile; :func:`backward` returns None otherwise and the caller
  runs the flash backward. Gradients agree with it to bf16 rounding (tests compare both
  with an FP64 reference).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from moeforge.native import BASE_FLAGS, NativeLibrary

# S * T per head up to 512 x 512. Measured against flash (interleaved, bf16, head dim 96):
# 0.61x the time at 256 tokens, 0.72x at 384-512, 0.96x at 640, 1.44-1.7x at 768-1440,
# where flash's causal tiling skips the upper triangle these full S x S GEMMs compute.
MAX_KEYS_X_QUERIES = 512 * 512
CHUNK_ELEMENTS = 1 << 21  # S * T * heads per chunk: 8 MB of FP32 scores


def _configure(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.mf_attn_probs_bwd.argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32, ptr, ptr, i32]
    lib.mf_attn_probs_bwd.restype = None


KERNEL = NativeLibrary(Path(__file__).with_name("csrc") / "attn_bwd_cpu.c", BASE_FLAGS, _configure,
                       "MOEFORGE_ATTN_KERNEL", "attention-backward kernel")


def handles(*ts: torch.Tensor) -> bool:
    """Whether :func:`backward` takes causal self-attention over these bf16 [B, H, S, D]
    tensors (q, k, v, and any others it gets): the recomputing attention asks in forward,
    because when it does, the forward's output need not be kept."""
    if (any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.dtype != torch.bfloat16 for t in ts)
            or torch.compiler.is_compiling() or ts[0].numel() == 0):
        return False
    s, t = ts[0].shape[2], ts[1].shape[2]
    # training's causal self-attention only, S <= 512 (the C kernel's row buffer)
    return s * t <= MAX_KEYS_X_QUERIES and t == s and KERNEL.get() is not None


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
             lse: torch.Tensor, scale: float, vdim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(dq, dk, dv) of causal ``softmax(q k^T * scale) v`` for [B, H, S, D] bf16 q, k, v
    (V zero beyond ``vdim``), the forward's log-sum-exp ``lse`` [B, H, S] and the output
    gradient ``do``; or None (use the flash backward). With the forward's ``out`` the
    softmax gradient's row sums <do_i, o_i> are taken from it (flash's way), without
    (None) the C pass computes them as sum_j p_ij dp_ij, the same quantity before the
    output's bf16 rounding. ``out`` and ``do`` are [B, H, S, >= vdim], views welcome:
    only their first ``vdim`` columns are read."""
    if not handles(q, k, v, do, *([] if out is None else [out])) or lse.dtype != torch.float32:
        return None
    b, h, s, d = q.shape
    t = k.shape[2]
    lib = KERNEL.get()
    n = b * h
    dv_width = v.shape[-1]
    q3, k3, v3 = q.reshape(n, s, d), k.reshape(n, t, d), v.reshape(n, t, dv_width)
    do3 = do.reshape(n, s, do.shape[-1])[..., :vdim]
    o3 = None if out is None else out.reshape(n, s, out.shape[-1])[..., :vdim]
    lse2 = lse.reshape(n, s)
    dq, dk = torch.empty(n, s, d, dtype=q.dtype), torch.empty(n, t, d, dtype=q.dtype)
    dv = torch.zeros(n, t, dv_width, dtype=q.dtype)
    step = max(1, CHUNK_ELEMENTS // (s * t))
    for c0 in range(0, n, step):
        c = slice(c0, min(n, c0 + step))
        dof = do3[c].float()
        scores = torch.bmm(q3[c].float(), k3[c].float().transpose(1, 2))
        dp = torch.bmm(dof, v3[c][..., :vdim].float().transpose(1, 2))
        dsum = None if o3 is None else (dof * o3[c].float()).sum(-1).contiguous()
        lse_c = lse2[c].contiguous()
        p, ds = torch.empty(scores.shape, dtype=q.dtype), torch.empty(scores.shape, dtype=q.dtype)
        lib.mf_attn_probs_bwd(scores.data_ptr(), dp.data_ptr(), lse_c.data_ptr(),
                              None if dsum is None else dsum.data_ptr(), scores.shape[0],
                              s, float(scale), p.data_ptr(), ds.data_ptr(), torch.get_num_threads())
        del scores, dp
        dv[c, :, :vdim] = torch.bmm(p.transpose(1, 2), do3[c])
        torch.bmm(ds, k3[c], out=dq[c])
        torch.bmm(ds.transpose(1, 2), q3[c], out=dk[c])
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
