"""`moeforge dpo`: direct preference optimisation against a frozen reference, a stage on the loop.

    moeforge dpo --config configs/tiny.toml --init runs/tiny-sft --pairs pairs.jsonl [--dpo.beta 0.1]

Loss (Rafailov et al. 2023), per pair with answer log-probs summed over the answer tokens::

    L = -log sigmoid( beta * [ (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)) ] )

Choices:
- The reference is a frozen copy of the initial policy, held by the stage (not a
  submodule of the trained model, so neither the optimizer nor checkpoints see it). Its
  log-probs are computed when a batch is made, once, without gradients.
- Chosen and rejected rows go through the policy in one forward (one padded batch).
- Logged per step: the implicit rewards beta * (log pi - log ref) of chosen and rejected,
  their margin, and the preference accuracy (margin > 0). Evaluated on held-out pairs:
  the same, plus the policy's own log-probability margin log pi(y_c) - log pi(y_r), the
  number the issue asks DPO to raise.
- Pairs: the labelling app's JSONL export, or generated math pairs when none is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from moeforge.config import Config
from moeforge.train.post_common import (PairStage, add_moe_parts, build_from, encode_pairs, frozen_copy,
                                        load_tokenizer_for, open_run, pairs_source, prepare_post, response_batch,
                                        run_post_stage, split_holdout, stage_cli, token_logprobs)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over pairs of sequence log-probs, and detached diagnostics."""
    reward_c = beta * (pi_chosen - ref_chosen)
    reward_r = beta * (pi_rejected - ref_rejected)
    margin = reward_c - reward_r
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_chosen": reward_c.mean().detach(), "reward_rejected": reward_r.mean().detach(),
                  "reward_margin": margin.mean().detach(), "reward_accuracy": (margin > 0).float().mean()}


def sequence_logprobs(model, batch: dict[str, torch.Tensor]):
    """(summed answer log-prob per row [B], ModelOutput)."""
    logp, out = token_logprobs(model, batch["tokens"])
    return (logp * batch["mask"]).sum(-1), out


class DPOStage(PairStage):
    """Pairs -> policy and reference answer log-probs -> DPO loss."""

    def __init__(self, cfg: Config, tok, reference, train_pairs: list[dict], val_pairs: list[dict], device):
        self.ref = reference
        super().__init__(cfg, tok, train_pairs, val_pairs, device)

    @torch.no_grad()
    def batch_of(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [p["prompt"] for p in pairs] * 2
        answers = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        batch = response_batch(prompts, answers, self.tok.pad_id, self.device)
        batch["ref"] = sequence_logprobs(self.ref, batch)[0]
        return batch

    def _loss(self, model, batch):
        pi, out = sequence_logprobs(model, batch)
        n = pi.shape[0] // 2
        loss, parts = dpo_loss(pi[:n], pi[n:], batch["ref"][:n], batch["ref"][n:], self.cfg.dpo.beta)
        parts["logp_margin"] = (pi[:n] - pi[n:]).mean().detach()
        return loss, parts, out

    def loss(self, model, batch, step: int) -> dict[str, torch.Tensor]:
        loss, parts, out = self._loss(model, batch)
        return add_moe_parts({"loss": loss, **parts}, out, self.cfg)

    def heldout_sums(self, model, batch, n: int) -> dict[str, float]:
        loss, parts, _ = self._loss(model, batch)
        return {k: float(v) * n for k, v in {"loss": loss, **parts}.items()}


def dpo(cfg: Config, init: Path | str | None = None, pairs: Path | str | None = None,
        resume: str | Path | None = None):
    """DPO from checkpoint ``init`` on ``pairs`` (JSONL; None = dpo.pairs, else generated
    math pairs). Returns the loop's TrainResult; ``summary.json`` has held-out margins."""
    from moeforge.train.pretrain import pick_device

    cfg, init_path = prepare_post(cfg, "dpo", init)
    run_dir, resume_path = open_run(cfg, resume)
    tok = load_tokenizer_for(cfg)
    raw, source, n_bad = pairs_source(pairs or cfg.dpo.pairs or None, cfg.dpo.generated_pairs, cfg.data.seed,
                                     cfg.data.math_level)
    encoded, too_long = encode_pairs(tok, raw, cfg.train.seq_len)
    train_pairs, val_pairs = split_holdout(encoded, cfg.dpo.val_fraction, cfg.train.seed)
    device = pick_device(cfg.train.device)
    model = build_from(cfg, init_path, device)
    # the reference is the *initial* policy, also on resume (the init checkpoint, not the resumed weights)
    stage = DPOStage(cfg, tok, frozen_copy(model), train_pairs, val_pairs, device)
    print(f"[dpo] {source}: {len(train_pairs)} train / {len(val_pairs)} held-out pairs; beta {cfg.dpo.beta}; "
          f"{n_bad} invalid lines and {too_long} too-long pairs skipped")
    info = {"init": str(init_path), "data": source, "beta": cfg.dpo.beta, "train_pairs": len(train_pairs),
            "val_pairs": len(val_pairs), "invalid_lines": n_bad, "too_long": too_long}

    def derive(before, after):
        out = {"heldout_accuracy": after["reward_accuracy"], "heldout_logp_margin": after["logp_margin"]}
        if before:
            out["heldout_logp_margin_gain"] = after["logp_margin"] - before["logp_margin"]
        return out

    return run_post_stage("dpo", cfg, model, stage, run_dir, resume_path, info, derive)


def cli(argv: list[str]) -> int:
    return stage_cli(argv, "dpo", __doc__, dpo,
                     ("--pairs", "JSONL preference pairs (default: dpo.pairs, else generated math pairs)"))
