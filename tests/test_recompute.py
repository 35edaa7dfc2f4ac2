"""Recomputing RMSNorm and SwiGLU changes memory, not numbers (bit-identical to the plain
autograd graph); the FP8-cached SwiGLU saves only E4M3 + scales and its gradients are
exactly those at the dequantized inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeforge.config import load_config
from moeforge.fp8.config import Fp8Config
from moeforge.fp8.quant import dequantize, quantize
from moeforge.model import attention_kernel, norm_kernel, recompute
from moeforge.model.transformer import Transformer


@pytest.fixture(autouse=True)
def _torch_norms():
    """Bit-identity is a property of recomputation: compare with the torch RMSNorm and the
    flash-attention backward on both sides (the bf16 C kernels sum in another order;
    tests/test_norm_kernel.py and tests/test_attention_kernel.py check them)."""
    with norm_kernel.KERNEL.disabled(), attention_kernel.KERNEL.disabled():
        yield


def _plain_rms(x, w, eps):  # the graph RMSNorm had before recompute.py (layers.py keeps it for DTensors)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.float()).to(x.dtype)


def _grads(f, *inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = f(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_bit_identical(dtype):
    x = (torch.randn(3, 50, 96) * 3).to(dtype)
    w = torch.rand(96) + 0.5
    out_a, (dx_a, dw_a) = _grads(lambda x, w: recompute.rms_norm(x, w, 1e-6), x, w)
    out_b, (dx_b, dw_b) = _grads(lambda x, w: _plain_rms(x, w, 1e-6), x, w)
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b) and torch.equal(dw_a, dw_b)


def test_rms_norm_saves_only_input_and_rstd():
    x = torch.randn(64, 96, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recompute.rms_norm(x, w, 1e-6)
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved if t is not w)
    assert shapes == sorted([((64, 96), torch.bfloat16), ((64, 1), torch.float32)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_bit_identical(dtype):
    a, b = (torch.randn(70, 200) * 2).to(dtype), torch.randn(70, 200).to(dtype)
    out_a, grads_a = _grads(recompute.swiglu, a, b)
    out_b, grads_b = _grads(lambda a, b: F.silu(a) * b, a, b)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(p, q) for p, q in zip(grads_a, grads_b))


def test_fp8_cached_swiglu():
    cfg = Fp8Config(enabled=True)
    a, b = (torch.randn(70, 300) * 2).bfloat16(), torch.randn(70, 300).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = recompute.swiglu(aa, bb, cfg)
    assert sorted(str(t.dtype) for t in saved) == sorted(["torch.float8_e4m3fn", "torch.float32"] * 2)
    assert torch.equal(out, F.silu(a) * b)  # the forward itself is exact
    g = torch.randn(out.shape).bfloat16()
    out.backward(g)
    # reference: plain autograd at the dequantized inputs (an independent quantize -> dequantize)
    qa, qb = (dequantize(quantize(t, (1, 128)), torch.bfloat16) for t in (a, b))
    ga_ref = torch.ops.aten.silu_backward(g * qb, qa)
    assert torch.equal(aa.grad, ga_ref) and torch.equal(bb.grad, g * F.silu(qa))
    # and within E4M3's rounding of the exact gradient
    ga_exact = torch.ops.aten.silu_backward(g.float() * b.float(), a.float())
    rel = (aa.grad.float() - ga_exact).norm() / ga_exact.norm()
    assert 0 < rel < 0.08, rel


def _step_grads(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    (out.ce + sum(out.mtp_ce)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_gradients_unchanged_by_recompute(monkeypatch):
    """The whole tiny model in bf16: every parameter gradient is bit-identical with and
    without recomputation (the routed experts' fused FFN aside: it reorders a product, so
    its gradients are only as accurate as bf16 allows: it is held to the plain graph's
    accuracy against an fp32 reference), and the recomputing model saves far fewer bytes."""
    from moeforge.model.moe import GroupedExperts

    cfg = load_config("tiny", {"model.n_layers": 2}).model
    torch.manual_seed(0)
    model = Transformer(cfg).set_compute_dtype(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (4, 65))

    def saved_bytes():
        total = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(0 if isinstance(t, torch.nn.Parameter) else t.numel() * t.element_size()) or t,
                lambda t: t):
            model(tokens[:, :-1], labels=tokens[:, 1:])
        return sum(total)

    lean, lean_bytes = _step_grads(model, tokens), saved_bytes()
    monkeypatch.setattr(GroupedExperts, "fused_ffn", False)
    unfused = _step_grads(model, tokens)
    monkeypatch.setattr(recompute, "is_plain", lambda *ts: False)  # force the plain autograd graph
    plain, plain_bytes = _step_grads(model, tokens), saved_bytes()
    assert lean.keys() == plain.keys() == unfused.keys()
    assert all(torch.equal(unfused[k], plain[k]) for k in plain), [k for k in plain if not torch.equal(unfused[k], plain[k])]
    # Against the same step in fp32 the plain graph's gradients carry bf16's rounding (1-2%
    # relative here). A bound relative to the gradient itself fails where a gradient is a
    # sum that cancels (a norm weight's: 4% on an AVX2 CPU), because rounding errors scale
    # with the terms, not with their sum. So the fused FFN must be as accurate as the plain
    # graph: its distance to fp32 at most 1.25x the plain graph's (measured <= 1.04x on both
    # CPU classes; a wrong gradient is off by far more).
    model.set_compute_dtype(torch.float32)
    exact = _step_grads(model, tokens)
    for k in plain:
        err_lean, err_plain = ((g[k].float() - exact[k]).norm() for g in (lean, plain))
        assert err_lean <= 1.25 * err_plain, (k, err_lean, err_plain)
    assert lean_bytes < 0.6 * plain_bytes, (lean_bytes, plain_bytes)


def test_router_linear_and_combine_bit_identical():
    x = torch.randn(300, 64).bfloat16()
    w = torch.randn(8, 64)
    out_a, grads_a = _grads(recompute.fp32_linear, x, w)
    out_b, grads_b = _grads(lambda x, w: F.linear(x.float(), w.float()), x, w)
    assert out_a.dtype == torch.float32 and torch.equal(out_a, out_b)
    assert all(torch.equal(p, q) for p, q in zip(grads_a, grads_b))
    idx = torch.randint(0, 100, (300,))
    out_a, (g_a,) = _grads(lambda y: recompute.scatter_add_rows(y, idx, 100), x)
    out_b, (g_b,) = _grads(lambda y: y.new_zeros(100, 64).index_add(0, idx, y), x)
    assert torch.equal(out_a, out_b) and torch.equal(g_a, g_b)


def test_router_rebuilds_a_norm_output_instead_of_keeping_it():
    """The router reading an RMSNorm's output (as a [T, d] view) keeps the norm's input,
    which the norm keeps anyway, and rebuilds its own input in backward: the same bits,
    and no tensor of the norm output's size and dtype is saved by the router."""
    h = torch.randn(4, 75, 64).bfloat16()
    nw, w = torch.randn(64) * 0.5 + 1, torch.randn(8, 64)

    def router(h, nw, w):
        y = recompute.rms_norm(h, nw, 1e-6)
        return recompute.fp32_linear(y.view(-1, 64), w) + y.float().sum()  # y also used elsewhere

    def plain(h, nw, w):
        h32 = h.float()
        y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.float()).to(h.dtype)
        return F.linear(y.view(-1, 64).float(), w.float()) + y.float().sum()

    out_a, grads_a = _grads(router, h, nw, w)
    out_b, grads_b = _grads(plain, h, nw, w)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(p, q) for p, q in zip(grads_a, grads_b))
    saved = []
    hh = h.clone().requires_grad_()
    y = recompute.rms_norm(hh, nw, 1e-6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recompute.fp32_linear(y.view(-1, 64), w)
    assert not any(t.shape[-1] == 64 and t.dtype == torch.bfloat16 and t.numel() == y.numel()
                   and t.data_ptr() == y.data_ptr() for t in saved)
    assert any(t.data_ptr() == hh.data_ptr() for t in saved)  # the norm's input, shared
    # consumers of one norm share one rebuild, equal to the forward's output
    tensors, rebuild = recompute.source(y.view(-1, 64))
    again = rebuild(*tensors)
    assert again is rebuild(*tensors) and torch.equal(again, y)
    y.mul_(2)  # changed in place: the router must keep it, not rebuild the old value
    assert recompute.source(y) is None


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_dense_linear_keeps_master_weight_and_rebuilds_norm_output(fp8):
    """A dense layer (bf16 ``Linear`` or ``Fp8Linear``) after an RMSNorm: the same output
    and gradients, bit for bit, as when its input is an ordinary tensor (a clone of the
    norm output), while it keeps neither a copy of its weight nor its input (in bf16 or
    E4M3): only the norm's input, which the norm keeps anyway. One FP8 exception, by
    design: with the rebuilt bf16 input in hand, Wgrad quantizes it 128x1 directly instead
    of re-tiling the 1x128 E4M3 copy, so its weight gradient is rounded once, not twice,
    and must be closer to the exact product than the re-tiled one."""
    from moeforge.fp8 import Fp8Config, Fp8Linear
    from moeforge.model.layers import Linear

    torch.manual_seed(0)
    lin = Linear(256, 384)
    layer = Fp8Linear.from_linear(lin, Fp8Config(enabled=True)) if fp8 else lin
    h = torch.randn(4, 150, 256).bfloat16()
    nw = torch.rand(256) + 0.5

    def run(fresh: bool):
        hh, ww = h.clone().requires_grad_(), nw.clone().requires_grad_()
        lin.zero_grad()
        saved = []
        y = recompute.rms_norm(hh, ww, 1e-6)
        x = y.clone() if fresh else y
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = layer(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16())
        return [out, hh.grad, ww.grad, lin.weight.grad.clone()], saved, (hh, ww)

    plain, _, _ = run(fresh=True)
    lean, saved, norm_inputs = run(fresh=False)
    assert all(torch.equal(p, q) for p, q in zip(plain[:3], lean[:3]))
    if fp8:
        hh = h.double().requires_grad_()
        ref_y = hh * torch.rsqrt(hh.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
        dy = torch.randn(4, 150, 384, generator=torch.Generator().manual_seed(1)).bfloat16().double()
        exact = dy.reshape(-1, 384).t() @ ref_y.detach().reshape(-1, 256)
        err = [((g.double() - exact).norm() / exact.norm()).item() for g in (plain[3], lean[3])]
        assert err[1] < 0.9 * err[0], err
    else:
        assert torch.equal(plain[3], lean[3])
    kept = [t for t in saved if not isinstance(t, torch.nn.Parameter)]
    assert {t.data_ptr() for t in kept} == {t.data_ptr() for t in norm_inputs}, [(t.dtype, t.shape) for t in kept]


def test_linear_over_concatenated_norm_outputs_keeps_only_the_norm_inputs():
    """MTP's projection reads two norm outputs side by side (``cat_outputs``): the same
    output and gradients, bit for bit, as over a plain ``torch.cat``, while the projection
    keeps nothing but the two norms' inputs, which the norms keep anyway."""
    from moeforge.model.layers import Linear

    torch.manual_seed(0)
    lin = Linear(2 * 96, 64)
    a0, b0 = torch.randn(3, 40, 96).bfloat16(), (torch.randn(3, 40, 96) * 5).bfloat16()
    wa, wb = torch.nn.Parameter(torch.rand(96) + 0.5), torch.nn.Parameter(torch.rand(96) + 0.5)

    def run(lean: bool):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        lin.zero_grad()
        saved = []
        ya, yb = recompute.rms_norm(a, wa, 1e-6), recompute.rms_norm(b, wb, 1e-6)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = lin(recompute.cat_outputs(ya, yb) if lean else torch.cat([ya, yb], -1))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16())
        kept = {t.data_ptr() for t in saved if not isinstance(t, torch.nn.Parameter)}
        return [out, a.grad, b.grad, lin.weight.grad.clone()], kept, {a.data_ptr(), b.data_ptr()}

    plain, plain_kept, _ = run(False)
    lean, kept, norm_inputs = run(True)
    assert all(torch.equal(p, q) for p, q in zip(plain, lean))
    assert kept == norm_inputs and plain_kept.isdisjoint(norm_inputs)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_down_projection_rebuilds_the_swiglu_output(fp8, monkeypatch):
    """bf16: an MLP's down projection keeps no copy of the SwiGLU output, it rebuilds it
    from the SwiGLU's saved inputs, with bit-identical gradients to keeping the copy. FP8:
    it keeps its E4M3 copy (a rebuild from the E4M3 inputs cost accuracy, see swiglu())."""
    from moeforge.fp8 import Fp8Config, convert
    from moeforge.model.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(256, 384)
    if fp8:
        mlp = convert(mlp, Fp8Config(enabled=True))
    x = torch.randn(4, 150, 256).bfloat16()
    dy = torch.randn(4, 150, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    h_elems = 4 * 150 * 384

    def run():
        mlp.zero_grad()
        saved, xx = [], x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = mlp(xx)
        out.backward(dy)
        grads = [out, xx.grad, *(p.grad.clone() for p in mlp.parameters())]
        return grads, {t.untyped_storage().data_ptr(): t.dtype for t in saved if t.numel() == h_elems}

    lean, kept = run()
    assert len(kept) == (3 if fp8 else 2)  # a and b (E4M3 under FP8, plus w2's copy of h)
    monkeypatch.setattr(recompute, "_register", lambda *args, **kw: None)
    copy, kept = run()
    assert len(kept) == 3  # a, b and h when nothing can be rebuilt
    assert all(torch.equal(p, q) for p, q in zip(lean, copy))


@pytest.mark.parametrize("over", [{}, {"model.q_lora_rank": 0}, {"model.v_head_dim": 48}],
                         ids=["mla", "mla-noqlora", "mla-equal-vdim"])
def test_recomputed_attention_bit_identical(over, monkeypatch):
    """MLA with rebuilt q/k/v: output and every gradient equal the plain SDPA graph's, and
    it keeps well under half the bytes."""
    from moeforge.model.attention import MLA

    cfg = load_config("tiny", over).model
    torch.manual_seed(0)
    attn = MLA(cfg)
    x = torch.randn(3, 40, cfg.dim).bfloat16()

    def run():
        attn.zero_grad()
        saved, xx = [], x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(0 if isinstance(t, torch.nn.Parameter) else t.numel() * t.element_size()) or t,
                lambda t: t):
            out = attn(xx)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16())
        return out, xx.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}, sum(saved)

    lean = run()
    monkeypatch.setattr(recompute, "is_plain", lambda *ts: False)
    plain = run()
    assert torch.equal(lean[0], plain[0]) and torch.equal(lean[1], plain[1])
    assert lean[2].keys() == plain[2].keys()
    differ = [k for k in plain[2] if not torch.equal(lean[2][k], plain[2][k])]
    assert not differ, differ
    assert lean[3] < 0.5 * plain[3], (lean[3], plain[3])


def test_fp8_output_projection_keeps_no_copy_of_the_attention_output(monkeypatch):
    """Under FP8, wo reads the attention output, which the recomputing attention saves as
    it is: wo keeps that tensor (no new bytes) instead of an E4M3 copy, bit for bit the
    same gradients as keeping the copy, but for wo's own weight gradient: Wgrad quantizes
    the kept bf16 tensor 128x1 directly instead of re-tiling the E4M3 copy (one rounding,
    not two; test_dense_linear_keeps_master_weight_and_rebuilds_norm_output shows it is
    the more accurate), so that one differs a little."""
    from moeforge.fp8 import Fp8Config, convert
    from moeforge.model.attention import MLA

    cfg = load_config("tiny").model
    torch.manual_seed(0)
    attn = convert(MLA(cfg), Fp8Config(enabled=True))
    x = torch.randn(3, 40, cfg.dim).bfloat16()
    o_elems = 3 * 40 * cfg.n_heads * cfg.v_head_dim

    def run():
        attn.zero_grad()
        saved, xx = [], x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = attn(xx)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16())
        fp8_o = [t for t in saved if t.dtype == torch.float8_e4m3fn and t.numel() == o_elems]
        return {"out": out, "x": xx.grad, **{n: p.grad.clone() for n, p in attn.named_parameters()}}, fp8_o

    lean, fp8_o = run()
    assert not fp8_o
    monkeypatch.setattr(recompute, "kept_as_is", lambda t: False)
    copy, fp8_o = run()
    assert len(fp8_o) == 1  # the copy it keeps otherwise
    differ = [k for k in lean if not torch.equal(lean[k], copy[k])]
    assert differ == ["wo.weight"], differ
    assert (lean["wo.weight"] - copy["wo.weight"]).float().norm() < 0.1 * copy["wo.weight"].float().norm()


def test_grouped_linear_gradient_in_weight_layout(monkeypatch):
    """The expert GEMM's own backward gives the same numbers as autograd through
    ``_grouped_mm`` (bit for bit) with dW already in W's [E, out, in] layout."""
    from moeforge.model import moe

    w = torch.randn(6, 64, 96)
    x = torch.randn(300, 96).bfloat16()
    counts = [50, 0, 100, 30, 70, 50]
    lean_out, lean = _grads(lambda x, w: moe.grouped_linear(x, w, counts), x, w)
    monkeypatch.setattr(recompute, "is_plain", lambda *ts: False)
    plain_out, plain = _grads(lambda x, w: moe.grouped_linear(x, w, counts), x, w)
    assert torch.equal(lean_out, plain_out)
    assert all(torch.equal(p, q) for p, q in zip(lean, plain))
    assert lean[1].is_contiguous() and lean[1][1].abs().sum() == 0  # the empty expert gets zero


def test_expert_row_padding_round_trip():
    """Padding each expert's rows to its bucket and back is exact both ways, for plain
    tensors and for FP8 operands (E4M3 rows, their scales and dequantized copy alike)."""
    from moeforge.fp8 import Fp8Config, Fp8GroupedGemm, quantize
    from moeforge.model.expert_ffn import repad_rows
    from moeforge.model.moe import padded_rows

    counts, padded = [3, 0, 5, 2], [4, 0, 8, 2]
    x = torch.randn(10, 6)
    dest = padded_rows(counts, padded, x.device)
    ref = torch.zeros(14, 6).index_copy_(0, dest, x)  # an independent construction
    assert torch.equal(repad_rows(x, counts, padded), ref)
    assert torch.equal(repad_rows(ref, padded, counts), x)
    q = quantize(torch.randn(10, 256), (1, 128), dq_dtype=torch.bfloat16)
    qp = Fp8GroupedGemm(Fp8Config(enabled=True)).repad(q, counts, padded)
    assert torch.equal(qp.dequantize(), torch.zeros(14, 256).index_copy_(0, dest, q.dequantize()))
    if q.dq is not None:
        assert torch.equal(qp.dq, torch.zeros(14, 256).bfloat16().index_copy_(0, dest, q.dq))


def test_recompute_attention_is_a_config_switch():
    from moeforge.model.attention import MLA
    from moeforge.train.pretrain import build_model

    def attn_saved_bytes(flag: bool) -> int:
        cfg = load_config("tiny", {"model.n_layers": 1, "model.mtp_depth": 0, "train.recompute_attention": flag})
        model = build_model(cfg, torch.device("cpu"))
        mla = next(m for m in model.modules() if isinstance(m, MLA))
        assert mla.recompute_up_proj is flag
        x = torch.randn(2, 32, cfg.model.dim).bfloat16()
        total = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(0 if isinstance(t, torch.nn.Parameter) else t.numel() * t.element_size()) or t,
                lambda t: t):
            mla(x)
        return sum(total)

    assert attn_saved_bytes(True) < 0.5 * attn_saved_bytes(False)
