"""Small building blocks: Linear, RMSNorm, rotary embeddings with YaRN, SwiGLU MLP.

Choices:
- Master weights stay FP32; compute happens in the dtype of the activations. ``Linear``
  therefore casts its weight to the input's dtype inside forward; gradients land on the
  FP32 master in FP32. On plain tensors that goes through ``recompute.linear``, which
  keeps the master (not the cast copy) and rebuilds a norm output instead of keeping it,
  bit-identical to ``F.linear`` on the cast weight. There is no autocast: the model's
  ``compute_dtype`` decides what flows through it.
- RMSNorm computes in FP32 and returns the input dtype. It and the SwiGLU product go
  through ``recompute.py``: they save their inputs only and recompute in backward, with
  bit-identical results (DTensors keep the plain graph).
- Rotary embeddings rotate *adjacent pairs* (dims 2i, 2i+1) as DeepSeek's reference
  does with complex numbers; Hugging Face's ``rope_interleave=True`` is the same rotation
  seen through a permutation, so logits match.
- YaRN (Peng et al.) is on whenever ``rope_factor > 1``: low-frequency dimensions are
  interpolated by the factor, high-frequency ones kept, a linear ramp between
  ``beta_fast`` and ``beta_slow`` rotations; the softmax scale is multiplied by
  ``(0.1 * mscale * ln(factor) + 1)^2`` (see attention.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import ModelConfig
from moeforge.model import recompute


class Linear(nn.Linear):
    """nn.Linear without bias that computes in the input's dtype (FP32 master weight)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and recompute.is_plain(x, self.weight) and not torch.compiler.is_compiling():
            return recompute.linear(x, self.weight)  # keeps the master weight, not a bf16 copy
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.input_fp8 = None  # an Fp8Config: save x for backward in E4M3 (fp8.cache_norm_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recompute.is_plain(x, self.weight):
            return recompute.rms_norm(x, self.weight, self.eps, self.input_fp8)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)  # gate
        self.w2 = Linear(inter_dim, dim)  # down
        self.w3 = Linear(dim, inter_dim)  # up
        self.swiglu_fp8 = None  # an Fp8Config: cache the SwiGLU inputs in FP8 (set by fp8.convert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_mul(self.w1(x), self.w3(x), self.swiglu_fp8))


def silu_mul(a: torch.Tensor, b: torch.Tensor, fp8=None) -> torch.Tensor:
    """``silu(a) * b`` through the recomputing SwiGLU (plain tensors) or plain autograd."""
    return recompute.swiglu(a, b, fp8) if recompute.is_plain(a, b) else F.silu(a) * b


# ----------------------------------------------------------------------------- rotary + YaRN
def _correction_dim(n_rot: float, dim: int, base: float, max_len: int) -> float:
    """The rotary dimension index whose wavelength completes ``n_rot`` turns over max_len."""
    return dim * math.log(max_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(cfg: ModelConfig, dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies [dim // 2], YaRN-corrected when rope_factor > 1."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_factor > 1.0:
        low = math.floor(_correction_dim(cfg.beta_fast, dim, cfg.rope_theta, cfg.original_seq_len))
        high = math.ceil(_correction_dim(cfg.beta_slow, dim, cfg.rope_theta, cfg.original_seq_len))
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp  # 1: high frequency, extrapolate (keep); 0: low frequency, interpolate
        inv = inv / cfg.rope_factor * (1 - keep) + inv * keep
    return inv.float()


def yarn_softmax_mscale(cfg: ModelConfig) -> float:
    """Factor on the attention softmax scale under YaRN (1 when YaRN is off)."""
    if cfg.rope_factor <= 1.0:
        return 1.0
    m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
    return m * m


class Rotary(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_seq_len)."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.dim = dim
        self.max_seq_len = cfg.max_seq_len
        inv = rope_inv_freq(cfg, dim)
        t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
        ang = torch.outer(t, inv)  # [S, dim/2]
        # non-persistent: derived from the config, never saved in checkpoints
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def tables(self, start_pos: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [s, dim/2] (FP32) for positions start_pos .. start_pos + s - 1."""
        if start_pos + s > self.max_seq_len:
            raise ValueError(f"position {start_pos + s} exceeds model.max_seq_len={self.max_seq_len}")
        return self.cos[start_pos : start_pos + s], self.sin[start_pos : start_pos + s]

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate adjacent pairs of the last dim of x [B, S, H, dim] for positions start_pos.."""
        s = x.shape[1]
        cos, sin = self.tables(start_pos, s)
        cos, sin = cos.view(1, s, 1, -1), sin.view(1, s, 1, -1)
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)
