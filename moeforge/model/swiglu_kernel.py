"""The routed experts' SwiGLU elementwise work on bf16 rows by a C kernel
(``csrc/swiglu_cpu.c``): ``h = silu(a) * b`` forward, and the whole backward around the
down projection's Dgrad (recomputed h, the routing weight's gradient, da, db) in one pass.

Both directions use the fused gate/up layout of ``expert_ffn.py``: ``ab`` [N, 2D] holds a
(the gate projection) and b (the up projection) side by side, as one GEMM on the stacked
weights [W1; W3] wrote them, and backward writes ``dab`` in the same layout for the fused
Dgrad and Wgrad GEMMs.

``expert_ffn.py`` calls :func:`forward` / :func:`backward` first; they return None when
the kernel does not apply (not CPU, not bf16, kernel unbuildable or
``MOEFORGE_SWIGLU_KERNEL=0``) and the torch path runs instead. Results agree with the
torch path to bf16 rounding (it rounds silu(a), h and dh on the way; the kernel rounds
each output once).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from moeforge.native import BASE_FLAGS, NativeLibrary


def _configure(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mf_swiglu_fwd.argtypes = [ptr, ptr, i64, i64, i32]
    lib.mf_swiglu_fwd.restype = None
    lib.mf_swiglu_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32]
    lib.mf_swiglu_bwd.restype = None


KERNEL = NativeLibrary(Path(__file__).with_name("csrc") / "swiglu_cpu.c", BASE_FLAGS, _configure,
                       "MOEFORGE_SWIGLU_KERNEL", "SwiGLU kernel")


def _lib(*ts: torch.Tensor):
    ok = all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 2
             for t in ts)
    return KERNEL.get() if ok and ts[0].numel() > 0 and not torch.compiler.is_compiling() else None


def forward(ab: torch.Tensor) -> torch.Tensor | None:
    """``silu(a) * b`` for bf16 ``ab = [a | b]`` [N, 2D] -> [N, D], or None (use the torch path)."""
    lib = _lib(ab)
    if lib is None:
        return None
    ab = ab.contiguous()
    n, d = ab.shape[0], ab.shape[1] // 2
    h = ab.new_empty(n, d)
    lib.mf_swiglu_fwd(ab.data_ptr(), h.data_ptr(), n, d, torch.get_num_threads())
    return h


def backward(ab: torch.Tensor, g: torch.Tensor, gate: torch.Tensor, need_gate: bool):
    """(h, dgate [N] FP32 or None, dab = [da | db]) for bf16 ``ab = [a | b]`` [N, 2D],
    g (= dout W2) [N, D] and bf16 routing weights ``gate`` [N] or [N, 1]; or None (use the
    torch path)."""
    lib = _lib(ab, g)
    if lib is None or gate.dtype != torch.bfloat16:
        return None
    if ab.shape != (g.shape[0], 2 * g.shape[1]):
        raise ValueError(f"swiglu backward: ab {tuple(ab.shape)} must be [N, 2D] for g {tuple(g.shape)}")
    ab, g, gate = ab.contiguous(), g.contiguous(), gate.reshape(-1).contiguous()
    n, d = g.shape
    h, dab = torch.empty_like(g), torch.empty_like(ab)
    dgate = torch.empty(n, dtype=torch.float32) if need_gate else None
    lib.mf_swiglu_bwd(ab.data_ptr(), g.data_ptr(), gate.data_ptr(), h.data_ptr(),
                      None if dgate is None else dgate.data_ptr(), dab.data_ptr(), n, d, torch.get_num_threads())
    return h, dgate, dab
