"""Attention: Multi-head Latent Attention (MLA) and plain multi-head / grouped-query attention.

Choices:
- MLA as in DeepSeek-V2/V3: queries optionally through a low-rank bottleneck
  (``q_lora_rank``; 0 projects directly), keys and values through one joint latent of
  ``kv_lora_rank`` with RMSNorm on it, plus a decoupled RoPE key of ``qk_rope_head_dim``
  shared by all heads. Head dims for nope / rope / value are separate.
- Training and prefill without a cache materialise per-head K/V and call
  ``scaled_dot_product_attention`` (causal), which is what the CPU kernels are fast at.
  Training on CPU keeps only the two latents, the output and the log-sum-exp for
  backward and rebuilds q, k, v there (``recompute.recomputed_attention``, V3's MLA
  up-projection recomputation); wo, wq_a and wkv_a are outside that region.
- Decoding with a cache stores only the normalised latent and the rotated rope key per
  token (kv_lora_rank + qk_rope_head_dim numbers, not 2 * heads * head_dim) and uses the
  "absorbed" form: the key up-projection is folded into the query and the value
  up-projection applied after attention, so K/V are never rebuilt for past tokens.
- MHA/GQA is the same interface with a conventional K/V cache.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import ModelConfig
from moeforge.model import mla_kernel, recompute
from moeforge.model.layers import Linear, RMSNorm, Rotary, yarn_softmax_mscale


class KVCache:
    """Per-layer decode cache. For MLA: latent [B, L, kv_lora_rank] and rope key [B, L, rope_dim]."""

    def __init__(self, *shapes: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None):
        self.tensors = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]

    def write(self, start_pos: int, *values: torch.Tensor) -> list[torch.Tensor]:
        """Store values at positions [start_pos, start_pos + S) and return everything up to there."""
        end = start_pos + values[0].shape[1]
        out = []
        for buf, v in zip(self.tensors, values):
            buf[: v.shape[0], start_pos:end] = v.to(buf.dtype)
            out.append(buf[: v.shape[0], :end])
        return out

    def nbytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors)


def _causal_mask(s: int, total: int, device) -> torch.Tensor:
    """Boolean [s, total] mask for queries at positions total-s.. attending keys 0..total-1."""
    q = torch.arange(total - s, total, device=device).unsqueeze(1)
    k = torch.arange(total, device=device).unsqueeze(0)
    return k <= q


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        if self.q_lora_rank == 0:
            self.wq = Linear(cfg.dim, self.n_heads * qk)
        else:
            self.wq_a = Linear(cfg.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * qk)
        self.wkv_a = Linear(cfg.dim, self.kv_lora_rank + self.rope)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.vdim))
        self.wo = Linear(self.n_heads * self.vdim, cfg.dim)
        self.rotary = Rotary(cfg, self.rope)
        self.softmax_scale = qk**-0.5 * yarn_softmax_mscale(cfg)
        self.recompute_up_proj = True  # train.recompute_attention
        self.latent_fp8 = None  # an Fp8Config: latents rounded to E4M3, saved so (fp8.cache_norm_inputs)

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32, device=None) -> KVCache:
        return KVCache((batch, max_len, self.kv_lora_rank), (batch, max_len, self.rope), dtype=dtype, device=device)

    def _queries(self, q_src: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q_src is x (no q_lora) or the query latent before its norm -> (q_nope, rotated q_pe)."""
        b, s, _ = q_src.shape
        q = self.wq(q_src) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(q_src))
        q = q.view(b, s, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        return q_nope, self.rotary(q_pe, start_pos)

    def _latent(self, kv_src: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_a's output -> (normalised KV latent [B, S, C], rotated rope key [B, S, R])."""
        kv, k_pe = kv_src.split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_norm(kv), self.rotary(k_pe.unsqueeze(2), start_pos).squeeze(2)  # one key for all heads

    def _qkv(self, q_src: torch.Tensor, kv_src: torch.Tensor, start_pos: int = 0):
        """Per-head q, k, v [B, H, S, nope + rope], V zero-padded to that width: CPU's fused
        SDPA wants equal head dims (else a 2x slower path)."""
        b, s, _ = q_src.shape
        if mla_kernel.applies(self.rope, q_src, kv_src):  # one C pass each way (mla_kernel.py)
            q_lin = self.wq(q_src) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(q_src))
            kv, k_pe = kv_src.split([self.kv_lora_rank, self.rope], dim=-1)
            return mla_kernel.qkv(q_lin, self.wkv_b(self.kv_norm(kv)), k_pe, *self.rotary.tables(start_pos, s),
                                  self.n_heads, self.nope, self.rope, self.vdim)
        q_nope, q_pe = self._queries(q_src, start_pos)
        kv, k_pe = self._latent(kv_src, start_pos)
        k_nope, v = self.wkv_b(kv).view(b, s, self.n_heads, self.nope + self.vdim).split([self.nope, self.vdim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, s, self.n_heads, self.rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.vdim < self.nope + self.rope:
            v = F.pad(v, (0, self.nope + self.rope - self.vdim))
        return q, k, v

    def _recompute_ok(self, *ts: torch.Tensor) -> bool:
        """Training on CPU with plain tensors, not under torch.compile: rebuild q, k, v in backward."""
        return (self.recompute_up_proj and torch.is_grad_enabled() and ts[0].device.type == "cpu"
                and not torch.compiler.is_compiling() and recompute.is_plain(*ts, *self.parameters()))

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q_src = x if self.q_lora_rank == 0 else self.wq_a(x)
        kv_src = self.wkv_a(x)
        stored = None
        if self.latent_fp8 is not None and recompute.is_plain(q_src, kv_src):  # every path: one function
            q_src, kv_src, stored = recompute.rounded_latents(q_src, kv_src, self.kv_lora_rank,
                                                              self.q_lora_rank > 0, self.latent_fp8)
        if cache is None:
            if self._recompute_ok(q_src, kv_src):
                q_mods = (self.wq,) if self.q_lora_rank == 0 else (self.q_norm, self.wq_b)
                params = [p for m in (*q_mods, self.kv_norm, self.wkv_b) for p in m.parameters() if p.requires_grad]
                o = recompute.recomputed_attention(partial(self._qkv, start_pos=start_pos), q_src, kv_src, params,
                                                   self.softmax_scale, self.vdim, stored)
            else:
                q, k, v = self._qkv(q_src, kv_src, start_pos)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
                o = o[..., : self.vdim].transpose(1, 2)
            return self.wo(o.reshape(b, s, -1))
        q_nope, q_pe = self._queries(q_src, start_pos)
        kv, k_pe = self._latent(kv_src, start_pos)
        # --- decoding: absorbed form over the latent cache
        lat, pe = cache.write(start_pos, kv, k_pe)  # [B, T, C], [B, T, R]
        w = self.wkv_b.weight.to(x.dtype).view(self.n_heads, self.nope + self.vdim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, C], [H, v, C]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        lat, pe = lat.to(x.dtype), pe.to(x.dtype)
        scores = (torch.einsum("bshc,btc->bsht", q_lat, lat) + torch.einsum("bshr,btr->bsht", q_pe, pe)).float()
        scores = scores * self.softmax_scale
        mask = _causal_mask(s, lat.shape[1], x.device).view(1, s, 1, -1)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(x.dtype)
        o_lat = torch.einsum("bsht,btc->bshc", probs, lat)
        o = torch.einsum("bshc,hdc->bshd", o_lat, w_uv)
        return self.wo(o.reshape(b, s, -1))


class MHA(nn.Module):
    """Multi-head attention; grouped-query when n_kv_heads < n_heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.hd = cfg.head_dim or cfg.dim // cfg.n_heads
        self.wq = Linear(cfg.dim, self.n_heads * self.hd)
        self.wk = Linear(cfg.dim, self.n_kv * self.hd)
        self.wv = Linear(cfg.dim, self.n_kv * self.hd)
        self.wo = Linear(self.n_heads * self.hd, cfg.dim)
        self.rotary = Rotary(cfg, self.hd)
        self.softmax_scale = self.hd**-0.5 * yarn_softmax_mscale(cfg)

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32, device=None) -> KVCache:
        shape = (batch, max_len, self.n_kv, self.hd)
        return KVCache(shape, shape, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.rotary(self.wq(x).view(b, s, self.n_heads, self.hd), start_pos)
        k = self.rotary(self.wk(x).view(b, s, self.n_kv, self.hd), start_pos)
        v = self.wv(x).view(b, s, self.n_kv, self.hd)
        if cache is not None:
            k, v = (t.to(x.dtype) for t in cache.write(start_pos, k, v))
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None or s == k.shape[2]:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            mask = _causal_mask(s, k.shape[2], x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attn_type == "mla" else MHA(cfg)
