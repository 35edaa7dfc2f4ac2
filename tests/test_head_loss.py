"""The fused head + cross-entropy against F.cross_entropy on materialised logits, on both
its paths: the C row kernel and the torch loop."""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from moeforge.model import head_loss
from moeforge.model.head_loss import IGNORE, head_cross_entropy


def _reference(h, w, labels):
    logits = (h @ w.to(h.dtype).t()).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE)


def _path(kind: str):
    if kind == "torch":
        return head_loss.KERNEL.disabled()
    if os.environ.get("MOEFORGE_XENT_KERNEL") != "0":
        assert head_loss.KERNEL.get() is not None  # a compiler is part of the test environment
    return contextlib.nullcontext()


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_value_and_gradients_match_unfused(monkeypatch, dtype, tol, path):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 3 * 50)  # several chunks, the last one partial
    with _path(path):
        _check_against_unfused(dtype, tol)


def _check_against_unfused(dtype, tol):
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16).to(dtype).requires_grad_()
    w = (torch.randn(50, 16) * 0.5).requires_grad_()  # FP32 master, as in the model
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE
    loss = head_cross_entropy(h, w, labels)
    (2.5 * loss).backward()  # a non-unit upstream gradient is passed through
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _reference(h2, w2, labels)
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=tol, atol=tol)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, w2.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_all_ignored_gives_zero_and_no_grad_mode_skips_gradients(path):
    with _path(path):
        _check_ignored_and_no_grad()


def _check_ignored_and_no_grad():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = head_cross_entropy(h, w, torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with torch.no_grad():
        labels = torch.randint(0, 10, (4,))
        torch.testing.assert_close(head_cross_entropy(h, w, labels), _reference(h, w, labels))


def test_kernel_against_float64_on_a_wide_range_of_logits():
    """Large vocabulary (not a multiple of the vector width), logits spread over +-80 so
    many softmax weights underflow: loss and gradient within FP32 rounding of FP64."""
    torch.manual_seed(1)
    v = 5003
    z = torch.randn(37, v) * 30
    z[:, :7] = 80.0  # ties at the maximum
    z[3] = -60.0  # a flat row
    labels = torch.randint(0, v, (37,))
    labels[5] = IGNORE
    h = torch.eye(37).requires_grad_()  # I @ W^T = z: the head GEMM is exact
    w = z.t().contiguous().requires_grad_()  # [V, 37]
    with _path("kernel"):
        loss = head_cross_entropy(h, w, labels)
        loss.backward()
    zd = z.double().requires_grad_()
    ref = F.cross_entropy(zd, labels, ignore_index=IGNORE)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    # dW = dZ^T h = dZ^T for h = I: the logit gradient itself, transposed
    torch.testing.assert_close(w.grad.t().double(), zd.grad, rtol=1e-5, atol=1e-8)


def test_out_of_range_label_is_a_clear_error():
    h, w = torch.randn(3, 8), torch.randn(10, 8)
    with _path("kernel"), pytest.raises(IndexError, match="label out of range"):
        head_cross_entropy(h, w, torch.tensor([1, 10, 2]))
