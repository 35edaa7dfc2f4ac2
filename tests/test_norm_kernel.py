"""The bf16 RMSNorm C kernel against an FP64 reference and the torch path: outputs,
input and weight gradients, strided rows (MLA latents are slices), the rebuild used by
norm-output consumers, and a whole model's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from moeforge.config import load_config
from moeforge.model import norm_kernel, recompute
from moeforge.model.transformer import Transformer

pytestmark = pytest.mark.skipif(norm_kernel.KERNEL.get() is None, reason="no C compiler: torch path only")


def _run(x, w, dy, eps=1e-6):
    xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = recompute.rms_norm(xx, ww, eps)
    y.backward(dy)
    return y.detach(), xx.grad, ww.grad


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("rows,dim,width", [(2048, 512, 512), (37, 96, 160), (1, 8, 8), (300, 130, 130)])
def test_kernel_matches_fp64_like_the_torch_path(rows, dim, width):
    g = torch.Generator().manual_seed(rows + dim)
    wide = (torch.randn(3, rows, width, generator=g) * 3).bfloat16()
    x = wide[..., :dim]  # strided rows when width > dim
    w = torch.rand(dim, generator=g) + 0.5
    dy = torch.randn(3, rows, dim, generator=g).bfloat16()
    got = _run(x, w, dy)
    with norm_kernel.KERNEL.disabled():
        torch_path = _run(x, w, dy)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    yd.backward(dy.double())
    for name, k, t, ref in zip(("y", "dx", "dw"), got, torch_path, (yd.detach(), xd.grad, wd.grad)):
        assert k.dtype == t.dtype and k.shape == t.shape, name
        # bf16 outputs: within one rounding of the torch path's error; dw (FP32) far tighter
        assert _rel(k, ref) <= 1.05 * _rel(t, ref) + (2e-6 if name == "dw" else 1e-4), name
    # the same row never lands more than one bf16 step from the torch path's
    assert ((got[0].float() - torch_path[0].float()).abs() <= torch_path[0].float().abs() * 2**-7 + 1e-6).all()


def test_rebuild_is_bit_identical_to_the_forward():
    x = torch.randn(4, 50, 64).bfloat16()
    w = torch.rand(64) + 0.5
    y = recompute.rms_norm(x.requires_grad_(), w, 1e-6)
    src = recompute.source(y)
    assert src is not None and torch.equal(src[1](*src[0]), y)


def test_fp32_and_no_weight_grad_paths():
    x, w, dy = torch.randn(10, 32), torch.rand(32) + 0.5, torch.randn(10, 32)
    assert norm_kernel.forward(x, w, 1e-6) is None  # FP32 stays on the torch path
    xb, dyb = x.bfloat16(), dy.bfloat16()
    y, rstd = norm_kernel.forward(xb, w, 1e-6)
    dx, dw = norm_kernel.backward(xb, w, dyb, rstd, need_dw=False)
    assert dw is None and dx.dtype == torch.bfloat16
    with norm_kernel.KERNEL.disabled():
        assert norm_kernel.forward(xb, w, 1e-6) is None


def test_model_with_and_without_the_kernel():
    cfg = load_config("tiny", {"model.n_layers": 2}).model
    torch.manual_seed(0)
    model = Transformer(cfg).set_compute_dtype(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (4, 65))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss = out.ce + sum(out.mtp_ce)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (la, ga) = step()
    with norm_kernel.KERNEL.disabled():
        (lb, gb) = step()
    assert abs(la.item() - lb.item()) <= 1e-3 * abs(lb.item())
    assert ga.keys() == gb.keys()
    for k in gb:  # bf16 rounding differences only, propagated through two layers
        assert (ga[k].float() - gb[k].float()).norm() <= 0.03 * gb[k].float().norm() + 1e-6, k


@pytest.mark.slow
def test_compiled_bf16_model_trains_like_eager():
    """``train.compile``: inductor traces the model, so the C kernels (ctypes calls) must
    stay out of the graph; one compiled bf16 step matches the eager one."""
    from moeforge.train.losses import lm_loss
    from moeforge.train.pretrain import build_model

    cfg = load_config("tiny", {"model.n_layers": 2, "train.progress": False})
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(load_config("tiny", {"model.n_layers": 2, "train.compile": compiled}), torch.device("cpu"))
        loss = lm_loss(model(tokens[:, :-1], labels=tokens[:, 1:]), tokens[:, 1:], cfg.model)["loss"]
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[compiled] = loss.item()
    assert abs(losses[True] - losses[False]) <= 0.01 * losses[False], losses
