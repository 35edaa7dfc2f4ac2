"""The C quantize/dequantize kernels produce bit-for-bit the torch path's numbers.

The torch path in ``moeforge/fp8/quant.py`` is itself checked against a NumPy
transcription of the convention (test_fp8_quant.py); here every output of the C kernels
(E4M3 bits, FP32 scales, the fused dequantized operand) is compared with it exactly, on
inputs built to hit the edges: partial tiles, batch dimensions, outlier channels, values
landing in E4M3's subnormal range, all-zero tiles, NaN and inf, power-of-2 scales, and
the multi-threaded split.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from moeforge.fp8 import cpu_kernels
from moeforge.fp8.quant import Fp8Tensor, dequantize, quantize, quantize_many

pytestmark = pytest.mark.skipif(os.environ.get("MOEFORGE_FP8_CPU_KERNELS") == "0",
                                reason="C kernels switched off by MOEFORGE_FP8_CPU_KERNELS=0")

BLOCKS = [(1, 128), (128, 1), (128, 128), (1, 32)]


def _nasty(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    # magnitudes spread over 2^-30..2^10 so that, divided by a tile's scale, many values
    # fall into E4M3's subnormals (and some round to zero)
    x = x * torch.exp2(torch.randint(-30, 10, shape, generator=g).float())
    x[..., 3 % shape[-1]] *= 100.0  # an outlier channel
    x[..., :1, 130:260] = 0.0  # zero tiles (where the shape has them)
    return x.to(dtype)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.contiguous().view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_library_builds_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc"):
        assert cpu_kernels.library() is not None
    with cpu_kernels.disabled():
        assert not cpu_kernels.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (3, 130, 257), (5, 1)])
@pytest.mark.parametrize("power_of_2", [False, True], ids=["fp32scale", "pow2"])
def test_quantize_bit_identical_to_torch_path(dtype, block, shape, power_of_2):
    assert cpu_kernels.available()
    x = _nasty(shape, dtype)
    got = quantize(x, block, power_of_2=power_of_2, dq_dtype=torch.bfloat16)
    with cpu_kernels.disabled():
        ref = quantize(x, block, power_of_2=power_of_2)
        ref_dq16 = dequantize(ref, torch.bfloat16)
    assert got.dq is not None and ref.dq is None
    _same(_bits(got.data), _bits(ref.data))
    _same(got.scale, ref.scale)
    _same(got.dq, ref_dq16)
    _same(dequantize(Fp8Tensor(got.data, got.scale, block), torch.float32), _torch_dequant(ref, torch.float32))


def _torch_dequant(q: Fp8Tensor, dtype: torch.dtype) -> torch.Tensor:
    with cpu_kernels.disabled():
        return dequantize(q, dtype)


def test_non_finite_tiles_match():
    x = _nasty((4, 256), torch.float32)
    x[0, 5] = float("nan")
    x[1, 200] = float("inf")
    x[2, 7] = -float("inf")
    got = quantize(x, (1, 128), dq_dtype=torch.float32)
    with cpu_kernels.disabled():
        ref = quantize(x, (1, 128))
    _same(got.scale, ref.scale)
    assert got.scale[0, 0].isnan() and got.scale[1, 1].isinf()
    _same(_bits(got.data), _bits(ref.data))
    # E4M3's NaN code decodes to NaN here and to +-480 * s (= inf) on the torch path: both
    # non-finite, as quant.py documents; every finite value is identical
    ref_dq = _torch_dequant(ref, torch.float32)
    finite = ref_dq.isfinite()
    assert torch.equal(finite, got.dq.isfinite()) and not finite.all()
    _same(got.dq[finite], ref_dq[finite])


def _e4m3_midpoint_inputs(amax: float) -> torch.Tensor:
    """FP32 rows of 128 whose values, divided by their tile's scale (amax / 448, amax being
    the first element), land on E4M3 rounding midpoints, 0-3 FP32 ulps either side of them:
    where a quotient off by one ulp would round the other way."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (codes[:-1] + codes[1:]) / 2  # includes 2^-10 (the smallest) and the subnormal/normal edge
    s = torch.tensor(amax, dtype=torch.float32) / 448.0
    vals = []
    for k in range(-3, 4):
        x = mid * s
        for _ in range(abs(k)):
            x = torch.nextafter(x, torch.full_like(x, float("inf") if k > 0 else 0.0))
        vals.append(x)
    v = torch.cat(vals)
    v = torch.cat([v, -v, torch.tensor([0.0, -0.0, 1e-30, -1e-38, 2.0 ** -140])])
    n = -(-v.numel() // 127) * 127
    v = torch.cat([v, torch.zeros(n - v.numel())]).view(-1, 127)
    return torch.cat([torch.full((v.shape[0], 1), amax), v], dim=1)  # each row: one 1x128 tile


@pytest.mark.parametrize("amax", [1344.0, 1478.4, 0.0123, 3.0e-5], ids=lambda a: f"amax{a:g}")
def test_rounding_edges_match_the_division(amax):
    """The C fast path divides by multiplying with 1/s plus two FMA corrections; at E4M3's
    rounding midpoints (and for -0, underflowing values) it must give the division's bits."""
    x = _e4m3_midpoint_inputs(amax)
    for dq_dtype in (torch.float32, torch.bfloat16):
        got = quantize(x, (1, 128), dq_dtype=dq_dtype)
        with cpu_kernels.disabled():
            ref = quantize(x, (1, 128))
        _same(got.scale, ref.scale)
        _same(_bits(got.data), _bits(ref.data))
        _same(got.dq, _torch_dequant(ref, dq_dtype))
    assert (_bits(got.data) == 0x80).any(), "a negative zero keeps its sign"


def test_wide_random_inputs_match():
    """Two million values over 60 binades: no rare misrounding of the fast path."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2048, 1024, generator=g) * torch.exp2(torch.randint(-30, 30, (2048, 1), generator=g).float())
    x = x * torch.exp2(torch.randint(-12, 1, (2048, 1024), generator=g).float())
    got = quantize(x, (1, 128), dq_dtype=torch.float32)
    with cpu_kernels.disabled():
        ref = quantize(x, (1, 128))
    _same(_bits(got.data), _bits(ref.data))
    _same(got.dq, _torch_dequant(ref, torch.float32))


def test_threads_split_gives_the_same_result():
    x = _nasty((1024, 640), torch.bfloat16, seed=3)  # above the single-thread size limit
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize_many(x, ((1, 128), (128, 1)), dq_dtype=torch.bfloat16)
        torch.set_num_threads(2)
        two = quantize_many(x, ((1, 128), (128, 1)), dq_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        _same(_bits(a.data), _bits(b.data))
        _same(a.scale, b.scale)
        _same(a.dq, b.dq)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (2, 130, 257)])
@pytest.mark.parametrize("power_of_2", [False, True], ids=["fp32scale", "pow2"])
def test_one_pass_retile_equals_dequantize_then_quantize(shape, power_of_2):
    """The Wgrad re-tiling (1x128 E4M3 -> 128x1) in one C pass gives the bits of the torch
    path's two steps: dequantize to FP32, quantize again."""
    from moeforge.fp8.config import Fp8Config
    from moeforge.fp8.linear import Fp8Ops

    ops = Fp8Ops.for_device(Fp8Config(power_of_2_scales=power_of_2), torch.device("cpu"))
    xq = quantize(_nasty(shape, torch.bfloat16, seed=5), (1, 128), power_of_2=power_of_2)
    got = ops.retile(xq, "col")
    with cpu_kernels.disabled():
        ref = quantize(_torch_dequant(xq, torch.float32), (128, 1), power_of_2=power_of_2)
        ref_dq = dequantize(ref, ops.compute_dtype)  # the GEMM dtype fp8.cpu_gemm_dtype="auto" chose here
    assert got.block == (128, 1)
    _same(_bits(got.data), _bits(ref.data))
    _same(got.scale, ref.scale)
    _same(got.dq, ref_dq)


def test_transposed_and_batched_dequantize():
    w = _nasty((4, 256, 384), torch.float32)
    wq = quantize(w, (128, 128))
    wt = wq.t()  # a view: the kernels dequantize its transpose and transpose back
    _same(dequantize(wt, torch.bfloat16), _torch_dequant(wt, torch.bfloat16))
    assert dequantize(wt, torch.float32).shape == (4, 384, 256)


def test_fused_operand_is_used_once_and_not_saved():
    """The GEMM operand written in the quantize pass is what dequantize returns (no
    second pass), but Fp8Linear saves only the E4M3 data and scales for backward (and
    the master weight itself, quantized again there)."""
    from moeforge.fp8.config import Fp8Config
    from moeforge.fp8.linear import Fp8Linear

    x = torch.randn(64, 256, dtype=torch.bfloat16)
    q = quantize(x, (1, 128), dq_dtype=torch.bfloat16)
    assert dequantize(q, torch.bfloat16) is q.dq
    lin = Fp8Linear(256, 128, cfg=Fp8Config(enabled=True))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x.requires_grad_())
    acts = [t for t in saved if t is not lin.weight]
    assert sorted(str(t.dtype) for t in acts) == ["torch.float32", "torch.float8_e4m3fn"]
    assert len(acts) == len(saved) - 1
