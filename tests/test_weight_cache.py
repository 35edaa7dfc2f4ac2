"""A parameter's bf16 / FP8 form is made once per optimizer step and never goes stale:
reused while the weights are unchanged, made again after any optimizer step (ours, torch's
fused AdamW, which bumps no version counter), a state-dict load or ``invalidate()``, and
training with the cache is bit-identical to training without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeforge.config import load_config
from moeforge.fp8.config import Fp8Config
from moeforge.fp8.linear import Fp8Ops, _quantize_used
from moeforge.model import weight_cache
from moeforge.model.expert_ffn import GroupedGemm
from moeforge.train.losses import lm_loss
from moeforge.train.optim import AdamW
from moeforge.train.pretrain import build_model


def _param(*shape, seed=0):
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def bf16(w):  # as the GEMM Functions ask: no gradient flows through the form
    with torch.no_grad():
        return weight_cache.cast(w, torch.bfloat16)


def test_cast_is_made_once_until_the_weights_change():
    p = _param(64, 32)
    a = bf16(p)
    assert a.dtype == torch.bfloat16 and torch.equal(a, p.detach().to(torch.bfloat16)) and not a.requires_grad
    assert bf16(p) is a  # reused
    with torch.no_grad():
        assert weight_cache.cast(p, torch.float32) is p  # its own dtype: no copy at all
    with torch.no_grad():
        p.add_(1.0)  # an in-place write bumps the version counter
    b = bf16(p)
    assert b is not a and torch.equal(b, p.detach().to(torch.bfloat16))


def test_a_cast_in_the_autograd_graph_is_never_cached():
    p = _param(8, 8)
    a, b = weight_cache.cast(p, torch.bfloat16), weight_cache.cast(p, torch.bfloat16)
    assert a is not b and a.requires_grad
    a.float().sum().backward()
    assert torch.equal(p.grad, torch.ones(8, 8))


def test_every_optimizer_step_invalidates():
    p = _param(16, 16)
    p.grad = torch.ones_like(p)
    ours = AdamW([("w", p)], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    fused = torch.optim.AdamW([p], lr=0.1, fused=True)
    for opt in (ours, fused):
        before = bf16(p)
        version = p._version
        opt.step()
        after = bf16(p)
        assert not torch.equal(before, after)
        assert torch.equal(after, p.detach().to(torch.bfloat16))
    assert p._version == version  # torch's fused AdamW really leaves the version alone


def test_writes_through_data_need_invalidate_and_loads_do_not():
    lin = nn.Linear(8, 8, bias=False)
    a = bf16(lin.weight)
    lin.load_state_dict({"weight": torch.zeros(8, 8)})  # copy_ under no_grad: version bump
    assert torch.equal(bf16(lin.weight), torch.zeros(8, 8, dtype=torch.bfloat16))
    lin.weight.data.copy_(torch.ones(8, 8))  # invisible to the version counter...
    assert bf16(lin.weight).sum() == 0
    weight_cache.invalidate()  # ...until told
    assert torch.equal(bf16(lin.weight), torch.ones(8, 8, dtype=torch.bfloat16))
    del a


def test_only_parameters_outside_inference_mode_are_cached():
    t = torch.randn(8, 8)
    assert bf16(t) is not bf16(t)
    p = _param(8, 8)
    with torch.inference_mode():
        x = bf16(p)
    assert x.is_inference() and bf16(p) is not x
    before = weight_cache.cached_bytes()
    q = _param(256, 256)
    bf16(q)
    assert weight_cache.cached_bytes() - before == 256 * 256 * 2
    del q  # weak keys: a dropped parameter frees its forms
    assert weight_cache.cached_bytes() == before


def test_fp8_subset_of_experts_equals_quantizing_the_subset():
    ops = Fp8Ops.for_device(Fp8Config(), torch.device("cpu"))
    w = nn.Parameter(torch.randn(6, 256, 192) * torch.logspace(-2, 2, 6).view(6, 1, 1))
    idx = torch.tensor([0, 3, 5])
    with torch.no_grad():
        got, stack = _quantize_used(ops, w, idx), ops.weight(w)
    want = ops.quantize(w.detach().index_select(0, idx), "block")
    assert torch.equal(got.data.float(), want.data.float()) and torch.equal(got.scale, want.scale)
    assert torch.equal(got.dq, want.dq)
    with torch.no_grad():
        assert _quantize_used(ops, w, torch.arange(6)) is stack  # all used: the cached stack itself


def test_stacked_form_follows_every_part():
    """The experts' stacked [W1; W3] form lives on W1 and is remade when W3 alone changes."""
    w1, w3 = _param(4, 128, 64, seed=1), _param(4, 128, 64, seed=3)
    ops = Fp8Ops.for_device(Fp8Config(), torch.device("cpu"))
    with torch.no_grad():
        a, q = GroupedGemm._form((w1, w3), torch.bfloat16), ops.weight((w1, w3))
        assert torch.equal(a, torch.cat([w1, w3], 1).to(torch.bfloat16))
        assert GroupedGemm._form((w1, w3), torch.bfloat16) is a and ops.weight((w1, w3)) is q
        w3.mul_(2.0)
        b = GroupedGemm._form((w1, w3), torch.bfloat16)
        assert b is not a and torch.equal(b[:, 128:], w3.to(torch.bfloat16)) and ops.weight((w1, w3)) is not q


@pytest.mark.parametrize("rows", [(256, 128), (128, 100), (96, 64)])
def test_stacked_fp8_blocks_equal_quantizing_the_concatenation(rows):
    """Parts filling whole 128-row blocks are quantized straight into place (the C kernels)
    and must equal quantizing the concatenated weight; other splits take that route."""
    ops = Fp8Ops.for_device(Fp8Config(), torch.device("cpu"))
    ps = tuple(torch.randn(3, r, 192) * (10.0 ** i) for i, r in enumerate(rows))
    got, want = ops._quantize_stacked(ps), ops.quantize(torch.cat(ps, 1), "block")
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(got.scale, want.scale) and torch.equal(got.dq, want.dq)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_training_with_the_cache_is_bit_identical(fp8):
    """Three AdamW steps of a small model, with gradient accumulation (two micro-batches a
    step, so forms are reused across micro-batches and must be remade after each step)."""
    def run(enabled):
        weight_cache.enabled = enabled
        try:
            cfg = load_config("tiny", {"fp8.enabled": fp8, "model.n_layers": 2, "train.progress": False})
            torch.manual_seed(0)
            model = build_model(cfg, torch.device("cpu"))
            opt = AdamW.from_config(model, cfg.train)
            g = torch.Generator().manual_seed(1)
            losses = []
            for _ in range(3):
                for _ in range(2):
                    tok = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=g)
                    loss = lm_loss(model(tok[:, :-1], labels=tok[:, 1:]), tok[:, 1:], cfg.model)["loss"]
                    (loss / 2).backward()
                    losses.append(loss.detach())
                opt.step()
                opt.zero_grad()
            return losses, model.state_dict()
        finally:
            weight_cache.enabled = True

    (la, sa), (lb, sb) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(la, lb))
    assert la[0] != la[-1]  # the weights did change between steps
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
