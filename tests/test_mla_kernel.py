"""MLA's q/k/v layout kernel: forward bit-identical to the torch path (rotary embedding,
concatenations, pad, transposes), gradients at least as close to an FP64 reference as
autograd through that path, for padded and unpadded V, with and without the query
LoRA, at a position offset; and the fallback where it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from moeforge.config import load_config
from moeforge.model import mla_kernel
from moeforge.model.attention import MLA

pytestmark = pytest.mark.skipif(mla_kernel.KERNEL.get() is None, reason="no C compiler: torch path only")

CASES = {
    "small": {},  # q LoRA, V (64) padded to q/k's 96
    "no-q-lora": {"model.q_lora_rank": 0},
    "wide-v": {"model.v_head_dim": 128},  # V wider than q/k: no padding
}


def _module(overrides, seed=0):
    cfg = load_config("small", overrides).model
    torch.manual_seed(seed)
    m = MLA(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


def _run(m, q_src, kv_src, start_pos, dtype, kernel=True):
    m = copy.deepcopy(m).to(torch.float64) if dtype == torch.float64 else m
    qs = q_src.detach().to(dtype).requires_grad_()
    ks = kv_src.detach().to(dtype).requires_grad_()
    m.zero_grad(set_to_none=True)
    if kernel:
        q, k, v = m._qkv(qs, ks, start_pos)
    else:
        with mla_kernel.KERNEL.disabled():
            q, k, v = m._qkv(qs, ks, start_pos)
    g = torch.Generator().manual_seed(1)
    sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum() for t in (q, k, v)).backward()
    grads = [qs.grad, ks.grad] + [p.grad for _, p in sorted(m.named_parameters()) if p.grad is not None]
    return (q, k, v), grads


@pytest.mark.parametrize("case", list(CASES))
def test_forward_bit_identical_and_gradients_as_accurate(case):
    m = _module(CASES[case])
    x = torch.randn(2, 40, m.wkv_a.weight.shape[1]).bfloat16()
    with torch.no_grad():
        q_src = x if m.q_lora_rank == 0 else m.wq_a(x)
        kv_src = m.wkv_a(x)
    assert mla_kernel.applies(m.rope, q_src, kv_src)
    (q, k, v), got = _run(m, q_src, kv_src, 5, torch.bfloat16)
    (q0, k0, v0), torch_path = _run(m, q_src, kv_src, 5, torch.bfloat16, kernel=False)
    _, ref = _run(m, q_src, kv_src, 5, torch.float64)
    for a, b in zip((q, k, v), (q0, k0, v0)):
        assert a.is_contiguous() and a.shape == b.shape and torch.equal(a, b)
    assert len(got) == len(torch_path) == len(ref)
    for i, (g, t, r) in enumerate(zip(got, torch_path, ref)):
        err = ((g.double() - r).norm() / r.norm()).item()
        err_torch = ((t.double() - r).norm() / r.norm()).item()
        assert err <= 1.1 * err_torch + 1e-4, (i, err, err_torch)


def test_not_applicable():
    t = torch.randn(2, 4, 8)
    assert not mla_kernel.applies(32, t, t)  # FP32
    assert not mla_kernel.applies(33, t.bfloat16())  # odd rope width
    with mla_kernel.KERNEL.disabled():
        assert not mla_kernel.applies(32, t.bfloat16())
