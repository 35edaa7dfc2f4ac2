"""`moeforge reward`: a reward model trained on preference pairs, a stage on the shared loop.

    moeforge reward --config configs/tiny.toml --init runs/tiny-sft [--pairs pairs.jsonl]

Choices:
- The reward model is the policy's backbone (initialised from a checkpoint, MTP dropped)
  plus a scalar head read at the *last non-pad token* of prompt + answer (the answer's
  ``<|end|>``): the only position that has seen the whole answer in a causal model.
  Rows are right-padded, so padding never influences that position.
- Loss: Bradley-Terry, -log sigmoid(r_chosen - r_rejected) (= softplus of the negated
  margin), averaged over pairs.
- Per-criterion heads (accuracy, relevance, coherence): where a pair carries the
  labelling app's 1-5 ratings, a linear head per criterion regresses the rating mapped to
  [0, 1] (MSE, weight ``reward.criteria_loss_weight``). Their weighted sum
  (``reward.criteria_weights``) can serve as the reward instead of the BT score
  (``reward.use_criteria``). Pairs without ratings train only the BT head.
- Input: the labelling app's JSONL export when given, else pairs generated from the
  verifiable math domain (correct vs wrong answer); the summary says which.
- Held-out pairs (``reward.val_fraction``) give accuracy (r_chosen > r_rejected), mean
  margin and BT loss, before and after training.
- The checkpoint holds ``lm.*`` (the backbone), ``score.*`` and ``criteria.*``;
  :func:`load_reward_model` rebuilds it for GRPO from the checkpoint alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import Config
from moeforge.precision import compute_dtype
from moeforge.train.post_common import (PairStage, add_moe_parts, build_from, encode_answer, encode_pairs,
                                        encode_prompt, load_tokenizer_for, load_weights, open_run, pad_rows,
                                        pairs_source, prepare_post, run_post_stage, saved_config, split_holdout,
                                        stage_cli)
from moeforge.train.post_config import CRITERIA


class RewardModel(nn.Module):
    """Backbone + scalar Bradley-Terry head + one regression head per rating criterion."""

    def __init__(self, lm: nn.Module, criteria_weights: list[float]):
        super().__init__()
        self.lm = lm
        dim = lm.cfg.dim
        self.score = nn.Linear(dim, 1)
        self.criteria = nn.Linear(dim, len(CRITERIA))
        for head in (self.score, self.criteria):
            nn.init.normal_(head.weight, 0.0, 1.0 / math.sqrt(dim))
            nn.init.zeros_(head.bias)
        self.register_buffer("criteria_weights", torch.tensor(criteria_weights, dtype=torch.float32), persistent=False)
        self.use_criteria = False

    def moe_layers(self):  # the loop's bias update walks these
        return self.lm.moe_layers()

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor):
        """(score [B], criteria [B, 3], ModelOutput) at each row's last real token."""
        out = self.lm(tokens, with_mtp=False)
        last = out.hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1].float()
        return self.score(last).squeeze(-1), self.criteria(last), out

    def reward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The scalar used as a reward: the BT score, or the weighted criteria sum."""
        score, crit, _ = self(tokens, lengths)
        return crit @ self.criteria_weights if self.use_criteria else score

    @torch.no_grad()
    def score_texts(self, tok, prompts: list[Any], answers: list[str]) -> list[float]:
        """Rewards of (prompt, answer-text) pairs, batched; for GRPO."""
        rows = [encode_prompt(tok, p) + encode_answer(tok, a) for p, a in zip(prompts, answers)]
        ctx = self.lm.cfg.max_seq_len
        rows = [r[-ctx:] for r in rows]  # the end (the answer) matters; the model cannot see more
        tokens, lengths = pad_rows(rows, tok.pad_id, self.score.weight.device)
        return self.reward(tokens, lengths).float().tolist()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_c - r_r), mean over pairs (softplus form: stable for large margins)."""
    return F.softplus(r_rejected - r_chosen).mean()


def rating_targets(ratings: Any, side: str) -> list[float]:
    """The 1-5 ratings of one answer mapped to [0, 1], NaN where a criterion is missing.

    Accepts ``{"chosen": {crit: v}, "rejected": {...}}`` (the export) and tolerates absent
    or partial ratings.
    """
    d = ratings.get(side) if isinstance(ratings, dict) else None
    out = []
    for c in CRITERIA:
        v = d.get(c) if isinstance(d, dict) else None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v <= 5
        out.append((float(v) - 1) / 4 if ok else float("nan"))
    return out


# ----------------------------------------------------------------------------- the stage
class RewardStage(PairStage):
    """Pairs -> one forward of chosen and rejected rows -> BT (+ rating) loss."""

    def batch_of(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
        tokens, lengths = pad_rows(rows, self.tok.pad_id, self.device)
        targets = [rating_targets(p["ratings"], "chosen") for p in pairs] + \
                  [rating_targets(p["ratings"], "rejected") for p in pairs]
        return {"tokens": tokens, "lengths": lengths, "ratings": torch.tensor(targets, device=self.device)}

    def _forward(self, model, batch):
        score, crit, out = model(batch["tokens"], batch["lengths"])
        n = score.shape[0] // 2
        return score[:n], score[n:], crit, out

    def loss(self, model, batch, step: int) -> dict[str, torch.Tensor]:
        rc, rr, crit, out = self._forward(model, batch)
        bt = bradley_terry_loss(rc, rr)
        parts = {"loss": bt, "bt": bt.detach(), "accuracy": (rc > rr).float().mean(), "margin": (rc - rr).mean().detach()}
        rated = ~torch.isnan(batch["ratings"])
        w = self.cfg.reward.criteria_loss_weight
        if w > 0 and bool(rated.any()):
            mse = ((crit - batch["ratings"].nan_to_num()) ** 2 * rated).sum() / rated.sum()
            parts["loss"] = parts["loss"] + w * mse
            parts["criteria_mse"] = mse.detach()
        return add_moe_parts(parts, out, self.cfg)

    def heldout_sums(self, model, batch, n: int) -> dict[str, float]:
        rc, rr, _, _ = self._forward(model, batch)
        return {"accuracy": (rc > rr).sum().item(), "margin": (rc - rr).sum().item(),
                "bt_loss": F.softplus(rr - rc).sum().item()}


# ----------------------------------------------------------------------------- entry points
def train_reward(cfg: Config, init: Path | str | None = None, pairs: Path | str | None = None,
                 resume: str | Path | None = None):
    """Train a reward model from checkpoint ``init`` on ``pairs`` (JSONL; None = generated
    math pairs). Returns the loop's TrainResult; ``summary.json`` says which data was used."""
    from moeforge.train.pretrain import pick_device

    cfg, init_path = prepare_post(cfg, "reward", init)
    run_dir, resume_path = open_run(cfg, resume)
    tok = load_tokenizer_for(cfg)
    raw, source, n_bad = pairs_source(pairs or cfg.reward.pairs or None, cfg.reward.generated_pairs,
                                     cfg.data.seed, cfg.data.math_level)
    encoded, too_long = encode_pairs(tok, raw, cfg.train.seq_len)
    train_pairs, val_pairs = split_holdout(encoded, cfg.reward.val_fraction, cfg.train.seed)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = RewardModel(build_from(cfg, init_path, device), cfg.reward.criteria_weights).to(device)
    model.use_criteria = cfg.reward.use_criteria
    stage = RewardStage(cfg, tok, train_pairs, val_pairs, device)
    rated = sum(1 for p in encoded if p["ratings"])
    print(f"[reward] {source}: {len(train_pairs)} train / {len(val_pairs)} held-out pairs ({rated} with ratings); "
          f"{n_bad} invalid lines and {too_long} too-long pairs skipped")
    info = {"init": str(init_path), "data": source, "generated": not (pairs or cfg.reward.pairs),
            "train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "rated_pairs": rated,
            "invalid_lines": n_bad, "too_long": too_long}
    return run_post_stage("reward", cfg, model, stage, run_dir, resume_path, info,
                          lambda before, after: {"heldout_accuracy": after["accuracy"]})


def load_reward_model(path: str | Path, device) -> RewardModel:
    """A trained reward model from its checkpoint (a step dir or run dir), eval mode, frozen."""
    from moeforge.config import load_config
    from moeforge.model.transformer import Transformer
    from moeforge.train.post_common import resolve_init

    step = resolve_init(path)
    saved = saved_config(step)
    cfg = load_config(None, {f"{sec}.{k}": v for sec in ("model", "train", "reward")
                             for k, v in saved.get(sec, {}).items()})
    lm = Transformer(cfg.model).drop_mtp()
    lm.set_compute_dtype(compute_dtype(cfg, device))
    model = RewardModel(lm, cfg.reward.criteria_weights)
    load_weights(model, step)
    model.use_criteria = cfg.reward.use_criteria
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def cli(argv: list[str]) -> int:
    return stage_cli(argv, "reward", __doc__, train_reward,
                     ("--pairs", "JSONL preference pairs (default: reward.pairs, else generated math pairs)"))
