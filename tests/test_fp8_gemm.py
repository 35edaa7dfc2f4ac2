"""Blockwise FP8 GEMM: reference vs fp32 product, fast paths vs reference, accumulation simulator."""

import pytest
import torch

from moeforge.fp8.gemm import (blockwise_gemm, blockwise_gemm_reference, calc_diff, round_mantissa,
                               simulate_accumulation)
from moeforge.fp8.quant import quantize


def operands(m=96, n=160, k=400, outliers=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    if outliers:
        a[:, [3, 200, 333]] *= 100.0
    return a, b


@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
def test_blockwise_close_to_fp32(outliers):
    a, b = operands(outliers=outliers)
    qa, qb = quantize(a, (1, 128)), quantize(b, (128, 128))
    exact = a.double() @ b.double().t()
    out = blockwise_gemm_reference(qa, qb)
    assert calc_diff(out, exact) < 1e-3
    # elementwise E4M3 bound: each operand within 2^-4 relative (plus the subnormal floor),
    # so |err| <= sum_k |a||b| * (2 * 2^-4 + 2^-8) + a small absolute term
    bound = (a.abs().double() @ b.abs().double().t()) * (2 * 2.0**-4 + 2.0**-8) + 1e-3
    assert ((out.double() - exact).abs() <= bound).all()
    if outliers:  # one scale for the whole tensor: E4M3's exponent absorbs most of a 100x
        per_tensor = quantize(a, tuple(a.shape)).dequantize() @ quantize(b, tuple(b.shape)).dequantize().t()
        assert calc_diff(per_tensor, exact) > 1.3 * calc_diff(out, exact)


def test_per_tensor_breaks_beyond_e4m3_range():
    """Channels 1e5x larger whose weights are 1e5x smaller (so every channel matters): a
    per-tensor scale pushes the ordinary channels below E4M3's smallest subnormal."""
    a, b = operands(m=64, n=64, k=512)
    cols = [5, 77, 300, 450]
    a[:, cols] *= 1e5
    b[:, cols] /= 1e5
    exact = a.double() @ b.double().t()
    blockwise = blockwise_gemm_reference(quantize(a, (1, 128)), quantize(b, (128, 128)))
    per_tensor = quantize(a, tuple(a.shape)).dequantize() @ quantize(b, tuple(b.shape)).dequantize().t()
    assert calc_diff(blockwise, exact) < 1e-2
    assert calc_diff(per_tensor, exact) > 5 * calc_diff(blockwise, exact)


def test_fast_fp32_equals_reference_within_fp32_rounding():
    a, b = operands(k=1000, outliers=True)
    qa, qb = quantize(a, (1, 128)), quantize(b, (128, 128))
    ref = blockwise_gemm_reference(qa, qb)
    fast = blockwise_gemm(qa, qb, compute_dtype=torch.float32)
    mag = qa.dequantize().abs() @ qb.dequantize().abs().t()  # scale of the rounding errors
    assert ((fast - ref).abs() <= mag * 2.0**-20).all()


@pytest.mark.parametrize("pow2", [False, True])
def test_fast_bf16_close_to_reference(pow2):
    a, b = operands(k=640)
    qa, qb = quantize(a, (1, 128), power_of_2=pow2), quantize(b, (128, 128), power_of_2=pow2)
    ref = blockwise_gemm_reference(qa, qb)
    fast = blockwise_gemm(qa, qb, compute_dtype=torch.bfloat16, out_dtype=torch.float32)
    mag = qa.dequantize().abs() @ qb.dequantize().abs().t()
    # bf16 operand rounding (2^-9 each, none at all with power-of-2 scales) plus the bf16 output
    tol = mag * (2.0**-20 if pow2 else 2 * 2.0**-9) + ref.abs() * 2.0**-8
    assert ((fast - ref).abs() <= tol).all()


def test_both_operands_row_tiled_and_partial_k():
    """Wgrad shape: both operands 1x128 along K (tokens), K = 300 not a multiple of 128."""
    a, b = operands(m=64, n=48, k=300)
    qa, qb = quantize(a, (1, 128)), quantize(b, (1, 128))
    ref = blockwise_gemm_reference(qa, qb)
    assert torch.allclose(blockwise_gemm(qa, qb, compute_dtype=torch.float32), ref, rtol=1e-5, atol=1e-4)
    assert calc_diff(ref, a @ b.t()) < 1e-3
    with pytest.raises(ValueError, match="tiled alike"):
        blockwise_gemm_reference(qa, quantize(b, (128, 1)))


def test_round_mantissa():
    x = torch.tensor([1.0 + 2.0**-10 + 2.0**-12, -3.0, 0.0, 1.0 + 3 * 2.0**-11])
    assert round_mantissa(x, 10, "truncate").tolist() == [1.0 + 2.0**-10, -3.0, 0.0, 1.0 + 2.0**-10]
    assert round_mantissa(x, 10, "nearest").tolist() == [1.0 + 2.0**-10, -3.0, 0.0, 1.0 + 2 * 2.0**-10]
    assert torch.equal(round_mantissa(x, 23), x)


def test_promotion_shrinks_accumulation_error():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 2048, generator=g), torch.randn(16, 2048, generator=g)
    exact = a.double() @ b.double().t()

    def err(c):
        return float((c.double() - exact).abs().max() / exact.abs().max())

    limited = err(simulate_accumulation(a, b, mantissa_bits=14))
    promoted = err(simulate_accumulation(a, b, mantissa_bits=14, promote_every=128))
    full = err(simulate_accumulation(a, b, mantissa_bits=23))
    assert limited > 5e-3  # about 2.5% at this K: a real loss of accuracy
    assert promoted < limited / 8
    assert full < 1e-5


def test_calc_diff():
    x = torch.randn(100)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert calc_diff(x, -x) == pytest.approx(2.0)
