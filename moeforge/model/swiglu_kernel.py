"""The routed experts' SwiGLU elementwise work on bf16 rows by a C kernel
(``csrc/swiglu_cpu.c``): ``h = silu(a) * b`` forward, and the whole backward around the
down projection's Dgrad (recomputed h, the routing weight's gradient, da, db) in one pass.

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
    lib.mf_swiglu_fwd.argtypes = [ptr, ptr, ptr, i64, i64, i32]
    lib.mf_swiglu_fwd.restype = None
    lib.mf_swiglu_bwd.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32]
    lib.mf_swiglu_bwd.restype = None


KERNEL = NativeLibrary(Path(__file__).with_name("csrc") / "swiglu_cpu.c", BASE_FLAGS, _configure,
                       "MOEFORGE_SWIGLU_KERNEL", "SwiGLU kernel")


def _lib(*ts: torch.Tensor):
    ok = all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 2
             for t in ts)
    return KERNEL.get() if ok and ts[0].numel() > 0 and not torch.compiler.is_compiling() else None


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``silu(a) * b`` for bf16 [N, D] a and b, or None (use the torch path)."""
    lib = _lib(a, b)
    if lib is None:
        return None
    a, b = a.contiguous(), b.contiguous()
    h = torch.empty_like(a)
    lib.mf_swiglu_fwd(a.data_ptr(), b.data_ptr(), h.data_ptr(), a.shape[0], a.shape[1], torch.get_num_threads())
    return h


def backward(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, gate: torch.Tensor, need_gate: bool):
    """(h, dgate [N] FP32 or None, da, db) for bf16 [N, D] a, b, g (= dout W2) and bf16
    routing weights ``gate`` [N] or [N, 1]; or None (use the torch path)."""
    lib = _lib(a, b, g)
    if lib is None or gate.dtype != torch.bfloat16:
        return None
    a, b, g, gate = a.contiguous(), b.contiguous(), g.contiguous(), gate.reshape(-1).contiguous()
    n, d = a.shape
    h, da, db = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    dgate = torch.empty(n, dtype=torch.float32) if need_gate else None
    lib.mf_swiglu_bwd(a.data_ptr(), b.data_ptr(), g.data_ptr(), gate.data_ptr(), h.data_ptr(),
                      None if dgate is None else dgate.data_ptr(), da.data_ptr(), db.data_ptr(), n, d,
                      torch.get_num_threads())
    return h, dgate, da, db
