"""Reward model: the Bradley-Terry loss against its formula; a tiny reward model separates
clearly separable pairs (held-out accuracy), rating heads train, bad lines are skipped."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from moeforge.train.reward import bradley_terry_loss, load_reward_model, rating_targets, train_reward
from post_helpers import single_thread, tiny_config, tiny_world  # noqa: F401 (autouse fixture)


def test_bradley_terry_matches_formula():
    rc = torch.tensor([2.0, -1.0, 0.0, 30.0, -40.0])
    rr = torch.tensor([1.0, 1.0, 0.0, -30.0, 40.0])
    expect = sum(-math.log(1 / (1 + math.exp(-(c - r)))) if c - r > -30 else (r - c)
                 for c, r in zip(rc.tolist(), rr.tolist())) / 5
    got = bradley_terry_loss(rc, rr)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_rating_targets():
    r = {"chosen": {"accuracy": 5, "relevance": 1, "coherence": None}, "rejected": {"accuracy": 3}}
    assert rating_targets(r, "chosen")[:2] == [1.0, 0.0] and math.isnan(rating_targets(r, "chosen")[2])
    assert rating_targets(r, "rejected")[0] == 0.5
    assert all(math.isnan(x) for x in rating_targets(None, "chosen"))


def test_tiny_reward_model_separates_separable_pairs(tmp_path, capsys):
    cfg, init = tiny_world(tmp_path)
    rng = random.Random(0)
    lines = []
    for i in range(240):
        q = f"Question {rng.randint(0, 999)}: is it good?"
        good, bad = rng.choice(["Yes, it is good.", "Yes!", "Good, yes."]), rng.choice(["No.", "No, bad.", "Bad, no!"])
        ratings = {"chosen": {"accuracy": 5, "relevance": 4, "coherence": 5},
                   "rejected": {"accuracy": 1, "relevance": 2, "coherence": 1}} if i % 2 else None
        lines.append(json.dumps({"prompt": q, "chosen": good, "rejected": bad, "ratings": ratings}))
    lines[5] = "{broken"
    lines[9] = json.dumps({"prompt": "q", "chosen": "", "rejected": "no"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tmp_path, reward__steps=25, reward__micro_batch_size=8, reward__eval_every=0,
                      reward__seq_len=64, reward__run_name="rm", reward__lr=2e-3)
    res = train_reward(cfg, init, path)
    s = json.loads((res.run_dir / "summary.json").read_text())
    assert s["invalid_lines"] == 2 and f"{path}:6: not valid JSON" in capsys.readouterr().out
    assert s["generated"] is False and "pairs.jsonl" in s["data"]
    assert s["eval_before"]["accuracy"] < 0.8
    assert s["heldout_accuracy"] >= 0.95, s
    # the checkpoint reloads as a scorer that ranks the same way
    rm = load_reward_model(res.checkpoint, "cpu")
    from moeforge.train.post_common import load_tokenizer_for

    tok = load_tokenizer_for(cfg)
    hi, lo = rm.score_texts(tok, ["Question 5: is it good?"] * 2, ["Yes, it is good.", "No, bad."])
    assert hi > lo
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("criteria_mse" in r for r in rows if r.get("kind") == "train")


def test_generated_math_pairs_when_no_export(tmp_path):
    cfg, init = tiny_world(tmp_path)
    cfg = tiny_config(tmp_path, reward__steps=2, reward__generated_pairs=40, reward__eval_every=0,
                      reward__seq_len=96, reward__run_name="rm2")
    s = train_reward(cfg, init, None).summary
    assert s["generated"] is True and "verifiable math" in s["data"] and s["val_pairs"] == 4
