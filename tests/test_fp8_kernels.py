"""Triton kernels against the torch path, bit for bit (quantize) and within fp32 rounding (GEMM).

On a CPU machine they run under Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is imported), on small shapes because the interpreter is slow; on a CUDA machine
they run the real kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# triton is an optional extra ([gpu]); without it there is nothing of ours to test here
pytest.importorskip("triton", reason="triton not installed (optional [gpu] extra)")

from moeforge.fp8 import kernels  # noqa: E402
from moeforge.fp8.gemm import blockwise_gemm_reference  # noqa: E402
from moeforge.fp8.quant import quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("block", [(1, 128), (128, 1), (128, 128)], ids=["1x128", "128x1", "128x128"])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_kernel_bit_exact(block, pow2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 300, generator=g) * torch.rand(70, 1, generator=g) * 10
    x[4, :128] = 0.0
    ref = quantize(x, block, power_of_2=pow2)
    out = kernels.quantize(x.to(DEV), block, power_of_2=pow2)
    assert out.block == ref.block and out.data.shape == ref.data.shape
    assert torch.equal(out.scale.cpu(), ref.scale)
    assert torch.equal(out.data.cpu().float(), ref.data.float())


def test_quantize_kernel_batched_weights():
    w = torch.randn(3, 130, 200)
    ref, out = quantize(w, (128, 128)), kernels.quantize(w.to(DEV), (128, 128))
    assert torch.equal(out.scale.cpu(), ref.scale) and torch.equal(out.data.cpu().float(), ref.data.float())


@pytest.mark.parametrize("case", ["fprop", "dgrad", "wgrad"])
def test_gemm_kernel_matches_reference(case):
    g = torch.Generator().manual_seed(1)
    if case == "fprop":  # x [70, 300] 1x128, W [200, 300] 128x128
        a, b = quantize(torch.randn(70, 300, generator=g)), quantize(torch.randn(200, 300, generator=g), (128, 128))
    elif case == "dgrad":  # dy [70, 200] 1x128, W.T from the same square blocks
        a, b = quantize(torch.randn(70, 200, generator=g)), quantize(torch.randn(200, 300, generator=g), (128, 128)).t()
    else:  # dy.T [48, 150] and x.T [40, 150], both re-tiled along tokens
        a = quantize(torch.randn(150, 48, generator=g), (128, 1)).t()
        b = quantize(torch.randn(150, 40, generator=g), (128, 1)).t()
    ref = blockwise_gemm_reference(a, b)

    def dev(t):
        return type(t)(t.data.to(DEV), t.scale.to(DEV), t.block)

    out = kernels.blockwise_gemm(dev(a), dev(b), block_m=32, block_n=32).cpu()
    mag = a.dequantize().abs() @ b.dequantize().abs().t()
    assert ((out - ref).abs() <= mag * 2.0**-20).all()


def test_triton_ops_grouped_paths_match_cpu_emulation():
    """The per-expert Triton route of Fp8Ops.grouped_gemm (M- and K-grouped) agrees with the
    CPU emulation (fp32 compute) on the same quantized operands."""
    from moeforge.fp8.linear import Fp8Ops

    tri, cpu = Fp8Ops(use_triton=True), Fp8Ops(compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    counts = [40, 88]
    x = quantize(torch.randn(128, 256, generator=g))
    w = quantize(torch.randn(2, 64, 256, generator=g), (128, 128))
    m_tri = tri.grouped_gemm(x, w, counts, torch.float32)
    assert torch.allclose(m_tri, cpu.grouped_gemm(x, w, counts, torch.float32), rtol=1e-5, atol=1e-3)
    dy = quantize(torch.randn(256, 48, generator=g), (128, 1)).t()  # [48, 256], tokens padded per expert
    xt = quantize(torch.randn(256, 32, generator=g), (128, 1)).t()
    k_tri = tri.grouped_gemm(dy, xt, [128, 128], torch.float32, k_grouped=True)
    k_cpu = cpu.grouped_gemm(dy, xt, [128, 128], torch.float32, k_grouped=True)
    assert k_tri.shape == (2, 48, 32) and torch.allclose(k_tri, k_cpu, rtol=1e-5, atol=1e-3)
