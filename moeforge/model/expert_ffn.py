"""The routed experts' SwiGLU feed-forward, gate weight included, as one lean autograd Function.

For rows sorted by expert (row i goes to expert e(i) with routing weight g_i)::

    out_i = g_i * W2[e] (silu(W1[e] x_i) * W3[e] x_i)

Choices:

- One Function for the whole expert FFN so backward decides what is kept. It keeps the
  expert input x and the two SwiGLU inputs a = W1 x, b = W3 x, unpadded, and nothing else
  (plus the FP32 master weights, which live anyway). Given token rows and each expert
  row's token (``token``; the MoE layer's local dispatch), it gathers its rows itself (one
  C pass with the padding, ``gather_rows``) and keeps x as the token rows, or, when they
  are an RMSNorm's output, nothing new: backward rebuilds them from the norm's input
  (``recompute.source``), shared with the shared experts, and sums the input gradient per
  token (the gather's backward). Under FP8 the token rows are quantized once (1x128 tiles
  are per row, so the gathered E4M3 rows are the same bits). DeepSeek-V3 (TR 3.3.2) caches
  the SwiGLU inputs and recomputes its output h = silu(a) * b in backward; with FP8 those
  inputs (and x) are E4M3 with 1x128 scales, so there h is recomputed from their
  dequantized values, as published.
- The gate and up projections are one GEMM on the stacked weights [W1; W3] (each
  expert's rows of W1, then of W3): ``ab = x [W1; W3]^T`` is [T, 2I], a and b its two
  halves. Per-expert GEMMs are small (256 x 512 x 256 on the small preset) and ran at
  about half the rate of one large GEMM; twice the width and half the calls made the
  gate/up GEMMs ~1.3x faster, forward and backward (Dgrad ``dab [W1; W3]`` is one GEMM
  with K = 2I, no ``dxa + dxb`` pass; Wgrad one GEMM giving both dWs). The stacked form
  is made once per optimizer step by ``weight_cache`` (its bf16 cast, or under FP8 its
  128x128 blocks: with I a multiple of 128 these are W1's and W3's own blocks), so it
  costs no more memory than the two separate forms did. The SwiGLU inputs are saved as
  the one tensor ``ab``.
- The routing weight is applied inside. Its gradient is dL/dg_i = <dout_i, y_i> with
  y_i = W2 h_i, the expert's output row, which the MoE combine used to keep for it (8 MB
  per layer on the small preset). <dout_i, W2 h_i> = <dout_i W2, h_i>, and dout W2 is the
  down projection's Dgrad anyway (computed here from the unweighted dout; dh = g * that),
  so the weight gradient costs one elementwise pass and no saved rows. Under FP8 that
  product runs on the quantized operands, so the routing-weight gradient carries the
  same FP8 error as every other Dgrad.
- On CPU in bf16 the elementwise work around the GEMMs is one C pass each way
  (``swiglu_kernel.py``): forward h = silu(a) * b; backward h again, the routing-weight
  gradient, da and db from a, b, dout W2 and the weights (~10 torch passes before, ~10%
  of a small step). It agrees with the torch path (kept as the fallback and reference)
  to bf16 rounding.
- Rows are padded per expert (the ops' ``row_bucket``, ``GroupedExperts``) only for the GEMMs; what is
  saved is unpadded, so padding costs memory only transiently.
- The GEMMs go through an *ops* object so FP8 can swap them without this file knowing
  about FP8: :class:`GroupedGemm` (the activations' dtype, ``torch._grouped_mm``) here,
  ``moeforge.fp8.linear.Fp8GroupedGemm`` there. Its contract:

  ========================== ===========================================================
  ``input(x)``               x as a forward GEMM operand (FP8: E4M3 1x128 tiles)
  ``keep(t)``                t as saved for backward when only its value is needed
  ``value(kept, dtype)``     the tensor back from ``keep`` / ``input`` (dequantized)
  ``pack(op)`` / ``unpack``  an operand as a tuple of tensors for ``save_for_backward``
  ``repad(op, c, p)``        :func:`repad_rows` on an operand
  ``gather(op, i, c, p)``     :func:`gather_rows` on an operand (rows ``op[i]``, padded)
  ``forward(op, w, c, dtype)`` y = x @ w[e].T per expert group, in ``dtype``; ``w`` is one
                             [E, out, in] stack or a tuple of them stacked along out
                             (:data:`Weight`)
  ``wgrad_input(op, c)``     the operand as the weight-gradient GEMM reads it
  ``grads(dy, xw, w, c, need_dx, need_dw)``   (dx, dw) of one grouped linear; for a
                             tuple ``w``, dw is the tuple of its parts' gradients
  ========================== ===========================================================

- :func:`grouped_linear_fn` is one grouped linear with the same ops (benchmarks, tests and
  the FP8 drop-in use it); dW comes out in W's own [E, out, in] layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeforge.model import recompute, rows_kernel, swiglu_kernel, weight_cache


def repad_rows(x: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """Rows grouped in blocks of ``counts[i]`` -> blocks of ``padded[i]`` rows: each block
    keeps its first min(c, p) rows and is zero-filled to p. One ``cat`` of slices, i.e.
    memcpy speed (``index_put`` / ``index_select`` by row index ran ~5x slower). When
    nothing changes (counts == padded) it returns ``x`` itself, no copy."""
    if counts == padded:
        return x
    out = rows_kernel.repad(x, counts, padded)  # one C call on CPU; the code below is its reference
    if out is not None:
        return out
    extra = max([p - c for c, p in zip(counts, padded)] + [0])
    zeros = x.new_zeros(extra, *x.shape[1:]) if extra else None
    parts = []
    for piece, c, p in zip(x.split(counts), counts, padded):
        parts.append(piece[:p])
        if p > c:
            parts.append(zeros[: p - c])
    return torch.cat(parts) if parts else x.new_zeros(0, *x.shape[1:])


def gather_rows(x: torch.Tensor, index: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """``repad_rows(x.index_select(0, index), counts, padded)`` in one pass (C on CPU): the
    dispatch gather of expert rows from token rows, already padded for the GEMMs."""
    out = rows_kernel.repad(x, counts, padded, index)
    if out is not None:
        return out
    return repad_rows(x.index_select(0, index), counts, padded)


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``torch._grouped_mm`` with groups of ``counts`` rows: M-grouped (``a [T, K]``, ``b [G, K, N]``
    -> ``[T, N]``) or K-grouped (``a [M, T]``, ``b [T, N]`` -> ``[G, M, N]``).

    Under torch.compile in fp32 (the default dtype on CPUs without fast bf16) it is one mm
    per group: the meta kernel the compiler traces ``_grouped_mm`` with accepts bf16 only,
    and a failed trace of an fp32 one once corrupted the heap."""
    if not (torch.compiler.is_compiling() and a.dtype != torch.bfloat16):
        return torch._grouped_mm(a, b, offs=_offsets(counts, a.device))
    bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
    if b.dim() == 3:
        return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(bounds, bounds[1:]))])
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(bounds, bounds[1:])])


Weight = torch.Tensor | tuple[torch.Tensor, ...]  # [E, out, in], or parts stacked along out


def parts(w: Weight) -> tuple[torch.Tensor, ...]:
    return (w,) if isinstance(w, torch.Tensor) else tuple(w)


def stacked_shape(w: Weight) -> torch.Size:
    """Shape of ``torch.cat(parts(w), -2)``."""
    ps = parts(w)
    return torch.Size((*ps[0].shape[:-2], sum(p.shape[-2] for p in ps), ps[0].shape[-1]))


def stacked_form(w: Weight, key, make):
    """``make(parts)`` for the stacked weight, made once per optimizer step (``weight_cache``,
    held by the first part and remade when any part changes)."""
    ps = parts(w)
    return weight_cache.cached(ps[0], key, lambda _: make(tuple(p.detach() for p in ps)), deps=ps[1:])


def split_grad(dw: torch.Tensor, w: Weight):
    """The stacked weight's gradient -> each part's, contiguous, in the part's dtype (one
    cast pass, as for an unstacked weight)."""
    if isinstance(w, torch.Tensor):
        return dw.to(w.dtype)
    pieces = dw.split([p.shape[-2] for p in w], -2)
    return tuple(g.to(p.dtype, memory_format=torch.contiguous_format) for g, p in zip(pieces, w))


def _stacked_cast(ps: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(stacked_shape(ps), dtype=dtype, device=ps[0].device)
    r = 0
    for p in ps:  # cast straight into place: no FP32 concatenation
        out[..., r : r + p.shape[-2], :].copy_(p)
        r += p.shape[-2]
    return out


class GroupedGemm:
    """Grouped GEMMs in the activations' dtype (bf16 on CPU: AMX or AVX-512 bf16 units); the master
    weight's cast comes from ``weight_cache`` (made once per optimizer step), so backward
    saves the master, not a cast copy."""

    row_bucket = 64  # rows per expert padded to a multiple of this on CPU for bf16 GEMMs (GroupedExperts)

    def row_bucket_for(self, dtype: torch.dtype) -> int:
        """The padding bucket for GEMMs in ``dtype``: oneDNN compiles a bf16 kernel per shape
        (hence buckets, see GroupedExperts); fp32 GEMMs (MKL, no per-shape kernels) ran no
        faster padded, so their rows stay as they are (1: no padding)."""
        return self.row_bucket if dtype == torch.bfloat16 else 1

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    keep = input

    def value(self, kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return kept

    def pack(self, op: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (op,)

    def unpack(self, saved: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return saved[0]

    def repad(self, op: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
        return repad_rows(op, counts, padded)

    def gather(self, op: torch.Tensor, index: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
        return gather_rows(op, index, counts, padded)

    @staticmethod
    def _form(w: Weight, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(w, torch.Tensor):
            return weight_cache.cast(w, dtype)
        return stacked_form(w, ("cast", dtype), lambda ps: _stacked_cast(ps, dtype))

    def forward(self, x: torch.Tensor, w: Weight, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        return grouped_mm(x, self._form(w, x.dtype).transpose(-2, -1), counts)

    def wgrad_input(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return x

    def grads(self, dy: torch.Tensor, x: torch.Tensor | None, w: Weight, counts: list[int],
              need_dx: bool, need_dw: bool):
        dx = grouped_mm(dy, self._form(w, dy.dtype), counts) if need_dx else None
        # K-grouped over tokens: [out, T] x [T, in] -> [E, out, in], W's own layout
        dw = split_grad(grouped_mm(dy.t(), x, counts), w) if need_dw else None
        return dx, dw


class _GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int], ops) -> torch.Tensor:
        xo = ops.input(x)
        ctx.save_for_backward(*ops.pack(xo), w)  # the master weight: cast / quantized again in backward
        ctx.counts, ctx.ops = counts, ops
        return ops.forward(xo, w, counts, x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        ops, counts = ctx.ops, ctx.counts
        *xs, w = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        xw = ops.wgrad_input(ops.unpack(tuple(xs)), counts) if need_dw else None
        dx, dw = ops.grads(dy, xw, w, counts, need_dx, need_dw)
        return dx, dw, None, None


def grouped_linear_fn(x: torch.Tensor, w: torch.Tensor, counts: list[int], ops) -> torch.Tensor:
    """x [T, in] sorted by expert, w [E, out, in], ``counts`` rows per expert -> [T, out]."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[1])
    return _GroupedLinearFn.apply(x, w, list(counts), ops)


class _ExpertFFNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, w1, w2, w3, counts, padded, ops, token):
        xo = ops.input(x)  # token rows (with ``token``): FP8 shares the shared experts' quantization
        xp = ops.repad(xo, counts, padded) if token is None else ops.gather(xo, token, counts, padded)
        ab = ops.forward(xp, (w1, w3), padded, x.dtype)  # [a | b]: the gate and up projections
        h = swiglu_kernel.forward(ab)
        if h is None:
            a, b = ab.split(w1.shape[1], -1)
            h = F.silu(a) * b
        y = ops.repad(ops.forward(ops.input(h), w2, padded, x.dtype), padded, counts)
        # x as kept for Wgrad: a norm's output is rebuilt from the norm's input (kept by the
        # norm anyway), anything else kept as its GEMM operand (E4M3 under FP8)
        src = recompute.source(x) if token is not None else None
        packs = [ops.pack(xo) if src is None else src[0], ops.pack(ops.repad(ops.keep(ab), padded, counts))]
        ctx.sizes = [len(p) for p in packs]
        ctx.save_for_backward(*[t for p in packs for t in p], gate, w1, w2, w3, token)
        ctx.counts, ctx.padded, ctx.ops, ctx.dtype = counts, padded, ops, ab.dtype
        ctx.rebuild, ctx.x_rows = None if src is None else src[1], x.shape[0]
        return y * gate.to(y.dtype).unsqueeze(-1)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        ops, counts, padded, dt = ctx.ops, ctx.counts, ctx.padded, ctx.dtype
        saved = list(ctx.saved_tensors)
        x_saved, ab_saved = saved[: ctx.sizes[0]], saved[ctx.sizes[0] : sum(ctx.sizes)]
        gate, w1, w2, w3, token = saved[sum(ctx.sizes) :]
        need_x, need_gate, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:5]
        ab = ops.repad(ops.value(ops.unpack(tuple(ab_saved)), dt), counts, padded)
        dout_p = ops.repad(dout, counts, padded)
        gate_p = ops.repad(gate.to(dout.dtype).unsqueeze(-1), counts, padded)  # padding rows weigh 0
        g, _ = ops.grads(dout_p, None, w2, padded, True, False)  # dout W2, unweighted
        # the SwiGLU output h recomputed (V3 TR 3.3.2), the routing weight's gradient
        # <dout, W2 h> = <dout W2, h>, and dh = g * gate through silu(a) * b: one C pass
        done = swiglu_kernel.backward(ab, g, gate_p, need_gate)
        if done is not None:
            h, dgate_p, dab = done
        else:
            a, b = ab.split(w1.shape[1], -1)
            silu_a = F.silu(a)
            h = silu_a * b
            dgate_p = (g.float() * h.float()).sum(-1) if need_gate else None
            dh = g * gate_p
            dab = torch.cat([torch.ops.aten.silu_backward(dh * b, a), dh * silu_a], -1)
        d_gate = ops.repad(dgate_p, padded, counts).to(gate.dtype) if need_gate else None
        dw2 = None
        if need_w2:
            dw2 = ops.grads(dout_p * gate_p, ops.wgrad_input(h, padded), w2, padded, False, True)[1]
        xw = None
        if need_w1 or need_w3:
            if ctx.rebuild is not None:  # the norm's output again (shared with the shared experts); under
                xo = ctx.rebuild(*x_saved)  # FP8 its gathered rows are quantized 128x1 straight from bf16
                xo = xo.reshape(-1, xo.shape[-1])
            else:
                xo = ops.unpack(tuple(x_saved))
            xp = ops.repad(xo, counts, padded) if token is None else ops.gather(xo, token, counts, padded)
            xw = ops.wgrad_input(xp, padded)
        dx, dw13 = ops.grads(dab, xw, (w1, w3), padded, need_x, need_w1 or need_w3)
        dw1, dw3 = dw13 if dw13 is not None else (None, None)
        if need_x:
            dx = ops.repad(dx, padded, counts)
            if token is not None:  # the dispatch gather's gradient: each token's rows summed
                dx = dx.new_zeros(ctx.x_rows, dx.shape[1]).index_add_(0, token, dx)
        return dx, d_gate, dw1 if need_w1 else None, dw2, dw3 if need_w3 else None, None, None, None, None


def expert_ffn(x: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
               counts: list[int], padded: list[int], ops, token: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts' SwiGLU FFN times the routing weights: x [T, dim] sorted by expert,
    ``gate`` [T] the routing weights (FP32), ``counts`` rows per expert, ``padded`` the
    row counts the GEMMs run on (each >= its count; extra rows are zeros); -> [T, dim].
    With ``token`` [T] (int64), x is [N, dim] token rows and the expert rows are
    ``x[token]``, gathered here: see the module doc."""
    return _ExpertFFNFn.apply(x, gate, w1, w2, w3, list(counts), list(padded), ops, token)
