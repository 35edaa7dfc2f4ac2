"""The DeepSeek-V3-style transformer: blocks, model, multi-token prediction, parameter counts.

Choices:
- Pre-norm blocks: x + attn(norm(x)), then x + ffn(norm(x)); the first
  ``n_dense_layers`` use a dense SwiGLU MLP, the rest MoE (as V3's first 3 of 61).
- Multi-token prediction (TR §2.2): D sequential modules. Module k takes the previous
  depth's hidden states h and the embedding of the token k ahead, combines
  [RMSNorm(emb); RMSNorm(h)] through a d x 2d projection (embedding first, as in the
  released checkpoints' ``eh_proj``), runs one block, and predicts with the shared head
  after its own final norm. Embedding and head are shared with the main model.
  ``drop_mtp()`` removes the modules for inference.
- ``compute_dtype`` is explicit: embeddings are cast to it and every Linear computes in
  the dtype it receives; logits come out in FP32 for a stable loss.
- Given ``labels`` (training), forward fuses the head with the cross-entropy
  (``head_loss.py``) and returns the CE values instead of logits: no FP32 [tokens, vocab]
  tensors, ~20% off a CPU step on the small preset. Without labels it returns logits.
- Forward returns a :class:`ModelOutput` carrying logits, MTP logits and the MoE
  statistics (tokens per expert per MoE layer, the summed sequence-balance loss), so the
  trainer needs no hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeforge.config import ModelConfig
from moeforge.model.attention import KVCache, build_attention
from moeforge.model.head_loss import head_cross_entropy
from moeforge.model import recompute
from moeforge.model.layers import MLP, Linear, RMSNorm
from moeforge.model.moe import MoE, GroupedExperts, Gate


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, cache)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = Linear(2 * cfg.dim, cfg.dim)
        self.block = Block(cfg, moe)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(recompute.cat_outputs(self.enorm(emb), self.hnorm(h))))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, V] fp32; None when the forward fused head and loss (labels given)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, S-k, V], aligned with labels[:, k:]
    aux_loss: torch.Tensor | None = None  # sum over MoE layers of the sequence-wise balance loss (alpha not applied)
    expert_counts: torch.Tensor | None = None  # [n_moe_layers, E] tokens routed to each expert (main model, then MTP)
    hidden: torch.Tensor | None = None  # final normalised hidden states [B, S, D] (reward heads use them)
    ce: torch.Tensor | None = None  # fused next-token CE (forward with labels)
    mtp_ce: list[torch.Tensor] = field(default_factory=list)  # fused CE of MTP depth k against labels[:, k:]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = torch.float32
        has_moe = cfg.n_dense_layers < cfg.n_layers
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.dim, cfg.vocab_size)
        self.mtp = nn.ModuleList(MTPModule(cfg, moe=has_moe) for _ in range(cfg.mtp_depth))
        self.init_weights()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, init_std) for every matrix, ones for norms, zero balancing bias (TR §4.2)."""
        std = self.cfg.init_std if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                if m.weight.device.type != "meta":
                    nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, GroupedExperts):
                for p in (m.w1, m.w2, m.w3):
                    if p.device.type != "meta":
                        nn.init.normal_(p, 0.0, std)
            elif isinstance(m, Gate) and m.weight.device.type != "meta":
                nn.init.normal_(m.weight, 0.0, std)
                m.bias.zero_()
            elif isinstance(m, RMSNorm) and m.weight.device.type != "meta":
                m.weight.fill_(1.0)

    def set_compute_dtype(self, dtype: torch.dtype) -> "Transformer":
        self.compute_dtype = dtype
        return self

    def drop_mtp(self) -> "Transformer":
        self.mtp = nn.ModuleList()
        return self

    def moe_layers(self) -> list[MoE]:
        """MoE layers in a fixed order: main model first, then MTP modules."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        dev = self.embed.weight.device
        return [blk.attn.new_cache(batch, max_len, dtype or self.compute_dtype, dev) for blk in self.layers]

    # ------------------------------------------------------------------ forward
    def output_heads(self, h: torch.Tensor, emb: torch.Tensor, with_mtp: bool = True,
                     labels: torch.Tensor | None = None):
        """The tail of :meth:`forward`: final norm and head on the last hidden states ``h``,
        then the MTP depths (fed the token embeddings ``emb``). Returns (normed h, logits,
        MTP logits); with ``labels``, the head is fused with the cross-entropy
        (``head_loss.py``) and CE values [scalar] replace the logits. Uses only ``norm``,
        ``head`` and ``mtp``, so a pipeline's last stage, which holds those modules under
        the same names, calls it on itself."""

        def project(x: torch.Tensor, k: int) -> torch.Tensor:
            if labels is None:
                return self.head(x).float()
            return head_cross_entropy(x, self.head.weight, labels[:, k:])

        hn = self.norm(h)
        first = project(hn, 0)
        rest = []
        for k, mod in enumerate(self.mtp if with_mtp else (), start=1):
            if emb.shape[1] <= k:
                break
            h = mod(h[:, :-1], emb[:, k:])
            rest.append(project(mod.norm(h), k))
        return hn, first, rest

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: list[KVCache] | None = None,
                with_mtp: bool = True, labels: torch.Tensor | None = None) -> ModelOutput:
        """Logits, or with ``labels`` (training) the fused head cross-entropy in
        ``ModelOutput.ce``/``mtp_ce`` and no logits, when the head weight is a plain tensor
        (under tensor parallelism it is a DTensor and the logits path runs instead)."""
        emb = self.embed(tokens).to(self.compute_dtype)
        h = emb
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if cache is None else cache[i])
        fused = labels is not None and cache is None and not hasattr(self.head.weight, "to_local")
        hn, first, rest = self.output_heads(h, emb, with_mtp and cache is None, labels if fused else None)
        out = ModelOutput(logits=None, ce=first, mtp_ce=rest, hidden=hn) if fused else \
            ModelOutput(logits=first, mtp_logits=rest, hidden=hn)
        moes = [m for m in self.moe_layers() if m.last_counts is not None]
        if moes:
            out.expert_counts = torch.stack([m.last_counts for m in moes])
            aux = [m.last_aux_loss for m in moes if m.last_aux_loss is not None]
            out.aux_loss = torch.stack(aux).sum() if aux else None
            for m in moes:  # consumed: the next forward starts clean
                m.last_counts = m.last_aux_loss = None
        return out


# ----------------------------------------------------------------------------- counting
def count_parameters(model: Transformer) -> dict[str, int]:
    """Total, activated-per-token and MTP parameter counts from the module tree.

    Activated = everything a token touches: all dense weights plus shared experts plus
    ``n_activated_experts`` of the routed ones per MoE layer. "without embedding" drops the
    input embedding lookup (a gather, not a matmul). MTP counts exclude the shared
    embedding and head.
    """
    cfg = model.cfg
    main = {n: p for n, p in model.named_parameters() if not n.startswith("mtp.")}
    mtp = {n: p for n, p in model.named_parameters() if n.startswith("mtp.")}

    def activated(params: dict[str, nn.Parameter]) -> int:
        n = 0
        for name, p in params.items():
            if ".experts.w" in name:  # stacked routed experts: only top-k of them run
                n += p.numel() // cfg.n_routed_experts * cfg.n_activated_experts
            else:
                n += p.numel()
        return n

    total = sum(p.numel() for p in main.values())
    act = activated(main)
    emb = model.embed.weight.numel()
    return {
        "total": total,
        "activated": act,
        "activated_without_embedding": act - emb,
        "embedding": emb,
        "head": model.head.weight.numel(),
        "mtp_total": sum(p.numel() for p in mtp.values()),
        "mtp_activated": activated(mtp),
    }
