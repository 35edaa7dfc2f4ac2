"""The fused head + cross-entropy against F.cross_entropy on materialised logits."""

import pytest
import torch
import torch.nn.functional as F

from moeforge.model import head_loss
from moeforge.model.head_loss import IGNORE, head_cross_entropy


def _reference(h, w, labels):
    logits = (h @ w.to(h.dtype).t()).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_value_and_gradients_match_unfused(monkeypatch, dtype, tol):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 3 * 50)  # several chunks, the last one partial
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


def test_all_ignored_gives_zero_and_no_grad_mode_skips_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = head_cross_entropy(h, w, torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with torch.no_grad():
        labels = torch.randint(0, 10, (4,))
        torch.testing.assert_close(head_cross_entropy(h, w, labels), _reference(h, w, labels))
