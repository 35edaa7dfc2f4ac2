"""Mixture of Experts: router, token dispatch, grouped experts, shared experts.

Choices (DeepSeek-V3, TR §2.1.2 and the reference ``Gate``):
- The router runs in FP32. Scores are sigmoid (V3) or softmax of ``x @ W^T``. A per-expert
  balancing ``bias`` (FP32 buffer, HF name ``e_score_correction_bias``) is added to the
  scores *only to choose* experts; gate weights come from the unbiased scores of the
  chosen experts, normalised to sum 1 and multiplied by ``route_scale``.
- Group-limited routing: experts are split into ``n_expert_groups``; a group's score is
  the sum of its two best biased scores; only the best ``n_limited_groups`` groups stay
  eligible; top-k is taken among their experts.
- Aux-loss-free balancing: :meth:`Gate.update_bias` moves each bias by ``gamma`` against
  the sign of (load - mean load), from counts over the whole global batch (the trainer
  sums counts over micro-batches and, later, data-parallel ranks).
- The sequence-wise balance loss alpha * sum_i f_i P_i (TR Eq. 17-20) is computed per
  sequence and averaged over the batch.
- Dispatch without loops over tokens: (token, slot) pairs are sorted by expert, each
  expert's contiguous slice goes through one GEMM (``torch._grouped_mm``: one call for all
  experts, empty experts do no work), and results are scattered back with index_add
  (through ``recompute.scatter_add_rows``, which does not keep the rows for backward).
  :class:`LocalDispatcher` is its own component so expert parallelism can swap in an
  all-to-all one.
- ``GroupedExperts.grouped_linear`` is an instance attribute so FP8 conversion can
  replace the expert GEMM without this file knowing about FP8.
- Each forward records ``last_counts`` (tokens per expert, detached) and ``last_aux_loss``
  for the model to collect: no hidden global state, and re-running a forward (activation
  checkpointing) just overwrites them with the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import ModelConfig
from moeforge.model import recompute
from moeforge.model.layers import MLP, silu_mul


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_experts = cfg.n_routed_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unbiased affinity scores [T, E] in FP32."""
        if x.dim() == 2 and recompute.is_plain(x, self.weight):
            logits = recompute.fp32_linear(x, self.weight)  # saves x in its dtype, not an FP32 copy
        else:
            logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose experts from scores [T, E]: returns (weights [T, k] fp32, indices [T, k])."""
        biased = scores + self.bias
        if self.n_groups > 1:
            g = biased.view(-1, self.n_groups, self.n_experts // self.n_groups)
            group_score = g.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            biased = g.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        idx = biased.topk(self.topk, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return w * self.route_scale, idx

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free balancing step from the global batch's tokens per expert."""
        counts = counts.to(self.bias.device, torch.float32)
        self.bias += gamma * torch.sign(counts.mean() - counts)


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, batch: int, n_experts: int, topk: int) -> torch.Tensor:
    """alpha-free sequence-wise balance loss: mean over sequences of sum_i f_i * P_i.

    scores [B*S, E] unbiased affinities, idx [B*S, k] chosen experts.
    f_i = E / (k * S) * (tokens of the sequence routing to i); P_i = mean_t normalised score.
    """
    s = scores.view(batch, -1, n_experts)
    seq_len = s.shape[1]
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    hits = torch.zeros(batch, n_experts, device=scores.device, dtype=torch.float32)
    hits.scatter_add_(1, idx.view(batch, -1), torch.ones(idx.view(batch, -1).shape, device=scores.device))
    f = hits * (n_experts / (topk * seq_len))
    return (f * p).sum(dim=-1).mean()


class _GroupedLinearFn(torch.autograd.Function):
    """The expert GEMM with its own backward. Autograd's ``_grouped_mm`` backward computes
    the weight gradient as ``x^T dy`` per expert, i.e. for ``W^T``, which reaches the FP32
    master as a transposed view; here dW = ``dy^T x`` comes out in W's own layout, so
    its cast to FP32 is a plain contiguous copy. The bf16 weight copy is made again in
    backward rather than kept (~2 ms per expert stack). Bit-identical results (tested). (The
    profiler blamed those casts for ~0.3 s per small step; timed directly they are ~2 ms
    each, ~50 ms per step, so this is hygiene more than speed.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        wc = w.to(x.dtype)
        # the master weight is kept anyway: save it, not its compute-dtype copy (all
        # experts' bf16 weights were ~190 MB of the small preset's 670 MB of activations)
        ctx.save_for_backward(x, w, offs)
        ctx.w_dtype = w.dtype
        return torch._grouped_mm(x, wc.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dx = torch._grouped_mm(dy, w.to(x.dtype), offs=offs) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # K-grouped over tokens: [out, T] x [T, in] -> [E, out, in]
            dw = torch._grouped_mm(dy.t(), x, offs=offs).to(ctx.w_dtype)
        return dx, dw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [T, in] sorted by expert, w [E, out, in], counts tokens per expert -> [T, out].

    One ``torch._grouped_mm`` call for all experts; experts with no tokens cost nothing.
    """
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[1])
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    if recompute.is_plain(x, w):
        return _GroupedLinearFn.apply(x, w, offs)
    w = w.to(x.dtype)
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights in nn.Linear layout [E, out, in].

    On CPU every expert's rows are zero-padded to a multiple of ``row_bucket`` before the
    GEMMs. oneDNN (bf16 ``mm``) JIT-compiles a kernel per GEMM shape and caches it; expert
    row counts change every step, so unpadded shapes almost never hit that cache and the
    backward GEMMs ran ~10x slower in the model than the same GEMMs repeated alone
    (measured on the small preset). With buckets the shapes repeat and the zero rows cost
    at most ``row_bucket - 1`` rows per expert; zero rows give zero outputs and add
    nothing to the weight gradients. 128 also makes the FP8 path's 128-row tiles whole.
    With fewer than 256 rows per expert on average the bucket halves (down to 16) until
    it is at most half the mean, so padding stays a modest fraction of the work.
    """

    row_bucket = 128

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up
        self.grouped_linear = grouped_linear
        self.swiglu_fp8 = None  # an Fp8Config: cache the SwiGLU inputs in FP8 (set by fp8.convert)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        bucket = self.row_bucket
        while bucket > 16 and bucket > sum(counts) / (2 * len(counts)):  # few tokens per expert: finer buckets
            bucket //= 2
        padded = [-(-c // bucket) * bucket for c in counts]
        if x.device.type != "cpu" or padded == counts:
            return self._swiglu(x, counts)
        # CPU: each expert's rows padded with zeros to a multiple of row_bucket (see class doc)
        if not recompute.is_plain(x):
            dest = padded_rows(counts, padded, x.device)
            xp = x.new_zeros(sum(padded), x.shape[1]).index_put((dest,), x)  # index_copy would also save x
            return self._swiglu(xp, padded).index_select(0, dest)
        return _RepadFn.apply(self._swiglu(_RepadFn.apply(x, counts, padded), padded), padded, counts)

    def _swiglu(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        h = silu_mul(self.grouped_linear(x, self.w1, counts), self.grouped_linear(x, self.w3, counts), self.swiglu_fp8)
        return self.grouped_linear(h, self.w2, counts)


def repad_rows(x: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """Rows grouped in blocks of ``counts[i]`` -> blocks of ``padded[i]`` rows: each block
    keeps its first min(c, p) rows and is zero-filled to p. One ``cat`` of slices, i.e.
    memcpy speed (``index_put`` / ``index_select`` by row index ran ~5x slower)."""
    extra = max([p - c for c, p in zip(counts, padded)] + [0])
    zeros = x.new_zeros(extra, x.shape[1]) if extra else None
    parts = []
    for piece, c, p in zip(x.split(counts), counts, padded):
        parts.append(piece[:p])
        if p > c:
            parts.append(zeros[: p - c])
    return torch.cat(parts) if parts else x.new_zeros(0, x.shape[1])


class _RepadFn(torch.autograd.Function):
    """:func:`repad_rows` whose backward is the opposite re-padding; saves nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
        ctx.counts, ctx.padded = counts, padded
        return repad_rows(x, counts, padded)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return repad_rows(g, ctx.padded, ctx.counts), None, None


def padded_rows(counts: list[int], padded: list[int], device: torch.device) -> torch.Tensor:
    """Where each row of an expert-sorted [sum(counts), d] tensor lands when every expert's
    block is padded to ``padded[i]`` rows (its rows first, zero rows after)."""
    c = torch.tensor(counts, device=device)
    shift = torch.tensor(padded, device=device).cumsum(0) - c.cumsum(0)  # zero rows before the next expert
    shift = torch.cat([shift.new_zeros(1), shift[:-1]])
    return torch.arange(int(c.sum()), device=device) + shift.repeat_interleave(c, output_size=int(c.sum()))


class LocalDispatcher:
    """Sort (token, slot) pairs by expert and scatter results back; all experts are local."""

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor, n_experts: int):
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // idx.shape[1]
        counts = torch.bincount(flat, minlength=n_experts)
        return x[token], counts, (order, token)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, ctx, n_tokens: int) -> torch.Tensor:
        order, token = ctx
        w = weights.flatten()[order].unsqueeze(-1).to(y.dtype)
        if recompute.is_plain(y):
            return recompute.scatter_add_rows(y * w, token, n_tokens)  # saves token only
        return y.new_zeros(n_tokens, y.shape[-1]).index_add(0, token, y * w)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.dispatcher = LocalDispatcher()
        self.compute_aux = cfg.seq_aux_alpha > 0
        self.last_counts: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        scores = self.gate.scores(flat)
        weights, idx = self.gate.route(scores)
        xs, counts, ctx = self.dispatcher.dispatch(flat, idx, self.n_experts)
        ys = self.experts(xs, counts.tolist())
        y = self.dispatcher.combine(ys, weights, ctx, flat.shape[0])
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        self.last_counts = counts.detach()
        if self.compute_aux and self.training:
            self.last_aux_loss = sequence_balance_loss(scores, idx, b, self.n_experts, self.topk)
        else:
            self.last_aux_loss = None
        return y.view(b, s, d)
