"""Fp8Linear and the FP8 grouped-expert GEMM against fp32 autograd; convert() on the real model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeforge import fp8
from moeforge.config import ModelConfig
from moeforge.fp8 import Fp8Config, Fp8GroupedGemm, Fp8GroupedLinear, Fp8Linear, calc_diff, quantize
from moeforge.fp8.linear import Fp8Ops
from moeforge.model.transformer import Transformer

CFG = Fp8Config(enabled=True)
CFG32 = Fp8Config(enabled=True, cpu_gemm_dtype="fp32")


def fp32_grads(x, w, dy):
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x @ w.transpose(-2, -1)).backward(dy.double())
    return x.grad, w.grad


def saved_tensors(fn):
    """Every tensor autograd saves while ``fn`` runs (via saved_tensors_hooks)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_fp32_autograd(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(300, 200, bias=False)  # sizes not multiples of 128
    f = Fp8Linear.from_linear(lin, CFG)
    assert f.weight is lin.weight
    x = torch.randn(2, 70, 300, dtype=dtype, requires_grad=True)
    y, saved = saved_tensors(lambda: f(x))
    assert y.dtype == dtype and y.shape == (2, 70, 200)
    # what waits for backward is x in FP8 plus FP32 scales and the master weight itself
    # (quantized again in backward), never a bf16/fp32 copy of x or a copy of W
    acts = [t for t in saved if not isinstance(t, nn.Parameter)]
    assert {t.dtype for t in acts} == {torch.float8_e4m3fn, torch.float32}
    assert all(t.numel() * 4 <= x.numel() for t in acts if t.dtype == torch.float32)
    assert [t for t in saved if isinstance(t, nn.Parameter)] == [lin.weight]
    dy = torch.randn_like(y)
    y.backward(dy)
    gx, gw = fp32_grads(x, lin.weight, dy)
    assert x.grad.dtype == dtype and lin.weight.grad.dtype == torch.float32
    assert calc_diff(y, x.double() @ lin.weight.double().t()) < 1e-3
    assert calc_diff(x.grad, gx) < 1e-3
    assert calc_diff(lin.weight.grad, gw) < 2e-3  # Wgrad: x is quantized twice (1x128, then 128x1)
    assert torch.allclose(lin.weight.grad, gw.float(), rtol=0, atol=0.1 * gw.abs().max().item())


def test_only_needed_grads_and_bias():
    lin = nn.Linear(128, 64, bias=True)
    f = Fp8Linear.from_linear(lin, CFG)
    x = torch.randn(5, 128)  # no grad for x: Dgrad is skipped
    f(x).sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
    assert torch.allclose(lin.bias.grad, torch.full((64,), 5.0))


def loop_reference(x, w, counts):
    out, s = [], 0
    for e, c in enumerate(counts):
        out.append(x[s:s + c] @ w[e].t())
        s += c
    return torch.cat(out)


@pytest.mark.parametrize("counts", [[100, 0, 37, 256, 1], [128, 128, 128]], ids=["ragged+empty", "aligned"])
def test_grouped_matches_per_expert_loop(counts):
    torch.manual_seed(0)
    T, E = sum(counts), len(counts)
    x = torch.randn(T, 192, requires_grad=True)
    w = torch.randn(E, 136, 192, requires_grad=True)
    y = Fp8GroupedLinear(CFG)(x, w, counts)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2, w2 = x.detach().requires_grad_(), w.detach().clone().requires_grad_()
    loop_reference(x2, w2, counts).backward(dy)
    assert calc_diff(y, loop_reference(x, w, counts)) < 1e-3
    assert calc_diff(x.grad, x2.grad) < 1e-3
    assert calc_diff(w.grad, w2.grad) < 2e-3
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e]))


def test_grouped_equals_dense_fp8_per_expert():
    """Same quantization as running Fp8Linear expert by expert: in particular the Wgrad
    128x1 tiles stop at expert boundaries (an expert with huge gradients cannot coarsen the
    scales of its neighbour's tokens)."""
    torch.manual_seed(1)
    counts = [100, 60, 0, 200]
    x = torch.randn(sum(counts), 128, requires_grad=True)
    w = torch.randn(4, 64, 128, requires_grad=True)
    dy = torch.randn(sum(counts), 64)
    dy[100:160] *= 1e4  # expert 1's gradients are huge
    Fp8GroupedLinear(CFG32)(x, w, counts).backward(dy)
    s = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        lin = nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w[e])
        xe = x.detach()[s:s + c].clone().requires_grad_()
        Fp8Linear.from_linear(lin, CFG32)(xe).backward(dy[s:s + c])
        assert torch.allclose(w.grad[e], lin.weight.grad, rtol=1e-5, atol=1e-5 * lin.weight.grad.abs().max())
        assert torch.allclose(x.grad[s:s + c], xe.grad, rtol=1e-5, atol=1e-5 * xe.grad.abs().max())
        s += c


def test_grouped_skips_empty_experts(monkeypatch):
    seen = []
    real = Fp8Ops.quantize
    monkeypatch.setattr(Fp8Ops, "quantize", lambda self, t, tile: seen.append(tuple(t.shape)) or real(self, t, tile))
    Fp8GroupedLinear(CFG)(torch.randn(10, 128), torch.randn(6, 32, 128), [0, 10, 0, 0, 0, 0])
    assert (1, 32, 128) in seen and (6, 32, 128) not in seen  # only the used expert's weight
    seen.clear()  # a parameter: the whole stack once per optimizer step, for Fprop and Dgrad alike
    w, x = nn.Parameter(torch.randn(6, 32, 128)), torch.randn(10, 128, requires_grad=True)
    Fp8GroupedLinear(CFG)(x, w, [0, 10, 0, 0, 0, 0]).sum().backward()
    assert seen.count((6, 32, 128)) == 1 and (1, 32, 128) not in seen and x.grad is not None
    assert Fp8GroupedLinear(CFG)(torch.randn(0, 128), torch.randn(6, 32, 128), [0] * 6).shape == (0, 32)


def test_grouped_keeps_empty_experts_in_place_with_the_same_bits(monkeypatch):
    """A parameter stack (its quantization cached for the step) runs every expert, empty
    ones included, through the CPU GEMMs instead of selecting the used ones: the same
    output and gradients bit for bit as the dropping path, and exactly zero dW for the
    empty experts."""
    torch.manual_seed(3)
    counts = [100, 0, 37, 0, 140]
    w0, x0 = torch.randn(5, 64, 256) * 0.05, torch.randn(sum(counts), 256)
    dy = torch.randn(sum(counts), 64)
    from moeforge.fp8 import linear as fp8_linear

    real, kept_all = fp8_linear._experts, []
    monkeypatch.setattr(fp8_linear, "_experts", lambda *a: kept_all.append(real(*a)[1] is None) or real(*a))
    outs = []
    for as_param in (True, False):
        w = nn.Parameter(w0.clone()) if as_param else w0.clone().requires_grad_()
        x = x0.clone().requires_grad_()
        y = Fp8GroupedLinear(CFG)(x, w, counts)
        y.backward(dy)
        outs.append((y, x.grad, w.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert kept_all == [True, True, False, False]  # forward and backward of each run
    assert not outs[0][2][[1, 3]].any() and outs[0][2][[0, 2, 4]].abs().amax(dim=(1, 2)).gt(0).all()


# ----------------------------------------------------------------------------- convert()
def tiny_model(**over):
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_dense_layers=1, n_heads=2, inter_dim=128,
                      moe_inter_dim=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, q_lora_rank=32, n_routed_experts=4, n_activated_experts=2,
                      max_seq_len=32, init_std=0.02, **over)
    torch.manual_seed(0)
    return Transformer(cfg)


@pytest.mark.parametrize("attn", ["mla", "mha"])
def test_convert_swaps_exactly_the_fp8_modules(attn):
    model = tiny_model(attn_type=attn)
    params_before = dict(model.named_parameters())
    fp8.convert(model, CFG)
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    plain = {n for n, m in model.named_modules() if type(m) is not Fp8Linear and isinstance(m, nn.Linear)}
    assert plain == {"head", "mtp.0.proj"}  # output head and MTP projection stay high precision
    assert all(n.split(".")[-2] in ("attn", "ffn", "shared_experts") for n in fp8_names)
    assert any(".attn." in n for n in fp8_names) and any("shared_experts" in n for n in fp8_names)
    assert any(n.startswith("layers.0.ffn.w") for n in fp8_names)  # the dense MLP
    assert isinstance(model.embed, nn.Embedding)
    for m in model.moe_layers():
        assert isinstance(m.experts.gemm, Fp8GroupedGemm)
        assert type(m.gate).__name__ == "Gate"
    # the same Parameter objects, same names: optimizers and checkpoints do not notice
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[k] is params_before[k] for k in after)
    assert fp8.convert(model, CFG) is model  # idempotent
    assert fp8.convert(tiny_model(), Fp8Config(enabled=False)).head.__class__ is not Fp8Linear


def test_tiny_fp8_model_trains_like_bf16():
    """Same init, same batch: FP8 and BF16 losses agree step for step (10 steps), and the
    FP8 loss keeps falling (25 steps). BF16 stops early only to keep the suite fast."""
    tok = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    base = tiny_model().set_compute_dtype(torch.bfloat16)
    curves = []
    for model, steps in ((base, 10), (fp8.convert(copy.deepcopy(base), CFG), 25)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(steps):
            logits = model(tok[:, :-1], with_mtp=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    bf16, f8 = curves
    assert abs(f8[0] - bf16[0]) / bf16[0] < 5e-3
    assert max(abs(a - b) / b for a, b in zip(f8, bf16)) < 0.05
    assert f8[-1] < 0.5 * f8[0]


def test_gemms_reading_one_input_share_its_fp8_copy(monkeypatch):
    """wq_a/wkv_a and w1/w3 read the same activation: one quantization, one saved E4M3
    copy, and results and gradients equal to quantizing it separately for each GEMM."""
    import moeforge.fp8.linear as fl

    cfg = Fp8Config(enabled=True)
    torch.manual_seed(0)
    a, b = Fp8Linear(256, 384, cfg=cfg), Fp8Linear(256, 128, cfg=cfg)
    w = torch.randn(4, 96, 256)
    x0 = torch.randn(2, 100, 256).bfloat16()

    def run():
        x, ww = x0.clone().requires_grad_(), w.clone().requires_grad_()
        a.zero_grad(), b.zero_grad()

        def forward():
            xs, grouped = x.view(-1, 256), Fp8GroupedLinear(cfg)
            return (a(x).sum() + b(x).float().square().sum() + grouped(xs, ww, [50, 0, 100, 50]).sum()
                    + grouped(xs, 2 * ww, [50, 0, 100, 50]).sum())

        loss, saved = saved_tensors(forward)
        loss.backward()
        fp8 = {t.data_ptr(): t.numel() for t in saved if t.dtype == torch.float8_e4m3fn and t.shape[-1] == 256}
        fp8_bytes = sum(fp8.values())  # distinct storages: a copy saved by two GEMMs counts once
        return fp8_bytes, x.grad, a.weight.grad.clone(), b.weight.grad.clone(), ww.grad

    shared = run()
    monkeypatch.setattr(fl, "_quantize_input", lambda ops, x, x2: ops.quantize(x2, "row"))
    separate = run()
    # the weights' 128x128-block copies also have 256 columns; the activation's copies differ
    assert separate[0] - shared[0] == 2 * x0.numel(), (shared[0], separate[0])
    assert all(torch.equal(p, q) for p, q in zip(shared[1:], separate[1:]))


def test_shared_fp8_input_follows_in_place_changes():
    cfg = Fp8Config(enabled=True)
    lin = Fp8Linear(128, 64, cfg=cfg)
    x = torch.randn(8, 128)
    first = lin(x)
    x.mul_(2)  # a new version: the memo must not hand back the old quantization
    assert torch.equal(lin(x), Fp8Linear.forward(lin, x.clone()))
    assert not torch.equal(first, lin(x))
    with torch.inference_mode():
        assert torch.equal(lin(x), Fp8Linear.forward(lin, x.clone()))
        xi = torch.randn(8, 128)
        assert torch.equal(lin(xi), Fp8Linear.forward(lin, xi.clone()))
