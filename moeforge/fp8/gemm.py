"""Blockwise-scaled FP8 GEMM on CPU (reference and fast path) and an accumulation simulator.

Every GEMM here is ``C = A @ B.T`` with ``A [M, K]`` and ``B [N, K]`` both quantized along K
in tiles of the same width (128): A per ``1 x 128`` tile (activations, gradients) or
``128 x 128`` block (a transposed weight), B likewise. That one shape covers Fprop
(x @ W.T), Dgrad (dy @ W, i.e. B = W.T re-using W's square blocks) and Wgrad
(dy.T @ x, both operands re-tiled along tokens).

- :func:`blockwise_gemm_reference` is the definition: for each 128-wide K block it forms
  the product of the raw E4M3 values *exactly* (float64 holds any sum of 128 E4M3
  products without rounding: products span 2^-18..2^18, 128 of them add 7 bits, far
  below 53), rounds it once to FP32, multiplies by ``s_a * s_b`` and adds it to an FP32
  accumulator. That is DeepSeek-V3's promotion to FP32 every N_C = 128, with an ideal
  tensor core inside the block.
- :func:`blockwise_gemm` is the fast path used for training on CPU: dequantize both
  operands (``q * s``, one rounding) and run one GEMM. With ``compute_dtype=float32`` it
  equals the reference within FP32 rounding; with bf16 (~3.5x faster with AMX) the dequantized
  operands are additionally rounded to bf16 (relative 2^-9, sixteen times finer than
  E4M3's 2^-4), exact again when the scales are powers of two.
- :func:`simulate_accumulation` reproduces the report's motivation for promotion: an
  accumulator that keeps only ``mantissa_bits`` bits (about 14 on H800 FP8 tensor cores),
  with and without flushing into FP32 every ``promote_every`` elements of K.
"""

from __future__ import annotations

import torch

from moeforge.fp8.quant import Fp8Tensor


def _check(a: Fp8Tensor, b: Fp8Tensor) -> None:
    if a.data.dim() != 2 or b.data.dim() != 2:
        raise ValueError(f"blockwise GEMM takes 2-D operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"K mismatch: A is {tuple(a.shape)}, B is {tuple(b.shape)} (C = A @ B.T)")
    if a.block[1] != b.block[1]:
        raise ValueError(f"A and B must be tiled alike along K, got blocks {a.block} and {b.block}")


def blockwise_gemm(a: Fp8Tensor, b: Fp8Tensor, *, out_dtype: torch.dtype = torch.float32,
                   compute_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Fast path ``A @ B.T``: dequantize to ``compute_dtype``, one GEMM, cast to ``out_dtype``."""
    _check(a, b)
    return (a.dequantize(compute_dtype) @ b.dequantize(compute_dtype).t()).to(out_dtype)


def _row_scales(x: Fp8Tensor) -> torch.Tensor:
    """Scales expanded to one row per row of ``x``: ``[rows, K_blocks]``."""
    return x.scale.repeat_interleave(x.block[0], dim=0)[: x.shape[0]]


def blockwise_gemm_reference(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    """Reference ``A @ B.T`` in FP32: exact per-K-block products, promoted to FP32 per block."""
    _check(a, b)
    bk = a.block[1]
    m, k = a.shape
    n = b.shape[0]
    sa, sb = _row_scales(a), _row_scales(b)
    qa, qb = a.data.double(), b.data.double()
    acc = torch.zeros(m, n, dtype=torch.float32)
    for j, k0 in enumerate(range(0, k, bk)):  # a reference: clarity over speed
        exact = qa[:, k0:k0 + bk] @ qb[:, k0:k0 + bk].t()  # exact in float64
        acc += exact.float() * (sa[:, j, None] * sb[None, :, j])
    return acc


def round_mantissa(x: torch.Tensor, bits: int, mode: str = "truncate") -> torch.Tensor:
    """Keep ``bits`` fraction bits of FP32 ``x`` (FP32 itself has 23). ``truncate`` rounds
    toward zero, as an adder that drops the bits shifted out by exponent alignment;
    ``nearest`` rounds to nearest, ties to even."""
    frac, exp = torch.frexp(x)  # x = frac * 2**exp, |frac| in [0.5, 1)
    step = float(2 ** (bits + 1))  # leading bit + `bits` fraction bits
    frac = frac * step
    frac = torch.trunc(frac) if mode == "truncate" else torch.round(frac)
    return torch.ldexp(frac / step, exp)


def simulate_accumulation(a: torch.Tensor, b: torch.Tensor, *, mantissa_bits: int = 14,
                          promote_every: int | None = None, mode: str = "truncate") -> torch.Tensor:
    """``A @ B.T`` summed one K element at a time in an accumulator of ``mantissa_bits``
    fraction bits. With ``promote_every = N_C`` the limited accumulator is added into an
    FP32 one and restarted every N_C elements (DeepSeek-V3's fix). Products are formed in
    FP32 (exact for E4M3 inputs)."""
    a, b = a.float(), b.float()
    acc32 = torch.zeros(a.shape[0], b.shape[0])
    acc = torch.zeros_like(acc32)
    for k in range(a.shape[1]):
        acc = round_mantissa(acc + a[:, k, None] * b[None, :, k], mantissa_bits, mode)
        if promote_every and (k + 1) % promote_every == 0:
            acc32 += acc
            acc.zero_()
    return acc32 + acc


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity error ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64 (0 = equal)."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom)
