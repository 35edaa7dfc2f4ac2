"""Config sections of the post-training stages: ``[sft]``, ``[reward]``, ``[dpo]``, ``[grpo]``.

Choices:
- Each section holds only what differs from ``[train]`` for its stage. Every stage shares
  the same optimisation fields (:class:`StageTrain`: steps, lr, schedule, batch, sequence
  length, eval/checkpoint cadence, run name) with defaults that suit fine-tuning (lower
  LR, short warmup, cosine); everything else (dtype, device, seed, clipping, AdamW betas,
  out_dir, ...) comes from ``[train]`` unchanged. :func:`stage_config` builds the
  effective config once, for all four stages, so the shared loop sees an ordinary
  ``Config`` and checkpoints record what was really used.
- ``init`` names the checkpoint a stage starts from; ``--init`` on the command line (and
  the pipeline's argument) wins over it.
- Data paths are strings; "" means the built-in default (``sft.jsonl`` in the data
  directory for SFT, pairs generated from the verifiable math domain for the reward model
  and DPO, generated math problems for GRPO).
- Validation raises :class:`ConfigError` with one line naming the field, like the rest of
  the tree. This module imports nothing from ``moeforge.config`` (which imports it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moeforge.errors import require

SCHEDULES = ("v3", "wsd", "cosine", "constant")
CRITERIA = ("accuracy", "relevance", "coherence")  # the seed's three rating criteria


@dataclass
class StageTrain:
    """[train] fields a post-training stage replaces; subclasses change the defaults."""

    steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 5
    schedule: str = "cosine"
    micro_batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    eval_every: int = 50
    ckpt_every: int = 0  # 0: only the final checkpoint
    run_name: str = ""  # "" = [train].run_name (the CLI makes it "<train.run_name>-<section>")
    init: str = ""  # checkpoint to start from (a step dir or a run dir); --init wins

    SECTION = "post"  # class attribute, not a field: the name used in messages

    def train_overrides(self) -> dict:
        names = [f.name for f in dataclasses.fields(StageTrain) if f.name not in ("init", "run_name")]
        over = {n: getattr(self, n) for n in names}
        if self.run_name:
            over["run_name"] = self.run_name
        return over

    def validate(self) -> None:
        s = self.SECTION
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len"):
            require(getattr(self, name) > 0, f"{s}.{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every"):
            require(getattr(self, name) >= 0, f"{s}.{name} must be >= 0, got {getattr(self, name)}")
        require(self.lr > 0, f"{s}.lr must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"{s}.min_lr={self.min_lr} must be between 0 and {s}.lr={self.lr}")
        require(self.schedule in SCHEDULES, f"{s}.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        require("/" not in self.run_name, f"{s}.run_name must be a plain name, got {self.run_name!r}")

    def _fraction(self, name: str, lo_open: bool = False) -> None:
        v = getattr(self, name)
        ok = (0 < v < 1) if lo_open else (0 <= v < 1)
        require(ok, f"{self.SECTION}.{name} must be in {'(0, 1)' if lo_open else '[0, 1)'}, got {v}")


@dataclass
class SFTConfig(StageTrain):
    """Supervised fine-tuning on chat conversations (loss on assistant tokens only)."""

    steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    data: str = ""  # JSONL conversations; "" = sft.jsonl in data.data_dir
    val_fraction: float = 0.05  # conversations held out for the eval loss
    eval_problems: int = 100  # held-out math problems for greedy accuracy; 0 disables
    eval_max_new_tokens: int = 16

    SECTION = "sft"

    def validate(self) -> None:
        super().validate()
        self._fraction("val_fraction", lo_open=True)
        require(self.eval_problems >= 0, f"sft.eval_problems must be >= 0, got {self.eval_problems}")
        require(self.eval_max_new_tokens > 0, f"sft.eval_max_new_tokens must be > 0, got {self.eval_max_new_tokens}")


@dataclass
class RewardConfig(StageTrain):
    """Reward model: scalar Bradley-Terry head (+ optional per-criterion rating heads)."""

    steps: int = 150
    lr: float = 5e-4
    min_lr: float = 5e-5
    micro_batch_size: int = 16  # preference pairs per micro-batch
    pairs: str = ""  # JSONL preference pairs (the labelling app's export); "" = generated math pairs
    generated_pairs: int = 3000  # how many math pairs to generate when there is no export
    val_fraction: float = 0.1
    criteria_loss_weight: float = 0.5  # weight of the rating regression next to Bradley-Terry; 0 disables
    criteria_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # accuracy, relevance, coherence
    use_criteria: bool = False  # reward = weighted sum of criterion heads instead of the BT score

    SECTION = "reward"

    def validate(self) -> None:
        super().validate()
        self._fraction("val_fraction", lo_open=True)
        require(self.generated_pairs >= 10, f"reward.generated_pairs must be >= 10, got {self.generated_pairs}")
        require(self.criteria_loss_weight >= 0, f"reward.criteria_loss_weight must be >= 0, got {self.criteria_loss_weight}")
        require(len(self.criteria_weights) == len(CRITERIA),
                 f"reward.criteria_weights needs {len(CRITERIA)} numbers ({', '.join(CRITERIA)}), "
                 f"got {len(self.criteria_weights)}")
        require(not self.use_criteria or self.criteria_loss_weight > 0,
                 "reward.use_criteria needs reward.criteria_loss_weight > 0 (the heads would be untrained)")


@dataclass
class DPOConfig(StageTrain):
    """Direct preference optimisation against a frozen copy of the initial policy."""

    steps: int = 100
    lr: float = 2e-4
    min_lr: float = 2e-5
    micro_batch_size: int = 8  # pairs per micro-batch
    beta: float = 0.1
    pairs: str = ""  # JSONL preference pairs; "" = generated math pairs
    generated_pairs: int = 3000
    val_fraction: float = 0.1

    SECTION = "dpo"

    def validate(self) -> None:
        super().validate()
        require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        self._fraction("val_fraction", lo_open=True)
        require(self.generated_pairs >= 10, f"dpo.generated_pairs must be >= 10, got {self.generated_pairs}")


@dataclass
class GRPOConfig(StageTrain):
    """Group relative policy optimisation with rule-based (and optionally learned) rewards.

    ``micro_batch_size`` is prompts per micro-batch; each brings ``group_size`` completions,
    so the loop's micro-batch holds micro_batch_size * group_size sequences. ``seq_len`` is
    filled in as max_prompt_tokens + max_new_tokens.
    """

    steps: int = 60
    lr: float = 3e-4
    min_lr: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    micro_batch_size: int = 8  # prompts per micro-batch
    eval_every: int = 20
    group_size: int = 8  # G completions per prompt
    epsilon: float = 0.2  # clip range of the importance ratio
    kl_beta: float = 0.04  # weight of the k3 KL to the reference (DeepSeekMath)
    loss_norm: str = "sequence"  # "sequence": 1/|o_i| per completion (DeepSeekMath) | "token": over all tokens
    updates_per_rollout: int = 1  # optimizer steps on each rollout batch (1: ratio is 1, clip idle)
    ref_refresh_every: int = 0  # copy the policy into the reference every N steps; 0 = never
    max_new_tokens: int = 24
    max_prompt_tokens: int = 96  # longer prompts are skipped and counted
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    accuracy_reward: float = 1.0  # for the exact integer answer
    format_reward: float = 0.2  # for ending with "The answer is N." and the end token
    reward_model_weight: float = 1.0  # times the reward model's score, when one is given
    prompts: str = ""  # JSONL {"prompt","answer"}; "" = generated math problems
    eval_problems: int = 100  # held-out problems (math_eval.jsonl) decoded greedily
    eval_max_new_tokens: int = 16

    SECTION = "grpo"

    def validate(self) -> None:
        super().validate()
        require(self.group_size >= 2, f"grpo.group_size must be >= 2, got {self.group_size}")
        require(self.epsilon > 0, f"grpo.epsilon must be > 0, got {self.epsilon}")
        require(self.kl_beta >= 0, f"grpo.kl_beta must be >= 0, got {self.kl_beta}")
        require(self.loss_norm in ("sequence", "token"), f"grpo.loss_norm must be 'sequence' or 'token', got {self.loss_norm!r}")
        require(self.updates_per_rollout >= 1, f"grpo.updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
        require(self.ref_refresh_every >= 0, f"grpo.ref_refresh_every must be >= 0, got {self.ref_refresh_every}")
        for name in ("max_new_tokens", "max_prompt_tokens", "eval_max_new_tokens"):
            require(getattr(self, name) > 0, f"grpo.{name} must be > 0, got {getattr(self, name)}")
        require(self.temperature > 0, f"grpo.temperature must be > 0 (sampling), got {self.temperature}")
        require(0 < self.top_p <= 1, f"grpo.top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"grpo.top_k must be >= 0, got {self.top_k}")
        require(self.eval_problems >= 0, f"grpo.eval_problems must be >= 0, got {self.eval_problems}")

    def train_overrides(self) -> dict:
        over = super().train_overrides()
        over["micro_batch_size"] = self.micro_batch_size * self.group_size  # sequences
        over["seq_len"] = self.max_prompt_tokens + self.max_new_tokens
        return over


def stage_config(cfg, section: str):
    """A copy of ``cfg`` whose ``[train]`` is overridden by ``cfg.<section>`` (validated)."""
    sec: StageTrain = getattr(cfg, section)
    train = dataclasses.replace(cfg.train, **sec.train_overrides())
    # the batch ramp is a pretraining device; post-training steps are all full size
    train = dataclasses.replace(train, batch_ramp_tokens=0, batch_ramp_start=min(train.batch_ramp_start, train.grad_accum))
    out = dataclasses.replace(cfg, train=train)
    out.validate()
    return out
