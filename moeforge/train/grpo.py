"""`moeforge grpo`: group relative policy optimisation (DeepSeekMath, R1), a stage on the shared loop.

    moeforge grpo --config configs/tiny.toml --init runs/tiny-sft [--reward-model runs/tiny-reward]

One micro-batch = the rollout phase plus the loss, both inside the stage:
  ``next_batch()``  P prompts x G sampled completions (``generate.generate``, KV cache) ->
                    rewards -> group-normalised advantages A_i = (r_i - mean_G) / std_G ->
                    the frozen reference's log-probs of every completion token
  ``loss()``        J = mean_i 1/|o_i| sum_t [ min(rho A_i, clip(rho, 1-eps, 1+eps) A_i)
                                               - beta * KL_t ],  loss = -J
                    rho = pi(o_t) / pi_old(o_t),  KL_t = pi_ref/pi - log(pi_ref/pi) - 1 (k3)

Choices:
- Rewards are rule-based for the verifiable math domain: ``grpo.accuracy_reward`` for the
  exact integer (``synthetic.check_answer``) plus ``grpo.format_reward`` for ending in
  "The answer is N." and the end token; with ``--reward-model`` its score, times
  ``grpo.reward_model_weight``, is added. Any reward callable can be passed to
  :class:`GRPOStage` (tests use an easy synthetic task).
- A reward function that raises does not stop the run: that group's advantages are
  zero (only the KL term acts on it), the error is printed once and counted.
- std is the population std of the group; a group whose rewards are all equal has zero
  advantage (no signal), and the share of such groups is logged.
- pi_old: with ``grpo.updates_per_rollout = 1`` (DeepSeekMath: one update per exploration
  stage) the policy that sampled is the one being differentiated, so pi_old is the
  detached log-prob of the same forward (rho = 1, the clip is idle and the gradient is
  the plain policy gradient). With U > 1 the rollout batch is reused for U optimizer
  steps and pi_old is the log-prob recorded the first time it was used; then the clip
  acts. Log-probs come from a training-mode forward, not from the sampler, so rho is
  exactly 1 where it should be, whatever the compute dtype.
- ``grpo.loss_norm``: "sequence" averages each completion over its own tokens then over
  completions (1/G sum 1/|o_i| sum_t, as in the paper); "token" divides the sum over all
  completion tokens by their count (longer answers weigh more).
- The reference is a frozen copy of the initial policy; ``grpo.ref_refresh_every`` copies
  the policy into it every N steps (R1-Zero refreshed every 400). On resume the
  reference is the init checkpoint, or the resumed policy when a refresh had happened.
- Logged every step: reward mean/std, accuracy and format rates of the samples, KL, clip
  fraction, completion length, groups without signal. Evaluation decodes held-out
  problems (``math_eval.jsonl``) greedily: accuracy, format rate and mean rule reward.
"""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Callable

import torch

from moeforge.config import Config
from moeforge.errors import UserError
from moeforge.train.post_common import (add_moe_parts, build_from, decode_answer, encode_prompt, frozen_copy,
                                        greedy_eval, load_tokenizer_for, math_eval_problems, open_run, prepare_post,
                                        read_jsonl, response_batch, run_post_stage, score_math, stage_cli,
                                        token_logprobs)

Judge = Callable[[dict, str, bool], dict]  # (problem, completion text, finished) -> {"reward": r, ...}


# ----------------------------------------------------------------------------- the maths
def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group; ``rewards`` is [P, G]."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative KL(pi || ref) estimate: ref/pi - log(ref/pi) - 1."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, epsilon: float, beta: float, norm: str = "sequence"):
    """Negated GRPO objective over [B, T] token log-probs (mask = completion tokens), and stats."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    kl = k3_kl(logp, ref_logp)
    per_token = -(surrogate - beta * kl) * mask
    if norm == "sequence":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    else:
        loss = per_token.sum() / mask.sum().clamp_min(1)
    n = mask.sum().clamp_min(1)
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    return loss, {"kl": ((kl * mask).sum() / n).detach(), "clip_frac": ((clipped.float() * mask).sum() / n).detach()}


def math_judge(accuracy_reward: float, format_reward: float) -> Judge:
    """The verifiable-math reward: exact answer plus format, as weights of the two verdicts."""
    def judge(problem: dict, text: str, finished: bool) -> dict:
        v = score_math(text, finished, problem["answer"])
        return {"reward": accuracy_reward * v["correct"] + format_reward * v["format"], **v}
    return judge


# ----------------------------------------------------------------------------- the stage
class GRPOStage:
    """Rollouts (in ``next_batch``) and the clipped, KL-regularised objective (in ``loss``)."""

    def __init__(self, cfg: Config, tok, policy, reference, device, judge: Judge,
                 prompts: list[dict] | None = None, eval_problems: list[dict] | None = None, reward_model=None):
        g = cfg.grpo
        self.cfg, self.g, self.tok, self.device = cfg, g, tok, device
        self.policy, self.ref, self.judge, self.rm = policy, reference, judge, reward_model
        self.prompts, self.eval_problems = prompts, eval_problems or []
        self.tokens_per_batch = cfg.train.micro_batch_size * cfg.train.seq_len
        self.calls, self.last_refresh, self.errors, self.too_long = 0, 0, 0, 0
        self.seen_errors: set[str] = set()
        self.buffer: list[dict] = []
        self.prompt_rng = random.Random(cfg.train.seed * 7 + 3)  # generated problems / order of a prompt file
        self.order: list[int] = []
        self.gen = torch.Generator(device=device).manual_seed(cfg.train.seed)

    # ------------------------------------------------------------------ prompts
    def _next_problem(self) -> dict:
        if self.prompts is None:
            from moeforge.data.synthetic import make_math_problem

            return dict(zip(("prompt", "answer"), make_math_problem(self.prompt_rng, self.cfg.data.math_level)))
        if not self.order:
            self.order = list(range(len(self.prompts)))
            self.prompt_rng.shuffle(self.order)
        return self.prompts[self.order.pop()]

    def _next_prompts(self, n: int) -> list[tuple[dict, list[int]]]:
        out = []
        for _ in range(100 * n):
            prob = self._next_problem()
            ids = encode_prompt(self.tok, prob["prompt"])
            if len(ids) > self.g.max_prompt_tokens:
                self.too_long += 1
                if self.too_long in (1, 10, 100):
                    print(f"warning: {self.too_long} prompt(s) longer than grpo.max_prompt_tokens="
                          f"{self.g.max_prompt_tokens} skipped so far")
                continue
            out.append((prob, ids))
            if len(out) == n:
                return out
        raise UserError(f"almost every prompt exceeds grpo.max_prompt_tokens={self.g.max_prompt_tokens}")

    # ------------------------------------------------------------------ rewards
    def _error(self, what: str, e: Exception) -> None:
        self.errors += 1
        msg = f"{what} raised {type(e).__name__}: {e}"
        if msg not in self.seen_errors:
            self.seen_errors.add(msg)
            print(f"warning: {msg}; the group gets zero advantage ({self.errors} errors so far)")

    def _rewards(self, problems: list[dict], texts: list[str], finished: list[bool]) -> tuple[torch.Tensor, dict, list[bool]]:
        """Rewards [P*G], mean of each verdict, and whether each sample was scored."""
        rewards, ok, sums = [], [], {}
        for prob, text, fin in zip(problems, texts, finished):
            try:
                v = self.judge(prob, text, fin)
                r = float(v["reward"])
                if r != r:
                    raise ValueError("reward is NaN")
                good = True
            except Exception as e:  # any user reward code: counted, reported once, run goes on
                self._error("the reward function", e)
                v, r, good = {}, 0.0, False
            ok.append(good)
            rewards.append(r)
            for k, x in v.items():
                if k != "reward":
                    sums[k] = sums.get(k, 0.0) + float(x)
        if self.rm is not None and self.g.reward_model_weight:
            try:
                scores = self.rm.score_texts(self.tok, [p["prompt"] for p in problems], texts)
                rewards = [r + self.g.reward_model_weight * s for r, s in zip(rewards, scores)]
            except Exception as e:
                self._error("the reward model", e)
                ok = [False] * len(ok)
        return torch.tensor(rewards), {k: v / len(texts) for k, v in sums.items()}, ok

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self) -> dict:
        from moeforge.generate import generate, stop_ids_of

        P, G = self.g.micro_batch_size, self.g.group_size
        picked = self._next_prompts(P)
        problems = [p for p, _ in picked for _ in range(G)]
        prompt_ids = [ids for _, ids in picked for _ in range(G)]
        gen = generate(self.policy, prompt_ids, self.g.max_new_tokens, self.g.temperature, self.g.top_k, self.g.top_p,
                       stop_ids_of(self.tok), generator=self.gen)
        texts = [decode_answer(self.tok, t) for t in gen.tokens]
        rewards, verdicts, ok = self._rewards(problems, texts, gen.finished)
        grouped = rewards.view(P, G)
        adv = group_advantages(grouped)
        good = torch.tensor(ok).view(P, G).all(-1, keepdim=True)
        adv = torch.where(good, adv, torch.zeros_like(adv)).flatten()
        batch = response_batch(prompt_ids, [t if t else [self.tok.end_id] for t in gen.tokens], self.tok.pad_id,
                               self.device)
        batch["ref_logp"] = token_logprobs(self.ref, batch["tokens"])[0]
        batch["adv"], batch["old_logp"] = adv.to(self.device), None
        flat = torch.tensor
        batch["stats"] = {
            "reward_mean": flat(grouped.mean().item()), "reward_std": flat(grouped.std(-1, unbiased=False).mean().item()),
            "no_signal": flat((grouped.std(-1) == 0).float().mean().item()),
            "length": flat(sum(len(t) for t in gen.tokens) / len(texts)),
            "finished": flat(sum(gen.finished) / len(texts)),
            **{k: flat(v) for k, v in verdicts.items()}}
        return batch

    def next_batch(self) -> dict:
        n_micro, U = self.cfg.train.grad_accum, self.g.updates_per_rollout
        k = self.calls % (n_micro * U)
        step = self.calls // n_micro
        if k == 0:
            self.buffer = []
            every = self.g.ref_refresh_every
            if every and step > 0 and step % every == 0 and step != self.last_refresh:
                self.ref.load_state_dict(self.policy.state_dict())
                self.last_refresh = step
        while len(self.buffer) <= k % n_micro:  # new rollouts (or refilled after a resume)
            self.buffer.append(self.rollout())
        self.calls += 1
        batch = self.buffer[k % n_micro]
        self.tokens_per_batch = batch["tokens"].numel()  # real padded size, for tokens/s and MFU
        return batch

    def loss(self, model, batch: dict, step: int) -> dict[str, torch.Tensor]:
        logp, out = token_logprobs(model, batch["tokens"])
        if batch["old_logp"] is None:  # first use: the sampling policy is this very policy
            batch["old_logp"] = logp.detach()
        loss, stats = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["adv"], batch["mask"],
                                self.g.epsilon, self.g.kl_beta, self.g.loss_norm)
        parts = {"loss": loss, **stats, **{k: v.to(loss.device) for k, v in batch["stats"].items()}}
        return add_moe_parts(parts, out, self.cfg)

    def evaluate(self, model) -> dict[str, float]:
        if not self.eval_problems:
            return {}
        ev = greedy_eval(model, self.tok, self.eval_problems, self.g.eval_max_new_tokens, judge=self.judge)
        if "correct" in ev:
            ev["accuracy"] = ev.pop("correct")
        return ev

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        v, internal, gauss = self.prompt_rng.getstate()
        return {"calls": self.calls, "last_refresh": self.last_refresh, "order": self.order,
                "prompt_rng": [v, list(internal), gauss], "errors": self.errors, "too_long": self.too_long,
                "gen": base64.b64encode(self.gen.get_state().cpu().numpy().tobytes()).decode()}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.last_refresh, self.order = state["calls"], state["last_refresh"], list(state["order"])
        v, internal, gauss = state["prompt_rng"]
        self.prompt_rng.setstate((v, tuple(internal), gauss))
        self.errors, self.too_long = state["errors"], state["too_long"]
        self.gen.set_state(torch.frombuffer(bytearray(base64.b64decode(state["gen"])), dtype=torch.uint8))
        self.buffer = []
        if self.last_refresh:  # the loop restored the policy first: the best available reference
            self.ref.load_state_dict(self.policy.state_dict())


# ----------------------------------------------------------------------------- entry points
def _parse_problem(obj) -> dict:
    if not isinstance(obj, dict) or "prompt" not in obj or "answer" not in obj:
        raise ValueError('expected {"prompt": ..., "answer": ...}')
    return {"prompt": obj["prompt"], "answer": str(obj["answer"])}


def _reward_curve(run_dir: Path) -> dict:
    from moeforge.train.metrics import read_records

    rec = [r["reward_mean"] for r in read_records(run_dir / "metrics.jsonl")
           if r.get("kind") == "train" and "reward_mean" in r]
    if not rec:
        return {}
    k = max(1, len(rec) // 4)
    return {"train_reward_first": rec[0], "train_reward_last": rec[-1],
            "train_reward_first_quarter": sum(rec[:k]) / k, "train_reward_last_quarter": sum(rec[-k:]) / k}


def grpo(cfg: Config, init: Path | str | None = None, reward_model: Path | str | None = None,
         resume: str | Path | None = None):
    """GRPO from checkpoint ``init`` on the verifiable math domain (plus the reward model's
    score when given). Returns the loop's TrainResult; ``summary.json`` has held-out
    accuracy and reward before/after and the training reward curve's ends."""
    from moeforge.train.pretrain import pick_device
    from moeforge.train.reward import load_reward_model

    cfg, init_path = prepare_post(cfg, "grpo", init)
    g = cfg.grpo
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise UserError(f"grpo.max_prompt_tokens + grpo.max_new_tokens = {cfg.train.seq_len} exceeds the model's "
                        f"context model.max_seq_len={cfg.model.max_seq_len}")
    run_dir, resume_path = open_run(cfg, resume)
    tok = load_tokenizer_for(cfg)
    device = pick_device(cfg.train.device)
    policy = build_from(cfg, init_path, device)
    rm = load_reward_model(reward_model, device) if reward_model else None
    prompts = read_jsonl(g.prompts, _parse_problem, "prompts")[0] if g.prompts else None
    stage = GRPOStage(cfg, tok, policy, frozen_copy(policy), device, math_judge(g.accuracy_reward, g.format_reward),
                      prompts, math_eval_problems(cfg, g.eval_problems), rm)
    source = g.prompts or "generated math problems"
    print(f"[grpo] {source}; {g.micro_batch_size} prompts x {g.group_size} samples per micro-batch; "
          f"rewards: accuracy {g.accuracy_reward} + format {g.format_reward}"
          + (f" + {g.reward_model_weight} x reward model {reward_model}" if rm else ""))
    info = {"init": str(init_path), "prompts": source, "reward_model": str(reward_model) if rm else None,
            "group_size": g.group_size, "kl_beta": g.kl_beta, "epsilon": g.epsilon}

    def derive(before, after):
        out = {"heldout_accuracy": after.get("accuracy"), "heldout_reward": after.get("reward"),
               "reward_errors": stage.errors, "prompts_too_long": stage.too_long, **_reward_curve(run_dir)}
        if before:
            out.update(heldout_accuracy_before=before.get("accuracy"), heldout_reward_before=before.get("reward"))
        return out

    return run_post_stage("grpo", cfg, policy, stage, run_dir, resume_path, info, derive)


def cli(argv: list[str]) -> int:
    return stage_cli(argv, "grpo", __doc__, grpo,
                     ("--reward-model", "reward-model checkpoint whose score is added to the rule rewards"))
