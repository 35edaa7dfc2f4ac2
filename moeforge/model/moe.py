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
  The routing weights travel with the rows and are applied inside the experts' FFN
  (``expert_ffn.py``), whose backward gets their gradient without keeping output rows.
  :class:`LocalDispatcher` is its own component so expert parallelism can swap in an
  all-to-all one.
- With the local dispatcher the experts get the token rows and each row's token, not the
  gathered rows: they gather them themselves, padded for the GEMMs in the same pass, and
  what they keep of their input is the token rows, which are the FFN norm's output and so
  rebuilt from the norm's input (kept anyway) in backward. The k gathered copies were the
  largest activation of a MoE layer (8 MB of bf16 per layer on the small preset; -25% of
  the step's saved bytes in bf16, -19% under FP8, where the token rows' 1x128 E4M3 copy is
  also the shared experts': one quantization of T rows instead of T and T*k). Step time
  unchanged within noise (interleaved MoE layer A/B: 0.99-1.02x bf16, 0.97-1.0x FP8).
- ``GroupedExperts.gemm`` (the experts' GEMM ops) is an instance attribute so FP8
  conversion can replace the expert GEMMs without this file knowing about FP8.
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
from moeforge.model.expert_ffn import GroupedGemm, expert_ffn, grouped_linear_fn
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


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [T, in] sorted by expert, w [E, out, in], counts tokens per expert -> [T, out].

    One ``torch._grouped_mm`` call for all experts; experts with no tokens cost nothing.
    """
    if recompute.is_plain(x, w) and not torch.compiler.is_compiling():
        return grouped_linear_fn(x, w, counts, GroupedGemm())
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[1])
    return GroupedGemm().forward(x, w, counts, x.dtype)  # plain autograd through the same GEMM


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights in nn.Linear layout [E, out, in].

    ``forward(x, counts, gate)`` returns each row's expert output times its routing weight
    ``gate`` (applied here, not in the combine, so its gradient needs no saved output
    rows: see ``expert_ffn.py``). Plain tensors go through :func:`expert_ffn.expert_ffn`,
    one lean Function whose GEMMs run on ``self.gemm`` (:class:`GroupedGemm`; FP8
    conversion swaps in its own, so this file knows nothing of FP8); DTensors and
    torch.compile take the ordinary autograd graph of the same math.

    On CPU every expert's rows are zero-padded to a multiple of a bucket for the GEMMs.
    oneDNN (bf16 ``mm``) JIT-compiles a kernel per GEMM shape and caches it; expert row
    counts change every step, so unpadded shapes almost never hit that cache and the
    backward GEMMs ran ~10x slower in the model than the same GEMMs repeated alone
    (measured on the small preset). With buckets the shapes repeat and the zero rows cost
    at most bucket - 1 rows per expert; zero rows give zero outputs and add nothing to
    the weight gradients. fp32 GEMMs (MKL) compile nothing per shape, and padding them made a
    ``small`` fp32 step 3-10% slower (8 and 4 sequences), so they run unpadded. The bucket
    is the GEMM ops' ``row_bucket_for(dtype)``: 64 for bf16 (128
    padded the small preset's ~256-row experts by 22-31%; 64 measured 3-4.5% faster per
    step, 32 no faster than 128), the FP8 block size (128) under FP8, whose 128-row Wgrad
    tiles must not straddle experts. ``row_bucket`` set on the module overrides it (tests).
    With few rows per expert on average the bucket halves (down to 16) until it is at
    most half the mean, so padding stays a modest fraction of the work.
    """

    row_bucket: int | None = None  # None: ``self.gemm.row_bucket_for(dtype)``
    fused_ffn = True  # False: the ordinary graph for plain tensors too (the reference in tests, A/B)

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up
        self.gemm = GroupedGemm()
        self.swiglu_fp8 = None  # an Fp8Config: cache the SwiGLU inputs in FP8 (set by fp8.convert)

    def padded_counts(self, counts: list[int], device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[int]:
        """Rows per expert the GEMMs run on (see the class doc; unpadded off CPU, and for
        GEMMs in a dtype whose kernels are not compiled per shape)."""
        bucket = self.row_bucket or self.gemm.row_bucket_for(dtype)
        if device.type != "cpu" or bucket <= 1:
            return list(counts)
        while bucket > 16 and bucket > sum(counts) / (2 * len(counts)):  # few tokens per expert: finer buckets
            bucket //= 2
        return [-(-c // bucket) * bucket for c in counts]

    def forward(self, x: torch.Tensor, counts: list[int], gate: torch.Tensor | None = None,
                token: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, dim] sorted by expert, ``counts`` rows per expert, ``gate`` [T] routing
        weights (None: all 1) -> [T, dim]. With ``token`` [T], x is [N, dim] token rows and
        row i is ``x[token[i]]`` (gathered here; see the class doc)."""
        counts = list(counts)
        rows = x.shape[0] if token is None else token.shape[0]
        if gate is None:
            gate = x.new_ones(rows, dtype=torch.float32)
        if rows == 0:
            return x.new_zeros(0, self.w2.shape[1])
        padded = self.padded_counts(counts, x.device, x.dtype)
        lean = self.fused_ffn and not torch.compiler.is_compiling()
        if lean and recompute.is_plain(x, gate, self.w1, self.w2, self.w3):
            return expert_ffn(x, gate, self.w1, self.w2, self.w3, counts, padded, self.gemm, token)
        if token is not None:
            x = x.index_select(0, token)
        # the ordinary graph: rows padded by index (differentiable for DTensors), plain GEMMs
        if padded != counts:
            dest = padded_rows(counts, padded, x.device)
            x = x.new_zeros(sum(padded), x.shape[1]).index_put((dest,), x)
        h = silu_mul(self._linear(x, self.w1, padded), self._linear(x, self.w3, padded), self.swiglu_fp8)
        y = self._linear(h, self.w2, padded)
        if padded != counts:
            y = y.index_select(0, dest)
        return y * gate.to(y.dtype).unsqueeze(-1)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if isinstance(self.gemm, GroupedGemm):
            return grouped_linear(x, w, counts)
        return grouped_linear_fn(x, w, counts, self.gemm)


def padded_rows(counts: list[int], padded: list[int], device: torch.device) -> torch.Tensor:
    """Where each row of an expert-sorted [sum(counts), d] tensor lands when every expert's
    block is padded to ``padded[i]`` rows (its rows first, zero rows after)."""
    c = torch.tensor(counts, device=device)
    shift = torch.tensor(padded, device=device).cumsum(0) - c.cumsum(0)  # zero rows before the next expert
    shift = torch.cat([shift.new_zeros(1), shift[:-1]])
    return torch.arange(int(c.sum()), device=device) + shift.repeat_interleave(c, output_size=int(c.sum()))


class LocalDispatcher:
    """Sort (token, slot) pairs by expert and scatter results back; all experts are local."""

    def route(self, idx: torch.Tensor, weights: torch.Tensor, n_experts: int):
        """-> (each expert row's token [T*k], its routing weight [T*k], tokens per expert),
        rows sorted by expert; the rows themselves are ``x[token]``."""
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=n_experts)
        return order // idx.shape[1], weights.flatten().index_select(0, order), counts

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n_experts: int):
        """-> (rows [T*k, d], their routing weights [T*k], tokens per expert, ctx for combine)."""
        token, gate, counts = self.route(idx, weights, n_experts)
        # index_select, not x[token]: its backward is one index_add (0.65 ms on small's
        # 8192 x 512 rows) where advanced indexing's accumulating index_put sorts first (7 ms)
        return x.index_select(0, token), gate, counts, token

    def combine(self, y: torch.Tensor, ctx, n_tokens: int) -> torch.Tensor:
        """Sum each token's (already weighted) expert rows."""
        token = ctx
        if recompute.is_plain(y):
            return recompute.scatter_add_rows(y, token, n_tokens)  # saves token only
        return y.new_zeros(n_tokens, y.shape[-1]).index_add(0, token, y)


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
        if isinstance(self.dispatcher, LocalDispatcher):  # the experts gather their rows themselves
            ctx, gate, counts = self.dispatcher.route(idx, weights, self.n_experts)
            ys = self.experts(flat, counts.tolist(), gate, token=ctx)
        else:
            xs, gate, counts, ctx = self.dispatcher.dispatch(flat, idx, weights, self.n_experts)
            ys = self.experts(xs, counts.tolist(), gate)
        y = self.dispatcher.combine(ys, ctx, flat.shape[0])
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        self.last_counts = counts.detach()
        if self.compute_aux and self.training:
            self.last_aux_loss = sequence_balance_loss(scores, idx, b, self.n_experts, self.topk)
        else:
            self.last_aux_loss = None
        return y.view(b, s, d)
