"""DPO: the loss against a direct transcription of its formula, log(2) and the known
gradient at policy == reference, and a short run that widens the held-out margin."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeforge.train.dpo import dpo, dpo_loss
from post_helpers import single_thread, tiny_config, tiny_world  # noqa: F401 (autouse fixture)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 - 20 for _ in range(4))
    beta = 0.3
    loss, parts = dpo_loss(pc, pr, rc, rr, beta)
    expect = [-math.log(sigmoid(beta * ((a - c) - (b - d)))) for a, b, c, d in zip(pc.tolist(), pr.tolist(),
                                                                                  rc.tolist(), rr.tolist())]
    assert loss.item() == pytest.approx(sum(expect) / 6, rel=1e-5)
    margins = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert parts["reward_margin"].item() == pytest.approx(sum(margins) / 6, rel=1e-5)
    assert parts["reward_accuracy"].item() == pytest.approx(sum(m > 0 for m in margins) / 6)


def test_policy_equal_to_reference():
    pc = torch.tensor([-3.0, -7.0], requires_grad=True)
    pr = torch.tensor([-5.0, -2.0], requires_grad=True)
    beta = 0.5
    loss, parts = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta)
    assert loss.item() == pytest.approx(math.log(2))
    assert parts["reward_margin"].item() == 0
    loss.backward()
    # d/dpc of -log sigmoid(beta * m) at m = 0 is -beta/2 per pair, averaged over 2 pairs
    assert pc.grad.tolist() == pytest.approx([-beta / 4] * 2) and pr.grad.tolist() == pytest.approx([beta / 4] * 2)
    # the same answer as chosen and rejected: no gradient at all
    p = torch.tensor([-4.0], requires_grad=True)
    dpo_loss(p, p, p.detach(), p.detach(), beta)[0].backward()
    assert p.grad.item() == 0


def test_short_dpo_run_widens_heldout_margin(tmp_path):
    cfg, init = tiny_world(tmp_path)
    cfg = tiny_config(tmp_path, dpo__steps=15, dpo__generated_pairs=200, dpo__eval_every=0, dpo__seq_len=96,
                      dpo__run_name="d", dpo__lr=2e-3, dpo__micro_batch_size=8)
    res = dpo(cfg, init, None)
    s = json.loads((res.run_dir / "summary.json").read_text())
    assert s["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert s["heldout_logp_margin_gain"] > 0.5, s
    assert s["eval_after"]["reward_accuracy"] > 0.6
