"""Memory-lean RMSNorm and SwiGLU: save the inputs, recompute the rest in backward.

DeepSeek-V3 (TR section 3.2.3 and 3.3.2) recomputes RMSNorm in backward and caches the
SwiGLU inputs, recomputing its output; under FP8 those cached inputs are themselves FP8
with 1x128 tiles. Plain autograd keeps far more: RMSNorm's FP32 copy of x, the
normalised x and the scaled output (three FP32 tensors per norm, about a third of
everything the tiny preset saves), and SwiGLU's silu(a) next to a and b.

Choices:

- :func:`rms_norm` saves x in its own dtype plus one FP32 ``rstd`` per row. Its backward
  is the *same sequence of ops* autograd runs for ``RMSNorm``'s forward (mul, sum over
  the broadcast dims, rsqrt's ``-0.5 * g * r^3``, mean's ``/ C``, pow's ``2x``), so results
  are bit-identical to the plain graph (``tests/test_recompute.py`` checks with
  ``torch.equal``): recomputation changes memory, not numbers.
- :func:`swiglu` ``silu(a) * b`` saves a and b and recomputes silu(a) with the same
  kernel, so it is bit-identical too. With ``fp8`` set (``fp8.convert`` does when
  ``fp8.cache_swiglu``), a and b are saved as E4M3 with 1x128 scales instead, as V3
  does; backward then runs on their dequantized values (a deliberate approximation,
  part of the FP8 recipe).
- Plain tensors only: with DTensors (tensor/sequence parallelism) callers keep the
  ordinary autograd graph, whose sharding propagation is already proven.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return (x32 * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        x32, w32, g = x.float(), weight.float(), dy.float()
        y = x32 * rstd  # recomputed exactly as in forward
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * y).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gy = g * w32
        # autograd's formulas for x32 * rsqrt(mean(x32^2) + eps), in its order
        dx = gy * rstd
        dr = (gy * x32).sum(-1, keepdim=True)
        dm = -0.5 * dr * rstd.pow(3)
        dx = dx + (dm / x32.shape[-1]).expand_as(x32) * (2 * x32)
        return dx.to(x.dtype), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` computed in FP32, returned in x's dtype; saves x and rstd."""
    return _RMSNormFn.apply(x, weight, eps)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, fp8) -> torch.Tensor:
        if fp8 is not None:
            from moeforge.fp8.quant import quantize

            blk = (1, fp8.block_size)
            qa, qb = (quantize(t, blk, eps=fp8.eps, power_of_2=fp8.power_of_2_scales) for t in (a, b))
            ctx.save_for_backward(qa.data, qa.scale, qb.data, qb.scale)
            ctx.block = blk
        else:
            ctx.save_for_backward(a, b)
        ctx.fp8, ctx.dtype = fp8, a.dtype
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if ctx.fp8 is not None:
            from moeforge.fp8.quant import Fp8Tensor, dequantize

            ad, asc, bd, bsc = ctx.saved_tensors
            a, b = (dequantize(Fp8Tensor(d, s, ctx.block), ctx.dtype) for d, s in ((ad, asc), (bd, bsc)))
        else:
            a, b = ctx.saved_tensors
        da = torch.ops.aten.silu_backward(dy * b, a) if ctx.needs_input_grad[0] else None
        db = dy * F.silu(a) if ctx.needs_input_grad[1] else None
        return da, db, None


def swiglu(a: torch.Tensor, b: torch.Tensor, fp8=None) -> torch.Tensor:
    """``silu(a) * b``; saves a and b (E4M3 with 1x128 scales when ``fp8`` is an
    ``Fp8Config``), recomputes silu(a) in backward."""
    return _SwiGLUFn.apply(a, b, fp8)


def is_plain(*ts: torch.Tensor) -> bool:
    """True when none of ``ts`` is a DTensor (those keep the ordinary autograd graph)."""
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in ts)
