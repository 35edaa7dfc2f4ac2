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
    return model
