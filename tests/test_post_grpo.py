"""GRPO: advantages, the k3 KL and the clipped objective against transcriptions of the
paper's formulas; a tiny run on an easy verifiable task raises the mean reward."""

from __future__ import annotations

import math

import pytest
import torch

from moeforge.config import ConfigError
from moeforge.train.grpo import GRPOStage, group_advantages, grpo_loss, k3_kl
from moeforge.train.loop import train
from moeforge.train.post_common import frozen_copy, load_tokenizer_for
from moeforge.train.post_config import stage_config
from moeforge.model.transformer import Transformer
from post_helpers import single_thread, tiny_config, tiny_world  # noqa: F401 (autouse fixture)


def test_group_advantages_match_formula():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2], [3.0, -1.0, 0.5, 2.0]])
    adv = group_advantages(r)
    for g in range(3):
        xs = r[g].tolist()
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        for i, x in enumerate(xs):
            assert adv[g, i].item() == pytest.approx((x - mean) / (std + 1e-4), abs=1e-5)
    assert torch.all(adv[1] == 0)  # equal rewards: no signal


def test_k3_kl_matches_formula_and_is_a_kl():
    logp = torch.log(torch.tensor([0.1, 0.5, 0.9, 0.3]))
    ref = torch.log(torch.tensor([0.2, 0.5, 0.6, 0.01]))
    got = k3_kl(logp, ref)
    for i in range(4):
        q = math.exp(ref[i]) / math.exp(logp[i])  # pi_ref / pi_theta
        assert got[i].item() == pytest.approx(q - math.log(q) - 1, rel=1e-5, abs=1e-7)
    assert got[1].item() == 0 and torch.all(got >= 0)
    # unbiased: E_{x~pi}[k3] = KL(pi || ref) on a full distribution
    p, q = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.4, 0.4, 0.2])
    expect = (p * (p / q).log()).sum()
    assert (p * k3_kl(p.log(), q.log())).sum().item() == pytest.approx(expect.item(), rel=1e-5)


def test_loss_matches_per_sequence_transcription():
    g = torch.Generator().manual_seed(0)
    B, T, eps, beta = 4, 6, 0.2, 0.04
    logp, old, ref = (torch.randn(B, T, generator=g) * 0.3 - 1 for _ in range(3))
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    loss, _ = grpo_loss(logp, old, ref, adv, mask, eps, beta, "sequence")
    total, tok_sum, tok_n = 0.0, 0.0, 0
    for i in range(B):
        terms = []
        for t in range(T):
            if mask[i, t]:
                rho = math.exp(logp[i, t] - old[i, t])
                a = adv[i].item()
                q = math.exp(ref[i, t] - logp[i, t])
                terms.append(min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) - beta * (q - math.log(q) - 1))
        total += sum(terms) / len(terms)
        tok_sum, tok_n = tok_sum + sum(terms), tok_n + len(terms)
    assert loss.item() == pytest.approx(-total / B, rel=1e-5)
    loss_tok, _ = grpo_loss(logp, old, ref, adv, mask, eps, beta, "token")
    assert loss_tok.item() == pytest.approx(-tok_sum / tok_n, rel=1e-5)


@pytest.mark.parametrize("adv,log_ratio,zero", [
    (1.0, math.log(1.5), True),    # A > 0, rho > 1+eps: clipped, no push further up
    (-1.0, math.log(0.5), True),   # A < 0, rho < 1-eps: clipped, no push further down
    (1.0, math.log(0.5), False),   # A > 0 but rho below the region: min keeps the unclipped term
    (-1.0, math.log(1.5), False),
    (1.0, 0.0, False),             # inside the trust region
])
def test_clipped_objective_gradient_vanishes_outside_trust_region(adv, log_ratio, zero):
    old = torch.tensor([[-1.0]])
    logp = (old + log_ratio).requires_grad_()
    loss, stats = grpo_loss(logp, old, old.clone(), torch.tensor([adv]), torch.ones(1, 1), 0.2, 0.0)
    loss.backward()
    assert (logp.grad.abs().item() == 0) == zero
    assert stats["clip_frac"].item() == (1.0 if zero else 0.0)


def test_group_size_validation():
    with pytest.raises(ConfigError, match="grpo.group_size must be >= 2"):
        tiny_config(__import__("pathlib").Path("/tmp"), grpo__group_size=1)


def digit_judge(problem, text, finished):
    """Easy verifiable task: the share of digits among the answer's characters."""
    if problem.get("explode") and "x" in text:
        raise RuntimeError("boom")
    return {"reward": sum(ch.isdigit() for ch in text) / max(len(text), 1)}


def test_tiny_grpo_raises_mean_reward(tmp_path, capsys):
    cfg, _ = tiny_world(tmp_path)
    cfg = stage_config(tiny_config(tmp_path, grpo__steps=30, grpo__lr=1e-2, grpo__min_lr=1e-2, grpo__micro_batch_size=4,
                                   grpo__group_size=8, grpo__max_new_tokens=6, grpo__max_prompt_tokens=32,
                                   grpo__eval_every=0, grpo__eval_max_new_tokens=6, grpo__run_name="g",
                                   grpo__kl_beta=0.01), "grpo")
    tok = load_tokenizer_for(cfg)
    torch.manual_seed(0)
    policy = Transformer(cfg.model).drop_mtp()
    prompts = [{"prompt": f"Write some digits, please ({w}).", "answer": ""} for w in ("a", "b", "c", "d", "e", "f")]
    prompts[0]["explode"] = True  # a reward function that raises on some answers must not stop the run
    held = [{"prompt": f"Digits now ({w})!", "answer": ""} for w in ("x", "y", "z", "w")]
    stage = GRPOStage(cfg, tok, policy, frozen_copy(policy), torch.device("cpu"), digit_judge, prompts, held)
    before = stage.evaluate(policy)["reward"]
    res = train(policy, stage, cfg, tmp_path / "runs" / "g")
    after = stage.evaluate(policy)["reward"]
    from moeforge.train.metrics import read_records

    curve = [r["reward_mean"] for r in read_records(tmp_path / "runs" / "g" / "metrics.jsonl") if r.get("kind") == "train"]
    assert res.status == "done" and len(curve) == 30
    assert sum(curve[-5:]) / 5 > sum(curve[:5]) / 5 + 0.3, curve
    assert after > before + 0.3, (before, after)
