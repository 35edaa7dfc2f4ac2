"""FP8 training settings (the ``[fp8]`` section of a recipe).

Defaults follow DeepSeek-V3: E4M3 everywhere, 1x128 activation tiles, 128x128 weight
blocks, online (current-tensor) scales, FP32 promotion every 128 elements of K.
"""

from __future__ import annotations

from dataclasses import dataclass


from moeforge.errors import require as _require


@dataclass
class Fp8Config:
    enabled: bool = False
    block_size: int = 128  # tile width along K (activations 1xB, weights BxB)
    power_of_2_scales: bool = False  # round scales up to 2^k (the "ue8m0" format)
    backend: str = "auto"  # "auto" (triton on CUDA, emulated on CPU) | "emulated" | "triton"
    # dtype of the dequantized CPU GEMM: "auto" (bf16 where this CPU has a fast bf16 GEMM, else
    # fp32; moeforge/precision.py) | "bf16" | "fp32"
    cpu_gemm_dtype: str = "auto"
    eps: float = 1e-12  # amax floor: s = max(amax, eps) / 448 (tiny: gradients are tiny)
    cache_swiglu: bool = True  # save the SwiGLU inputs for backward in E4M3 (1x128), as V3 does
    # beyond V3 (off by default): save the inputs of the RMSNorms, i.e. the residual stream and
    # the MLA latents, in E4M3 (1x128) too; see fp8/__init__.py for what that approximates
    cache_norm_inputs: bool = False
    # V3's recomputation of the dense and shared MLPs' SwiGLU output from its E4M3 inputs for
    # the down projection's Wgrad, instead of an E4M3 copy of the real output (off: that copy
    # gave 1.2x less Wgrad error for 1 byte per element; the routed experts always recompute)
    recompute_swiglu_output: bool = False

    def validate(self) -> None:
        _require(self.block_size > 0, f"fp8.block_size must be > 0, got {self.block_size}")
        _require(self.backend in ("auto", "emulated", "triton"),
                 f"fp8.backend must be one of auto, emulated, triton; got {self.backend!r}")
        _require(self.cpu_gemm_dtype in ("auto", "bf16", "fp32"),
                 f"fp8.cpu_gemm_dtype must be 'auto', 'bf16' or 'fp32', got {self.cpu_gemm_dtype!r}")
        _require(self.eps > 0, f"fp8.eps must be > 0, got {self.eps}")
