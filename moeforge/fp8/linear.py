"""FP8 training GEMMs: ``Fp8Linear`` and the FP8 grouped-expert GEMM ops.

``Fp8Linear`` (an autograd Function) and :class:`Fp8GroupedGemm` (the GEMM ops the
routed experts' fused FFN in ``moeforge.model.expert_ffn`` runs on) compute all three
GEMMs on blockwise-scaled E4M3 operands
(DeepSeek-V3 TR section 3.3), written as ``C = A @ B.T`` with both operands tiled along K:

- Fprop  ``y  = x @ W.T``   x per 1x128 tile (along in), W per 128x128 block;
- Dgrad  ``dx = dy @ W``    dy per 1x128 tile (along out), the *same* quantized W, transposed
  (square blocks make W.T's blocks W's blocks; the gradient is that of the function computed);
- Wgrad  ``dW = dy.T @ x``  dy and x re-tiled 128x1 (128 tokens x 1 channel), so the scales
  again run along this GEMM's K, the token dimension. x comes from the FP8 copy saved in
  the forward: dequantized and re-quantized, as V3 does (on CPU one C-kernel pass). An x
  that nobody keeps in FP8 because backward has it in bf16 anyway (a norm's output,
  rebuilt from the norm's input, or a tensor kept as is) is quantized 128x1 straight from
  those bf16 values: one rounding instead of two, one pass instead of two (1x128, then
  the re-tiling), and one for both GEMMs reading it (wq_a/wkv_a, w1/w3).

Choices:

- Saved for backward: x in FP8 with its 1x128 scales, never a bf16 or fp32 copy. GEMMs
  reading the same activation tensor (wq_a/wkv_a, w1/w3) share one quantization of it and
  so save one copy. Weights are not saved at all: their 128x128-block quantization is
  made once per optimizer step and kept with the parameter (``Fp8Ops.weight`` through
  ``moeforge.model.weight_cache``), so Fprop and Dgrad read the same blocks for one
  quantization pass per step; backward saves the master and asks for it again. Master
  weights stay whatever the parameter is (FP32); dW is returned in the weight's dtype, dx
  in the input's.
- Scales are online (current tensor), as published: no amax history.
- CPU cost: the quantizers are C kernels (``cpu_kernels.py``) that write the E4M3 copy
  and, in the same pass, the dequantized bf16 GEMM operand (``Fp8Tensor.dq``), so a GEMM
  operand costs one pass over the tensor instead of eight; the torch path remains as the
  fallback and the reference. dy is quantized 1x128 and 128x1; the Wgrad re-tiling
  dequantizes the saved FP8 x and quantizes it again (``Fp8Ops.retile``). W's 128x128
  blocks serve W.T as they are, so Dgrad uses the same quantization of W as Fprop.
- The backend is picked per call from the tensor's device: Triton kernels on CUDA when
  ``backend`` is auto or triton, the CPU emulation (dequantize + bf16/fp32 GEMM) otherwise.
- Grouped experts: tokens arrive sorted by expert with per-expert ``counts``; see
  :class:`Fp8GroupedGemm` for empty experts and the Wgrad's per-expert 128-token tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from moeforge.fp8 import cpu_kernels
from moeforge.fp8 import gemm as emulated_gemm
from moeforge.fp8.config import Fp8Config
from moeforge.fp8.quant import Fp8Tensor, quantize, quantize_many
from moeforge.model import recompute, weight_cache
from moeforge.precision import resolve
from moeforge.model.expert_ffn import Weight, gather_rows, grouped_mm, parts, repad_rows, split_grad, stacked_form, stacked_shape


@dataclass(frozen=True)
class Fp8Ops:
    """Quantize + GEMM for one device, configured once from :class:`Fp8Config`."""

    block: int = 128
    eps: float = 1e-12
    power_of_2: bool = False
    compute_dtype: torch.dtype = torch.bfloat16  # CPU emulation only
    use_triton: bool = False

    @classmethod
    def for_device(cls, cfg: Fp8Config, device: torch.device) -> "Fp8Ops":
        on_cuda = device.type == "cuda"
        if cfg.backend == "triton" and not on_cuda:
            raise RuntimeError("fp8.backend = 'triton' needs CUDA tensors; use 'auto' or 'emulated' on CPU")
        return cls(cfg.block_size, cfg.eps, cfg.power_of_2_scales,
                   resolve(cfg.cpu_gemm_dtype, "cpu", "fp8.cpu_gemm_dtype").dtype,
                   on_cuda and cfg.backend in ("auto", "triton"))

    def _block(self, tile: str) -> tuple[int, int]:
        return {"row": (1, self.block), "col": (self.block, 1), "block": (self.block, self.block)}[tile]

    def quantize(self, x: torch.Tensor, tile: str) -> Fp8Tensor:
        """``tile`` is 'row' (1xB), 'col' (Bx1) or 'block' (BxB)."""
        if self.use_triton:
            from moeforge.fp8 import kernels
            return kernels.quantize(x, self._block(tile), eps=self.eps, power_of_2=self.power_of_2)
        return quantize(x, self._block(tile), eps=self.eps, power_of_2=self.power_of_2, dq_dtype=self.compute_dtype)

    def weight(self, w: Weight) -> Fp8Tensor:
        """W's 128x128-block quantization, made once per optimizer step (``weight_cache``):
        the forward GEMM and the backward Dgrad read the same blocks. A tuple ``w`` is
        quantized as its parts stacked along out (the experts' [W1; W3])."""
        if isinstance(w, torch.Tensor):
            return weight_cache.cached(w, ("fp8", self), lambda t: self.quantize(t, "block"))
        return stacked_form(w, ("fp8", self), self._quantize_stacked)

    def _quantize_stacked(self, ps: tuple[torch.Tensor, ...]) -> Fp8Tensor:
        """Blocks of ``cat(ps, -2)``. When every part but the last fills whole blocks, no
        block straddles two parts: each part's blocks are its own, and the C kernel writes
        them straight into place (a concatenated FP32 copy cost ~13 ms per expert layer)."""
        b = self.block
        if (self.use_triton or not cpu_kernels.usable(ps[0]) or any(p.shape[-2] % b for p in ps[:-1])
                or any(not p.is_contiguous() or p.dtype != ps[0].dtype for p in ps)):
            return self.quantize(torch.cat(ps, -2), "block")
        shape = stacked_shape(ps)
        q = torch.empty(shape, dtype=torch.float8_e4m3fn)
        s = torch.empty(*shape[:-2], -(-shape[-2] // b), -(-shape[-1] // b), dtype=torch.float32)
        dq = torch.empty(shape, dtype=self.compute_dtype)
        lead = [(i,) for i in range(ps[0].shape[0])] if ps[0].dim() == 3 else [()]
        r = 0
        for p in ps:
            rows, srows = slice(r, r + p.shape[-2]), slice(r // b, -(-(r + p.shape[-2]) // b))
            for i in lead:  # [E, R, C]: one call per expert, its rows of the stack are contiguous
                cpu_kernels.quantize(p[i], (b, b), self.eps, self.power_of_2,
                                     out=(q[i][rows], s[i][srows], dq[i][rows]))
            r += p.shape[-2]
        return Fp8Tensor(q, s, (b, b), dq)

    def quantize_many(self, x: torch.Tensor, tiles: tuple[str, ...]) -> list[Fp8Tensor]:
        """``x`` in several tilings, each with its dequantized operand on CPU (one C-kernel
        pass per tiling; the torch fallback shares one FP32 copy and ``|x|``)."""
        if self.use_triton:
            return [self.quantize(x, t) for t in tiles]
        return quantize_many(x, tuple(self._block(t) for t in tiles), eps=self.eps, power_of_2=self.power_of_2,
                             dq_dtype=self.compute_dtype)

    def retile(self, xq: Fp8Tensor, tile: str, pad: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Fp8Tensor:
        """Dequantize to FP32 (then ``pad``) and quantize again in ``tile``: V3's Wgrad
        re-tiling of x. Without padding on CPU the C kernel does both in one pass (the
        same bits, reading 1 byte per element instead of writing and re-reading 4);
        otherwise that FP32 tensor is ours, so it is divided in place."""
        if pad is None and not self.use_triton and xq.data.device.type == "cpu" and cpu_kernels.available():
            q, s, dq = cpu_kernels.quantize(xq.data.contiguous(), self._block(tile), self.eps, self.power_of_2,
                                            self.compute_dtype, x_scale=xq.scale, x_block=xq.block)
            return Fp8Tensor(q, s, self._block(tile), dq)
        x = xq.dequantize(torch.float32)
        if pad is not None:
            x = pad(x)
        if self.use_triton:
            return self.quantize(x, tile)
        return quantize_many(x, (self._block(tile),), eps=self.eps, power_of_2=self.power_of_2, overwrite=True,
                             dq_dtype=self.compute_dtype)[0]

    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``A @ B.T``."""
        if self.use_triton:
            from moeforge.fp8 import kernels
            return kernels.blockwise_gemm(a, b, out_dtype=out_dtype)
        return emulated_gemm.blockwise_gemm(a, b, out_dtype=out_dtype, compute_dtype=self.compute_dtype)

    def grouped_gemm(self, a: Fp8Tensor, b: Fp8Tensor, counts: list[int], out_dtype: torch.dtype,
                     k_grouped: bool = False) -> torch.Tensor:
        """M-grouped: ``a [T, K]`` rows split by ``counts``, ``b [G, N, K]`` -> ``[T, N]``.
        K-grouped (Wgrad): ``a [M, T]``, ``b [N, T]`` with T split by ``counts`` -> ``[G, M, N]``."""
        if self.use_triton:  # one dense kernel per group; a grouped Triton kernel is future work
            if k_grouped:
                bounds = _bounds(counts)
                return torch.stack([self.gemm(_cols(a, s, e), _cols(b, s, e), out_dtype) for s, e in bounds])
            return torch.cat([self.gemm(_rows(a, s, e), _expert(b, g), out_dtype)
                              for g, (s, e) in enumerate(_bounds(counts))])
        cd = self.compute_dtype
        b_op = b.dequantize(cd).t() if k_grouped else b.dequantize(cd).transpose(-2, -1)
        return grouped_mm(a.dequantize(cd), b_op, counts).to(out_dtype)


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    out, s = [], 0
    for c in counts:
        out.append((s, s + c))
        s += c
    return out


def _rows(x: Fp8Tensor, s: int, e: int) -> Fp8Tensor:  # rows s:e of a 1xB-tiled tensor
    return Fp8Tensor(x.data[s:e], x.scale[s:e], x.block)


def _cols(x: Fp8Tensor, s: int, e: int) -> Fp8Tensor:  # columns s:e, B-aligned (padded segments)
    b = x.block[1]
    return Fp8Tensor(x.data[:, s:e], x.scale[:, s // b:-(-e // b)], x.block)


def _expert(w: Fp8Tensor, g: int) -> Fp8Tensor:
    return Fp8Tensor(w.data[g], w.scale[g], w.block)


def _grad_operands(ops: Fp8Ops, dy: torch.Tensor, dy_col: torch.Tensor, need_x: bool,
                   need_w: bool) -> tuple[Fp8Tensor | None, Fp8Tensor | None]:
    """The output gradient tiled 1x128 for Dgrad (``dy``) and 128x1 for Wgrad (``dy_col``,
    the same tensor or its expert-padded copy), each only if needed; one quantization
    pass serves both when they are the same tensor."""
    if need_x and need_w and dy_col is dy:
        row, col = ops.quantize_many(dy, ("row", "col"))
        return row, col
    return (ops.quantize(dy, "row") if need_x else None), (ops.quantize(dy_col, "col") if need_w else None)


# ----------------------------------------------------------------------------- shared input quantization
# Several FP8 GEMMs often read one activation: wq_a and wkv_a the attention input, w1 and
# w3 (dense, shared and routed experts) the MLP input. Each used to quantize it and save
# its own E4M3 copy; the memo below gives them one copy (one pass, one saved tensor),
# keyed by the tensor object and its version counter, held only while that tensor lives.
# The same goes for the 128x1 tiling of an x rebuilt in backward (both siblings' Wgrads).
_INPUT_FP8 = {"row": WeakIdKeyDictionary(), "col": WeakIdKeyDictionary()}


def _quantize_input(ops: Fp8Ops, x: torch.Tensor, x2: torch.Tensor, tile: str = "row") -> Fp8Tensor:
    """``x2`` (``x`` as [rows, K]) in 1x128 (or ``tile``) tiles, shared with earlier GEMMs
    on the same ``x``."""
    if torch.compiler.is_compiling() or x.is_inference():  # inference tensors have no version counter
        return ops.quantize(x2, tile)
    memo = _INPUT_FP8[tile]
    hit = memo.get(x)
    if hit is not None and hit[0] == x._version and hit[1] == ops:
        return hit[2]
    xq = ops.quantize(x2, tile)
    memo[x] = (x._version, ops, xq)
    return xq


# ----------------------------------------------------------------------------- dense linear
class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, ops: Fp8Ops) -> torch.Tensor:
        xq, wq = _quantize_input(ops, x, x.reshape(-1, x.shape[-1])), ops.weight(weight)
        y = ops.gemm(xq, wq, x.dtype)
        # Kept for backward: x's E4M3 copy, or nothing new when x is kept anyway: a norm's
        # output is rebuilt from the norm's input, and a tensor saved as is is kept itself;
        # either way backward quantizes it again (the same bits).
        # W: the master, not its FP8 copy (quantized again in backward, the same bits).
        src = recompute.source(x)
        ctx.how, ctx.rebuild = ("fp8", None) if src is None else ("rebuild", src[1])
        kept = (xq.data, xq.scale) if src is None else src[0]
        if src is None and recompute.kept_as_is(x):
            ctx.how, kept = "kept", (x,)
        ctx.save_for_backward(*kept, weight)
        ctx.ops, ctx.x_shape, ctx.w_dtype = ops, x.shape, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        ops = ctx.ops
        *xs, weight = ctx.saved_tensors
        if ctx.how == "fp8":
            xq = Fp8Tensor(xs[0], xs[1], (1, ops.block))
        elif ctx.needs_input_grad[1]:  # x again (the forward's bits), quantized straight to 128x1
            x = ctx.rebuild(*xs) if ctx.how == "rebuild" else xs[0]
            x_col = _quantize_input(ops, x, x.reshape(-1, x.shape[-1]), "col")  # shared by wq_a/wkv_a, w1/w3
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy_row, dy_col = _grad_operands(ops, dy2, dy2, *ctx.needs_input_grad[:2])
        dx = dw = None
        if dy_row is not None:  # only Dgrad reads W
            dx = ops.gemm(dy_row, ops.weight(weight).t(), dy.dtype).reshape(ctx.x_shape)
        if dy_col is not None:
            if ctx.how == "fp8":
                x_col = ops.retile(xq, "col")  # 1x128 -> 128x1
            dw = ops.gemm(dy_col.t(), x_col.t(), ctx.w_dtype)
        return dx, dw, None


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs (forward and both backward) run in blockwise FP8.

    Same parameters and state-dict keys as the Linear it replaces (it shares them), so
    optimizers, checkpoints and the Hugging Face mapping do not notice the swap. Accepts
    fp32 or bf16 input and returns the input's dtype; the bias, if any, is added in it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 cfg: Fp8Config | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8 = cfg or Fp8Config(enabled=True)

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: Fp8Config) -> "Fp8Linear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, cfg, device="meta")
        new.weight, new.bias = lin.weight, lin.bias  # the very same Parameters
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8LinearFn.apply(x, self.weight, Fp8Ops.for_device(self.fp8, x.device))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=blockwise{self.fp8.block_size}"


# ----------------------------------------------------------------------------- grouped experts
class Fp8GroupedGemm:
    """The routed experts' GEMM ops (the contract is in ``moeforge.model.expert_ffn``) with
    all three GEMMs in blockwise FP8: ``GroupedExperts.gemm`` after ``fp8.convert``.

    - Operands: x 1x128 (E4M3 saved, its dequantized copy only feeds the forward GEMM);
      the SwiGLU inputs kept in E4M3 1x128 when ``cache_swiglu`` (V3 TR 3.3.2), else as
      they are; weights 128x128 blocks, the whole stack's quantization made once per
      optimizer step (``Fp8Ops.weight``).
    - Experts with no tokens get a zero gradient; they are dropped before any GEMM except on
      the CPU path with a cached weight stack (``_experts``).
    - Wgrad: each expert's segment is zero-padded to a multiple of 128 tokens so no 128x1
      tile straddles two experts; then one K-grouped GEMM gives all dW. A saved FP8 x is
      dequantized and re-tiled (V3); a recomputed bf16 operand (the SwiGLU output, the
      expert rows gathered from the rebuilt FFN-norm output) is quantized 128x1 directly.
    """

    def __init__(self, cfg: Fp8Config):
        self.cfg = cfg
        self.block = (1, cfg.block_size)
        self.row_bucket = cfg.block_size  # CPU pads each expert's rows to whole Wgrad tiles up front

    def row_bucket_for(self, dtype: torch.dtype) -> int:
        return self.row_bucket  # whatever the GEMM dtype: a 128-row Wgrad tile must not straddle experts

    def _ops(self, t: torch.Tensor) -> Fp8Ops:
        return Fp8Ops.for_device(self.cfg, t.device)

    def input(self, x: torch.Tensor) -> Fp8Tensor:
        return _quantize_input(self._ops(x), x, x.reshape(-1, x.shape[-1]))

    def keep(self, t: torch.Tensor) -> Fp8Tensor | torch.Tensor:
        if not self.cfg.cache_swiglu:
            return t
        return quantize(t, self.block, eps=self.cfg.eps, power_of_2=self.cfg.power_of_2_scales)

    def value(self, kept: Fp8Tensor | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return kept.dequantize(dtype) if isinstance(kept, Fp8Tensor) else kept

    def pack(self, op: Fp8Tensor | torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (op.data, op.scale) if isinstance(op, Fp8Tensor) else (op,)

    def unpack(self, saved: tuple[torch.Tensor, ...]) -> Fp8Tensor | torch.Tensor:
        return Fp8Tensor(saved[0], saved[1], self.block) if len(saved) == 2 else saved[0]

    def repad(self, op, counts: list[int], padded: list[int]):
        if counts == padded:
            return op
        if not isinstance(op, Fp8Tensor):
            return repad_rows(op, counts, padded)
        assert op.block[0] == 1, "only 1xB-tiled operands have one scale row per row"
        return Fp8Tensor(repad_rows(op.data, counts, padded), repad_rows(op.scale, counts, padded), op.block,
                         None if op.dq is None else repad_rows(op.dq, counts, padded))

    def gather(self, op: Fp8Tensor | torch.Tensor, index: torch.Tensor, counts: list[int],
               padded: list[int]) -> Fp8Tensor | torch.Tensor:
        """Expert rows from 1x128-tiled token rows: the same bits as quantizing the gathered
        rows. A plain tensor (token rows rebuilt in backward) gives plain rows."""
        if not isinstance(op, Fp8Tensor):
            return gather_rows(op, index, counts, padded)
        pick = lambda t: None if t is None else gather_rows(t, index, counts, padded)  # noqa: E731
        return Fp8Tensor(pick(op.data), pick(op.scale), op.block, pick(op.dq))

    def forward(self, xq: Fp8Tensor, w: Weight, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        ops = self._ops(parts(w)[0])
        n_used, idx = _experts(ops, w, counts, parts(w)[0].device)
        return ops.grouped_gemm(xq, _quantize_used(ops, w, idx), n_used, dtype)

    def wgrad_input(self, x: Fp8Tensor | torch.Tensor, counts: list[int]) -> Fp8Tensor:
        n_used, _ = _used(counts, x.data.device if isinstance(x, Fp8Tensor) else x.device)
        padded = _aligned(n_used, self.cfg.block_size)
        pad = lambda t: repad_rows(t, n_used, padded)  # noqa: E731  each expert's rows to whole 128-row tiles
        if isinstance(x, Fp8Tensor):
            if padded == n_used:  # whole tiles already (CPU pads rows to self.row_bucket)
                pad = None
            return self._ops(x.data).retile(x, "col", pad)
        return self._ops(x).quantize(pad(x), "col")

    def grads(self, dy: torch.Tensor, x_col: Fp8Tensor | None, w: Weight, counts: list[int],
              need_dx: bool, need_dw: bool):
        ops = self._ops(dy)
        n_used, idx = _experts(ops, w, counts, dy.device)
        padded = _aligned(n_used, ops.block)  # the same rows as wgrad_input's (empty experts add none)
        dy_p = repad_rows(dy, n_used, padded) if need_dw else dy
        dy_row, dy_col = _grad_operands(ops, dy, dy_p, need_dx, need_dw)
        dx = dw = None
        if need_dx:  # only Dgrad reads W
            dx = ops.grouped_gemm(dy_row, _quantize_used(ops, w, idx).t(), n_used, dy.dtype)
        if need_dw:
            # a stacked weight's dW stays in the GEMM's dtype until split_grad casts each part
            single = isinstance(w, torch.Tensor) or ops.use_triton
            dw_used = ops.grouped_gemm(dy_col.t(), x_col.t(), padded, parts(w)[0].dtype if single else dy.dtype,
                                       k_grouped=True)
            shape = stacked_shape(w)
            dw = dw_used if len(n_used) == shape[0] else dw_used.new_zeros(shape).index_copy_(0, idx, dw_used)
            dw = split_grad(dw, w)
        return dx, dw


def _used(counts: list[int], device: torch.device) -> tuple[list[int], torch.Tensor]:
    """Row counts of the experts that received rows, and those experts' indices."""
    used = [e for e, c in enumerate(counts) if c > 0]
    return [counts[e] for e in used], torch.tensor(used, dtype=torch.long, device=device)


def _experts(ops: Fp8Ops, w: Weight, counts: list[int], device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """Row counts of the experts the GEMMs run on and their indices (None: all, in place).
    The CPU emulation's ``_grouped_mm`` takes empty groups (a K-grouped one gives them zero
    dW), so when the whole stack's quantization is cached anyway every expert stays: picking
    the used experts' E4M3 and bf16 weights (``index_select``, each GEMM) and scattering
    their dW into a zero stack cost ~5% of a small FP8 step. The Triton path, and weights
    quantized per call, drop the empty ones."""
    if not ops.use_triton and weight_cache.cacheable(parts(w)[0]):
        return list(counts), None
    return _used(counts, device)


def _aligned(counts: list[int], b: int) -> list[int]:
    return [-(-c // b) * b for c in counts]


def _quantize_used(ops: Fp8Ops, w: Weight, idx: torch.Tensor | None) -> Fp8Tensor:
    """The 128x128-block E4M3 copy of the experts ``idx`` that received tokens (selected
    from the whole stack's, which ``weight_cache`` keeps for the step; all for None)."""
    first = parts(w)[0]
    if idx is None or len(idx) == first.shape[0]:
        return ops.weight(w)
    if not weight_cache.cacheable(first):  # nothing to reuse: quantize only the used experts
        picked = tuple(p.index_select(0, idx) for p in parts(w))
        return ops.weight(picked[0] if isinstance(w, torch.Tensor) else picked)
    q = ops.weight(w)
    pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
    return Fp8Tensor(pick(q.data), pick(q.scale), q.block, pick(q.dq))


class Fp8GroupedLinear:
    """Drop-in for ``moeforge.model.moe.grouped_linear``: ``(x [T, in], w [E, out, in],
    counts list[int]) -> [T, out]`` with all three GEMMs in blockwise FP8."""

    def __init__(self, cfg: Fp8Config):
        self.cfg = cfg
        self.gemm = Fp8GroupedGemm(cfg)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        from moeforge.model.expert_ffn import grouped_linear_fn

        return grouped_linear_fn(x, w, counts, self.gemm)

    def __repr__(self) -> str:
        return f"Fp8GroupedLinear(block={self.cfg.block_size})"
