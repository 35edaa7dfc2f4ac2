"""The experts' SwiGLU C kernel against an FP64 reference and the torch path: forward,
the fused backward (recomputed h, routing-weight gradient, da, db), extreme inputs (the
sigmoid must not overflow), and the expert FFN's gradients with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeforge.model import swiglu_kernel
from moeforge.model.expert_ffn import GroupedGemm, expert_ffn

pytestmark = pytest.mark.skipif(swiglu_kernel.KERNEL.get() is None, reason="no C compiler: torch path only")


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _inputs(n, d, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, d, generator=g) * scale).bfloat16()
    b, dy = torch.randn(n, d, generator=g).bfloat16(), torch.randn(n, d, generator=g).bfloat16()
    gate = torch.rand(n, 1, generator=g).bfloat16()
    return a, b, dy, gate


def _reference(a, b, g, gate):  # FP64, from the bf16 inputs
    a, b, g, t = a.double(), b.double(), g.double(), gate.double()
    s = torch.sigmoid(a)
    h = a * s * b
    dh = g * t
    return h, (g * h).sum(-1), dh * b * s * (1 + a * (1 - s)), dh * a * s


def _torch_path(a, b, g, gate):  # what expert_ffn.py runs without the kernel
    silu_a = F.silu(a)
    h = silu_a * b
    dh = g * gate
    return h, (g.float() * h.float()).sum(-1), torch.ops.aten.silu_backward(dh * b, a), dh * silu_a


@pytest.mark.parametrize("n,d,scale", [(257, 256, 3.0), (5, 24, 1.0), (64, 130, 30.0)])
def test_backward_matches_fp64_like_the_torch_path(n, d, scale):
    a, b, g, gate = _inputs(n, d, n + d, scale)
    ab = torch.cat([a, b], 1)  # the fused gate/up GEMM's layout
    h, dgate, dab = swiglu_kernel.backward(ab, g, gate, need_gate=True)
    assert dab.shape == ab.shape
    got = (h, dgate, dab[:, :d], dab[:, d:])
    torch_path = _torch_path(a, b, g, gate)
    ref = _reference(a, b, g, gate)
    for name, k, t, r in zip(("h", "dgate", "da", "db"), got, torch_path, ref):
        assert k.shape == t.shape and k.dtype == t.dtype, name
        assert torch.isfinite(k).all(), name
        assert _rel(k, r) <= 1.1 * _rel(t, r) + 1e-4, (name, _rel(k, r), _rel(t, r))
    assert torch.equal(swiglu_kernel.forward(ab), got[0])  # forward and recompute: the same bits
    assert swiglu_kernel.backward(ab, g, gate, need_gate=False)[1] is None


def test_extreme_inputs_stay_finite():
    a = torch.tensor([[-1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 1e4]]).bfloat16()
    b, g, gate = torch.ones_like(a), torch.ones_like(a), torch.ones(1, 1).bfloat16()
    h, _, dab = swiglu_kernel.backward(torch.cat([a, b], 1), g, gate, need_gate=True)
    da, db = dab.chunk(2, 1)
    ref_h, _, ref_da, _ = _reference(a, b, g, gate)
    assert torch.isfinite(h).all() and torch.isfinite(da).all() and torch.isfinite(db).all()
    assert torch.allclose(h.double(), ref_h, rtol=1e-2, atol=1e-30)
    assert torch.allclose(da.double(), ref_da, rtol=1e-2, atol=1e-6)


def test_not_applicable_falls_back():
    a = torch.randn(4, 8)
    assert swiglu_kernel.forward(a) is None  # FP32
    with swiglu_kernel.KERNEL.disabled():
        assert swiglu_kernel.forward(a.bfloat16()) is None


def test_expert_ffn_gradients_with_and_without_the_kernel():
    torch.manual_seed(0)
    e, d, f = 4, 64, 48
    counts = [30, 0, 17, 45]
    x = torch.randn(sum(counts), d).bfloat16()
    gate = torch.rand(sum(counts))
    ws = [torch.randn(e, f, d) * 0.1, torch.randn(e, d, f) * 0.1, torch.randn(e, f, d) * 0.1]
    dout = torch.randn(sum(counts), d).bfloat16()

    def run():
        ins = [t.clone().requires_grad_() for t in (x, gate, *ws)]
        out = expert_ffn(*ins, counts, [32, 0, 32, 48], GroupedGemm())
        out.backward(dout)
        return [out.detach()] + [t.grad for t in ins]

    got = run()
    with swiglu_kernel.KERNEL.disabled():
        want = run()
    for i, (k, t) in enumerate(zip(got, want)):
        assert (k.float() - t.float()).norm() <= 0.01 * t.float().norm(), i
