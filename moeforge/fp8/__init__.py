"""Fine-grained FP8 training, applied from outside to a plain model: ``convert(model, cfg)``.

Which GEMMs go to FP8 is decided by the class of the module that owns the Linear, so the
rule reads in one place (DeepSeek-V3 TR section 3.3.1):

- FP8: every ``nn.Linear`` directly inside attention (``MLA``, ``MHA``) and SwiGLU ``MLP``
  modules (dense layers and shared experts), and the routed experts' grouped GEMMs
  (``GroupedExperts.gemm`` is swapped for :class:`Fp8GroupedGemm`). That
  includes the attention and MLP inside MTP blocks.
- Left in high precision: the embedding, the output head (``model.head``), the router
  (``Gate``), norms, the MTP projection (``MTPModule.proj``) and the attention-score math,
  none of which is an ``nn.Linear`` owned by those classes.

With ``fp8.cache_swiglu`` (default) the SwiGLU products of those MLPs and experts save
their two inputs for backward in E4M3 with 1x128 tiles (V3 TR section 3.3.2), via
``moeforge.model.recompute.swiglu``.

``fp8.recompute_swiglu_output`` (off by default) has the dense and shared MLPs' down
projection rebuild the SwiGLU output from those E4M3 inputs for its Wgrad, as V3 does,
instead of keeping an E4M3 copy of the real output (the default: 1.2x less Wgrad error
for 1 byte per element of that output; the routed experts always rebuild it).

``fp8.cache_norm_inputs`` (off by default) goes beyond V3, which keeps what feeds its
norms in high precision: under the lean recomputation those norm inputs (the residual
stream at every block's two norms, the final and MTP norms; MLA's two latents) are most of
what an FP8 step still keeps in bf16, so they bound the FP8/BF16 activation ratio (0.74x
on ``small``, 0.65x at V3's widths). With it, the residual-stream norms save their input in
E4M3 and run backward on its dequantized value (the forward is unchanged, the norm's and
its consumers' gradients approximate), and MLA rounds its latents to E4M3 where wq_a and
wkv_a leave them, in forward too (as though those GEMMs wrote FP8; the rope key stays
bf16), so that the up-projections' recomputation stays exact. The norms inside MLA are
left alone: their inputs are those latents, whose forward already uses the rounded values.
Plain tensors only: under tensor parallelism (DTensors) norms and MLA keep the ordinary
graph, and the switch changes nothing there.

Parameters are shared, not copied, so optimizers and state dicts built before or after
conversion are the same.
"""

from __future__ import annotations

from torch import nn

from moeforge.fp8.config import Fp8Config
from moeforge.fp8.gemm import blockwise_gemm, blockwise_gemm_reference, calc_diff, simulate_accumulation
from moeforge.fp8.linear import Fp8GroupedGemm, Fp8GroupedLinear, Fp8Linear, Fp8Ops
from moeforge.fp8.quant import Fp8Tensor, dequantize, fake_quantize, quantize

__all__ = [
    "Fp8Config", "Fp8GroupedGemm", "Fp8GroupedLinear", "Fp8Linear", "Fp8Ops", "Fp8Tensor", "blockwise_gemm",
    "blockwise_gemm_reference", "calc_diff", "convert", "dequantize", "fake_quantize", "quantize",
    "simulate_accumulation",
]


def _fp8_parents() -> tuple[type, ...]:
    from moeforge.model.attention import MHA, MLA
    from moeforge.model.layers import MLP
    return (MLA, MHA, MLP)


def convert(model: nn.Module, cfg: Fp8Config) -> nn.Module:
    """Swap the FP8-eligible GEMMs of ``model`` in place and return it.

    Returns the model untouched when ``cfg.enabled`` is false, so callers can apply it
    unconditionally. Idempotent: converting twice changes nothing more.
    """
    if not cfg.enabled:
        return model
    cfg.validate()
    from moeforge.model.moe import GroupedExperts

    parents = _fp8_parents()
    for module in list(model.modules()):
        if isinstance(module, parents):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(child, Fp8Linear):
                    setattr(module, name, Fp8Linear.from_linear(child, cfg))
        elif isinstance(module, GroupedExperts):
            module.gemm = Fp8GroupedGemm(cfg)
        if hasattr(module, "swiglu_fp8") and cfg.cache_swiglu:  # dense MLPs, shared and routed experts
            module.swiglu_fp8 = cfg
    if cfg.cache_norm_inputs:
        _narrow_norm_inputs(model, cfg)
    return model


def _narrow_norm_inputs(model: nn.Module, cfg: Fp8Config) -> None:
    """``fp8.cache_norm_inputs``: residual-stream norms save E4M3 inputs, MLA rounds its latents."""
    from moeforge.model.attention import MLA
    from moeforge.model.layers import RMSNorm

    latent_norms = {id(n) for m in model.modules() if isinstance(m, MLA) for n in m.modules() if isinstance(n, RMSNorm)}
    for module in model.modules():
        if isinstance(module, RMSNorm) and id(module) not in latent_norms:
            module.input_fp8 = cfg
        elif isinstance(module, MLA):
            module.latent_fp8 = cfg
