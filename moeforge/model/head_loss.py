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
  returned in the weight's own dtype (FP32 master).
- Gradients are computed only when grad mode is on and an input requires them; an
  evaluation forward costs one GEMM plus the chunked log-sum-exp.
- The model uses it only where the head weight is a plain tensor (not a tensor-parallel
  DTensor; vocabulary-parallel loss has its own path), see ``Transformer.forward``.
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ELEMENTS = 2**22  # FP32 elements per chunk: 16 MiB, cache-friendly and below malloc's mmap threshold


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        d = h.shape[-1]
        h2 = h.reshape(-1, d)
        y = labels.reshape(-1)
        w = weight.to(h.dtype)
        logits = h2 @ w.t()  # [T, V] in the compute dtype; becomes the gradient in place
        denom = (y != IGNORE).sum().clamp_min(1).to(torch.float32)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = max(1, CHUNK_ELEMENTS // logits.shape[1])
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
        if need_grad:
            ctx.grad_h = (logits @ w).view_as(h) if ctx.needs_input_grad[0] else None
            ctx.grad_w = (logits.t() @ h2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return total / denom

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        # in place: the buffers are ours and used once (a fresh [V, D] FP32 product was
        # another 32 MiB to allocate and fault in per step on the small preset)
        gh = None if ctx.grad_h is None else ctx.grad_h.mul_(go.to(ctx.grad_h.dtype))
        gw = None if ctx.grad_w is None else ctx.grad_w.mul_(go.to(ctx.grad_w.dtype))
        ctx.grad_h = ctx.grad_w = None  # one backward per forward, as for any saved buffer
        return gh, gw, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE of logits ``h @ weight.T`` against ``labels`` (IGNORE skipped).

    h [..., D] in the compute dtype, weight [V, D] (any float dtype; cast to h's),
    labels [...] int. A scalar FP32 tensor, differentiable w.r.t. h and weight.
    """
    return _HeadCrossEntropy.apply(h, weight, labels)
