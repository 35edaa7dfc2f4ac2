"""The CPU attention backward (batched GEMMs around one C pass) against an FP64 autograd
reference and against torch's flash-attention backward: at least as accurate, the same
with heads in chunks, V's zero padding kept zero, the fallback where it does not apply,
and a model's gradients through the recomputed MLA close to the flash path's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeforge.model import attention_kernel

pytestmark = pytest.mark.skipif(attention_kernel.KERNEL.get() is None, reason="no C compiler: flash path only")


def _case(b, h, s, d, vdim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).bfloat16() for _ in range(3))
    v[..., vdim:] = 0
    scale = d**-0.5
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=scale)
    do = torch.randn(out.shape, generator=g).bfloat16()
    do[..., vdim:] = 0
    return q, k, v, out, lse, do, scale


def _fp64_grads(q, k, v, do, scale):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale).backward(do.double())
    return [t.grad for t in leaves]


@pytest.mark.parametrize("with_out", [True, False], ids=["dsum-from-out", "dsum-from-p-dp"])
@pytest.mark.parametrize("shape", [(2, 3, 77, 96, 64), (1, 2, 130, 64, 64), (2, 4, 256, 96, 64), (1, 2, 512, 32, 32)])
def test_gradients_as_accurate_as_flash(shape, with_out):
    """With the forward's output or without it (the softmax rows' <do, o> summed from p and
    dp in the C pass instead): at least as accurate as flash against FP64."""
    q, k, v, out, lse, do, scale = _case(*shape)
    vdim = shape[-1]
    got = attention_kernel.backward(do, q, k, v, out if with_out else None, lse, scale, vdim)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0, True,
                                                                                  scale=scale)
    ref = _fp64_grads(q, k, v, do, scale)
    for name, g, f, r in zip("qkv", got, flash, ref):
        assert g.shape == f.shape and g.dtype == torch.bfloat16, name
        err, err_flash = ((g.double() - r).norm() / r.norm()).item(), ((f.double() - r).norm() / r.norm()).item()
        assert err <= 1.1 * err_flash + 1e-4, (name, err, err_flash)
    assert torch.equal(got[2][..., vdim:], torch.zeros_like(got[2][..., vdim:]))  # V's padding: zero gradient


def test_chunks_over_heads_change_nothing(monkeypatch):
    q, k, v, out, lse, do, scale = _case(2, 3, 40, 32, 24, seed=1)
    whole = attention_kernel.backward(do, q, k, v, out, lse, scale, 24)
    monkeypatch.setattr(attention_kernel, "CHUNK_ELEMENTS", 40 * 40 * 2)  # two heads per chunk, a ragged last one
    chunked = attention_kernel.backward(do, q, k, v, out, lse, scale, 24)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_falls_back_where_it_does_not_apply(monkeypatch):
    q, k, v, out, lse, do, scale = _case(1, 2, 64, 32, 32)
    assert attention_kernel.backward(do.float(), q.float(), k.float(), v.float(), out.float(), lse, scale, 32) is None
    assert attention_kernel.backward(do[:, :, :32], q[:, :, :32], k, v, out[:, :, :32], lse[:, :, :32], scale,
                                     32) is None  # queries != keys: not the training case
    monkeypatch.setattr(attention_kernel, "MAX_KEYS_X_QUERIES", 64 * 64 - 1)
    assert attention_kernel.backward(do, q, k, v, out, lse, scale, 32) is None  # long sequences: flash
    monkeypatch.undo()
    with attention_kernel.KERNEL.disabled():
        assert attention_kernel.backward(do, q, k, v, out, lse, scale, 32) is None


def test_model_gradients_close_to_the_flash_path():
    """Through a whole bf16 model (recomputed MLA): gradients with the kernel agree with the
    flash backward's to bf16 rounding."""
    from moeforge.config import load_config
    from moeforge.model.transformer import Transformer

    cfg = load_config("tiny", {"model.n_layers": 2, "model.mtp_depth": 0})
    torch.manual_seed(0)
    model = Transformer(cfg.model).set_compute_dtype(torch.bfloat16)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65))

    def grads():
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = grads()
    with attention_kernel.KERNEL.disabled():
        want = grads()
    for n in want:
        rel = ((got[n] - want[n]).float().norm() / want[n].float().norm()).item()
        assert rel < 2e-2, (n, rel)
    assert any(not torch.equal(got[n], want[n]) for n in want)  # the kernel did run


@pytest.mark.parametrize("fp8", [False, True])
def test_recomputing_attention_keeps_no_output_for_the_kernel(fp8):
    """The C backward needs no forward output, so the recomputing MLA does not keep one:
    in bf16 only wo keeps the output (its input), under FP8 only wo's E4M3 copy remains,
    and with the flash backward (kernel off) the bf16 output is kept as before."""
    from moeforge.config import load_config
    from moeforge.fp8 import Fp8Config, convert
    from moeforge.model.attention import MLA

    cfg = load_config("tiny", {"model.v_head_dim": 40}).model  # the output's size differs from the input's
    torch.manual_seed(0)
    attn = MLA(cfg)
    if fp8:
        attn = convert(attn, Fp8Config(enabled=True))
    x = torch.randn(3, 40, cfg.dim).bfloat16()
    o_elems = 3 * 40 * cfg.n_heads * cfg.v_head_dim

    def kept_outputs():
        saved, xx = [], x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = attn(xx)
        out.float().sum().backward()
        storages = {t.untyped_storage().data_ptr(): t.dtype for t in saved if t.numel() == o_elems}
        return sorted(str(d) for d in storages.values())

    assert kept_outputs() == (["torch.float8_e4m3fn"] if fp8 else ["torch.bfloat16"])
    with attention_kernel.KERNEL.disabled():
        assert kept_outputs() == ["torch.bfloat16"]
