"""Output head fused with the cross-entropy: the training loss without FP32 logits.

``head_cross_entropy(h, W, labels)`` equals
``F.cross_entropy((h @ W.T).float(), labels, ignore_index=-100)`` (mean over the counted
positions) and has the same gradients, but never builds the FP32 logits, their log-softmax
or a separate gradient tensor of that size.

Choices:
- The unfused path moves [tokens, vocab] tensors through memory six or seven times
  (bf16 logits, FP32 copy, log-softmax, zero-filled NLL gradient, softmax backward, cast
  back). On the small preset that was ~15% of a CPU training step, and at V3's 129k
  vocabulary these tensors are the largest activations of the model.
- Here the head GEMM writes bf16 logits once; a loop over row chunks (each small enough to
  stay in cache) computes log-sum-exp in FP32, the loss, and overwrites the chunk in
  place with its gradient softmax - onehot (bf16, as the unfused path's gradient is).
  The two gradient GEMMs then run once each at full size, *during the forward* (the
  loss is a scalar: its gradient only scales them), as Liger-Kernel does. Backward
  multiplies the stored gradients by the incoming scalar. The head weight gradient is
  held in the compute dtype (bf16: 16 MiB instead of 32 on the small preset, per head
  call) and returned in the weight's own dtype (FP32 master).
- On CPU the per-row work is one C kernel (``csrc/xent_cpu.c`` via :mod:`moeforge.native`):
  each row is read into an FP32 buffer once, and its loss and gradient written in one
  more pass, instead of eight torch passes per chunk (which cost more than the head GEMMs
  on the small preset). Its own vectorized exp makes it differ from the torch loop in the
  last bits; both are tested against an FP64 reference. ``MOEFORGE_XENT_KERNEL=0`` or a
  missing compiler falls back to the torch loop.
- Gradients are computed only when grad mode is on and an input requires them; an
  evaluation forward costs one GEMM plus the chunked log-sum-exp.
- The model uses it only where the head weight is a plain tensor (not a tensor-parallel
  DTensor; vocabulary-parallel loss has its own path), see ``Transformer.forward``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from moeforge.model import weight_cache
from moeforge.native import BASE_FLAGS, NativeLibrary

IGNORE = -100
CHUNK_ELEMENTS = 2**22  # FP32 elements per chunk: 16 MiB, cache-friendly and below malloc's mmap threshold


_XTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _configure(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mf_softmax_xent.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_float, ctypes.c_int, ptr, ctypes.c_int]
    lib.mf_softmax_xent.restype = ctypes.c_int


KERNEL = NativeLibrary(Path(__file__).with_name("csrc") / "xent_cpu.c", BASE_FLAGS, _configure,
                       "MOEFORGE_XENT_KERNEL", "fused cross-entropy kernel")


def _rows_kernel(logits: torch.Tensor, y: torch.Tensor, denom: torch.Tensor, need_grad: bool) -> torch.Tensor | None:
    """Summed loss over rows by the C kernel (gradient written into ``logits`` when
    ``need_grad``), or None when the kernel cannot take these tensors."""
    if logits.device.type != "cpu" or logits.dtype not in _XTYPES or not logits.is_contiguous():
        return None
    lib = KERNEL.get()
    if lib is None:
        return None
    bad = (y >= logits.shape[1]) | ((y < 0) & (y != IGNORE))
    if bool(bad.any()):
        raise IndexError(f"label out of range [0, {logits.shape[1]}): {y[bad][0].item()}")
    y64 = y.to(torch.int64).contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    rc = lib.mf_softmax_xent(logits.data_ptr(), _XTYPES[logits.dtype], logits.shape[0], logits.shape[1],
                             y64.data_ptr(), float(1.0 / denom.item()), int(need_grad), loss.data_ptr(),
                             torch.get_num_threads())
    if rc != 0:
        raise MemoryError("fused cross-entropy kernel: out of memory for its row buffers")
    return loss.sum()


def _rows_torch(logits: torch.Tensor, y: torch.Tensor, denom: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """The same in torch, over row chunks small enough to stay in cache."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[1]))
    for s in range(0, logits.shape[0], rows):
        z = logits[s : s + rows].float()
        t = y[s : s + rows]
        valid = t != IGNORE
        tgt = t.clamp_min(0).unsqueeze(1)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        total += ((lse - z.gather(1, tgt)).squeeze(1) * valid).sum()
        if need_grad:
            p = z.sub_(lse).exp_()  # softmax, in place of the FP32 chunk
            p.scatter_add_(1, tgt, -valid.to(p.dtype).unsqueeze(1))
            p.mul_((valid / denom).unsqueeze(1))  # d(mean)/d(logit); ignored rows get 0
            logits[s : s + rows] = p
    return total


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = h.shape[-1]
        h2 = h.reshape(-1, d)
        y = labels.reshape(-1)
        w = weight_cache.cast(weight, h.dtype)
        logits = h2 @ w.t()  # [T, V] in the compute dtype; becomes the gradient in place
        denom = (y != IGNORE).sum().clamp_min(1).to(torch.float32)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = _rows_kernel(logits, y, denom, need_grad)
        if total is None:
            total = _rows_torch(logits, y, denom, need_grad)
        if need_grad:
            ctx.grad_h = (logits @ w).view_as(h) if ctx.needs_input_grad[0] else None
            # kept in the compute dtype until backward (half the bytes of the FP32 master's
            # dtype while the rest of the forward and backward run); cast there, same numbers
            ctx.grad_w = (logits.t() @ h2) if ctx.needs_input_grad[1] else None
            ctx.w_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        # in place: the buffers are ours and used once (a fresh [V, D] FP32 product was
        # another 32 MiB to allocate and fault in per step on the small preset)
        gh = None if ctx.grad_h is None else ctx.grad_h.mul_(go.to(ctx.grad_h.dtype))
        gw = None if ctx.grad_w is None else ctx.grad_w.to(ctx.w_dtype).mul_(go.to(ctx.w_dtype))
        ctx.grad_h = ctx.grad_w = None  # one backward per forward, as for any saved buffer
        return gh, gw, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE of logits ``h @ weight.T`` against ``labels`` (IGNORE skipped).

    h [..., D] in the compute dtype, weight [V, D] (any float dtype; cast to h's),
    labels [...] int. A scalar FP32 tensor, differentiable w.r.t. h and weight.
    """
    return _HeadCrossEntropy.apply(h, weight, labels)
