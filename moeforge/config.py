"""One typed config tree for every moeforge command.

Choices:
- Plain dataclasses with type hints and defaults; no registry, no magic. Each section
  validates itself (``validate()``) and raises :class:`ConfigError` with one line that
  names the offending field, so a bad value fails at load time, never mid-run.
- TOML in (``configs/*.toml``), dotted overrides on the command line
  (``--model.n_layers 4``). Override values are parsed by the field's declared type,
  so ``--train.lr 3e-4`` is a float and ``--fp8.enabled true`` a bool.
- Unknown keys are errors (a typo must not silently fall back to a default).
- The data and FP8 sections live beside the code they configure
  (``moeforge/data/config.py``, ``moeforge/fp8/config.py``) and are composed here.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeforge.data.config import DataConfig
from moeforge.fp8.config import Fp8Config
from moeforge.train.post_config import DPOConfig, GRPOConfig, RewardConfig, SFTConfig


from moeforge.errors import ConfigError, require  # noqa: E402  (ConfigError re-exported: moeforge.config.ConfigError)


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture. Field names follow DeepSeek-V3's ``ModelArgs`` where one exists."""

    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_dense_layers: int = 1  # first layers use a dense SwiGLU MLP instead of MoE
    n_heads: int = 4
    inter_dim: int = 768  # dense MLP hidden size
    moe_inter_dim: int = 128  # per-expert hidden size (routed and shared)
    # attention
    attn_type: str = "mla"  # "mla" | "mha" (mha with n_kv_heads < n_heads is GQA)
    n_kv_heads: int = 0  # mha only; 0 means n_heads
    head_dim: int = 0  # mha only; 0 means dim // n_heads
    q_lora_rank: int = 0  # 0: queries are projected directly (as in V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # mixture of experts
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "sigmoid"  # "sigmoid" | "softmax"
    route_scale: float = 1.0
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing; 0 disables
    seq_aux_alpha: float = 1e-4  # sequence-wise balance loss weight; 0 disables
    # multi-token prediction
    mtp_depth: int = 1
    mtp_lambda: float = 0.3
    # positions
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_factor: float = 1.0  # YaRN factor s; 1 disables YaRN
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    # misc
    norm_eps: float = 1e-6
    init_std: float = 0.006

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "inter_dim", "max_seq_len"):
            require(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        require(0 <= self.n_dense_layers <= self.n_layers,
                f"model.n_dense_layers={self.n_dense_layers} must be between 0 and model.n_layers={self.n_layers}")
        require(self.attn_type in ("mla", "mha"), f"model.attn_type must be 'mla' or 'mha', got {self.attn_type!r}")
        if self.attn_type == "mla":
            require(self.kv_lora_rank > 0, f"model.kv_lora_rank must be > 0 for MLA, got {self.kv_lora_rank}")
            require(self.q_lora_rank >= 0, f"model.q_lora_rank must be >= 0, got {self.q_lora_rank}")
            require(self.qk_nope_head_dim > 0 and self.v_head_dim > 0,
                    "model.qk_nope_head_dim and model.v_head_dim must be > 0 for MLA")
            require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                    f"model.qk_rope_head_dim must be even and > 0, got {self.qk_rope_head_dim}")
        else:
            kv = self.n_kv_heads or self.n_heads
            require(kv > 0 and self.n_heads % kv == 0,
                    f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={kv}")
            if not self.head_dim:
                require(self.dim % self.n_heads == 0,
                        f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
            hd = self.head_dim or self.dim // self.n_heads
            require(hd % 2 == 0, f"model.head_dim must be even for rotary embeddings, got {hd}")
        if self.n_dense_layers < self.n_layers:  # there are MoE layers
            require(self.moe_inter_dim > 0, f"model.moe_inter_dim must be > 0, got {self.moe_inter_dim}")
            require(self.n_routed_experts > 0, f"model.n_routed_experts must be > 0, got {self.n_routed_experts}")
            require(1 <= self.n_activated_experts <= self.n_routed_experts,
                    f"model.n_activated_experts={self.n_activated_experts} must be between 1 and "
                    f"model.n_routed_experts={self.n_routed_experts}")
            require(self.n_expert_groups >= 1, f"model.n_expert_groups must be >= 1, got {self.n_expert_groups}")
            require(self.n_routed_experts % self.n_expert_groups == 0,
                    f"model.n_routed_experts={self.n_routed_experts} is not divisible by "
                    f"model.n_expert_groups={self.n_expert_groups}")
            require(1 <= self.n_limited_groups <= self.n_expert_groups,
                    f"model.n_limited_groups={self.n_limited_groups} must be between 1 and "
                    f"model.n_expert_groups={self.n_expert_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_expert_groups > 1:
                require(per_group >= 2, f"model.n_expert_groups={self.n_expert_groups} leaves fewer than 2 experts "
                        "per group (a group is scored by its top-2)")
            require(self.n_activated_experts <= self.n_limited_groups * per_group,
                    f"model.n_activated_experts={self.n_activated_experts} exceeds the experts in "
                    f"model.n_limited_groups={self.n_limited_groups} groups ({self.n_limited_groups * per_group})")
            require(self.score_func in ("sigmoid", "softmax"),
                    f"model.score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
            require(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
            require(self.route_scale > 0, f"model.route_scale must be > 0, got {self.route_scale}")
            require(self.bias_update_speed >= 0, f"model.bias_update_speed must be >= 0, got {self.bias_update_speed}")
            require(self.seq_aux_alpha >= 0, f"model.seq_aux_alpha must be >= 0, got {self.seq_aux_alpha}")
        require(self.mtp_depth >= 0, f"model.mtp_depth must be >= 0, got {self.mtp_depth}")
        require(self.mtp_lambda >= 0, f"model.mtp_lambda must be >= 0, got {self.mtp_lambda}")
        require(self.rope_factor >= 1.0, f"model.rope_factor must be >= 1, got {self.rope_factor}")
        require(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        require(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")


# ----------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, checkpoints, logging. Shared by every stage."""

    steps: int = 200
    seq_len: int = 128
    micro_batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (at the end of the batch ramp)
    batch_ramp_tokens: int = 0  # tokens over which the batch grows from batch_ramp_start; 0 = no ramp
    batch_ramp_start: int = 1  # micro-batches per step at the start of the ramp
    # optimizer
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    moment_dtype: str = "fp32"  # "fp32" | "bf16" (DeepSeek-V3 kept AdamW moments in BF16)
    # schedule
    schedule: str = "v3"  # "v3": warmup, constant, cosine, constant tails | "wsd" | "cosine" | "constant"
    warmup_steps: int = 20
    decay_start: float = 0.5  # fraction of steps where the decay begins (v3, wsd)
    decay_end: float = 0.85  # fraction where the cosine ends (v3); tails follow
    tail_lr_ratio: float = 0.33  # v3: second tail = min_lr * this
    # late-phase switches (fractions of steps; 1.0 = never). V3: MTP lambda 0.3 -> 0.1 after
    # 10T of 14.8T tokens (0.676), bias update speed -> 0 for the last 500B (0.966)
    mtp_lambda_late_at: float = 1.0
    mtp_lambda_late: float = 0.1
    bias_freeze_at: float = 1.0
    # precision and determinism
    # compute dtype: "auto" (bf16 on CUDA and on CPUs with a fast bf16 GEMM, else fp32; see
    # moeforge/precision.py) | "bf16" | "fp32"; master weights are always fp32
    dtype: str = "auto"
    seed: int = 1234
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # MLA on CPU: keep only the latents for backward and recompute the up-projections
    # (V3's choice; ~0-8% step time for a quarter of attention's saved bytes)
    recompute_attention: bool = True
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda"
    # evaluation, checkpoints, metrics
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    out_dir: str = "runs"
    run_name: str = "tiny"
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum", "batch_ramp_start",
                     "eval_batches", "keep_last", "log_every", "max_bad_steps"):
            require(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "batch_ramp_tokens", "eval_every", "ckpt_every", "grad_clip", "weight_decay"):
            require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        require(self.batch_ramp_start <= self.grad_accum,
                f"train.batch_ramp_start={self.batch_ramp_start} must be <= train.grad_accum={self.grad_accum}")
        require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"train.min_lr={self.min_lr} must be between 0 and train.lr={self.lr}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        require(self.eps > 0, f"train.eps must be > 0, got {self.eps}")
        require(self.moment_dtype in ("fp32", "bf16"), f"train.moment_dtype must be 'fp32' or 'bf16', got {self.moment_dtype!r}")
        require(self.schedule in ("v3", "wsd", "cosine", "constant"),
                f"train.schedule must be one of v3, wsd, cosine, constant; got {self.schedule!r}")
        require(0 <= self.decay_start <= self.decay_end <= 1,
                f"train.decay_start={self.decay_start} and train.decay_end={self.decay_end} must satisfy 0 <= start <= end <= 1")
        require(self.tail_lr_ratio > 0, f"train.tail_lr_ratio must be > 0, got {self.tail_lr_ratio}")
        require(self.dtype in ("auto", "bf16", "fp32"), f"train.dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")
        require(self.device in ("auto", "cpu", "cuda"), f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("mtp_lambda_late_at", "bias_freeze_at"):
            require(0 <= getattr(self, name) <= 1, f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        require(self.mtp_lambda_late >= 0, f"train.mtp_lambda_late must be >= 0, got {self.mtp_lambda_late}")
        require(bool(self.run_name) and "/" not in self.run_name, f"train.run_name must be a plain name, got {self.run_name!r}")


# ----------------------------------------------------------------------------- parallelism
@dataclass
class ParallelConfig:
    """Sizes of the device mesh. Their product must equal the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"  # "gpipe" | "1f1b" | "interleaved1f1b" | "zbv" | "dualpipev"
    pp_microbatches: int = 4
    reshard_after_forward: bool = True
    param_dtype: str = "fp32"  # FSDP all-gather dtype: "fp32" | "bf16" (gradients reduce in fp32)
    loss_parallel: bool = False  # tp: keep logits vocab-sharded and use a vocabulary-parallel loss
    sequence_parallel: bool = False  # tp: norms and the residual stream on sequence shards between sub-layers

    @property
    def world_size(self) -> int:
        # ep is not a factor: expert parallelism reuses the data-parallel ranks (ep | dp)
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pp rank holds: 2 for the interleaved and V-shaped schedules."""
        return 2 if self.pp_schedule in ("interleaved1f1b", "zbv", "dualpipev") else 1

    def validate(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "pp_microbatches"):
            require(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        require(self.pp_schedule in ("gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev"),
                f"parallel.pp_schedule must be one of gpipe, 1f1b, interleaved1f1b, zbv, dualpipev; got {self.pp_schedule!r}")
        require(self.param_dtype in ("fp32", "bf16"), f"parallel.param_dtype must be 'fp32' or 'bf16', got {self.param_dtype!r}")
        if self.sequence_parallel:
            require(self.tp > 1, f"parallel.sequence_parallel needs parallel.tp > 1, got tp={self.tp}")
            require(self.pp == 1, "parallel.sequence_parallel with parallel.pp > 1 is not supported yet")


# ----------------------------------------------------------------------------- the tree
@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    # post-training stages: what differs from [train] for each (moeforge/train/post_config.py)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        m, p = self.model, self.parallel
        if p.tp > 1:
            require(m.n_heads % p.tp == 0, f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}")
        if p.ep > 1:
            require(m.n_routed_experts % p.ep == 0,
                    f"parallel.ep={p.ep} does not divide model.n_routed_experts={m.n_routed_experts}")
        if p.pp > 1:
            require(m.n_layers >= p.pp, f"parallel.pp={p.pp} exceeds model.n_layers={m.n_layers}")
            stages = p.pp * p.stages_per_rank
            require(m.n_layers >= stages, f"parallel.pp={p.pp} with parallel.pp_schedule={p.pp_schedule!r} needs "
                    f"{stages} stages but model.n_layers={m.n_layers}")
        if p.ep > 1:
            require((p.dp_replicate * p.dp_shard) % p.ep == 0,
                    f"parallel.ep={p.ep} must divide the data-parallel size dp_replicate*dp_shard="
                    f"{p.dp_replicate * p.dp_shard} (experts are spread over data-parallel ranks)")
        if p.sequence_parallel:
            require(self.train.seq_len % p.tp == 0,
                    f"parallel.sequence_parallel: parallel.tp={p.tp} does not divide train.seq_len={self.train.seq_len}")
        if p.tp > 1 and m.attn_type == "mha":
            kv = m.n_kv_heads or m.n_heads
            require(kv % p.tp == 0, f"parallel.tp={p.tp} does not divide model.n_kv_heads={kv}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly convert) one TOML/CLI value against a declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} expects {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), f"{where} expects a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), f"{where} expects a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        require(isinstance(value, bool), f"{where} expects true or false, got {value!r}")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{where} expects an integer, got {value!r}")
        return value
    if tp is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} expects a number, got {value!r}")
        require(math.isfinite(float(value)), f"{where} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        require(isinstance(value, str), f"{where} expects a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        require(isinstance(value, dict), f"{where} expects a table, got {value!r}")
        return _build(tp, value, where)
    raise ConfigError(f"{where} has an unsupported type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        require(key in names, f"unknown key {where + '.' if where else ''}{key}")
        kwargs[key] = _coerce(value, hints[key], f"{where + '.' if where else ''}{key}")
    return cls(**kwargs)


def _parse_cli_value(text: str, tp: Any) -> Any:
    """Turn an override's text into a value of roughly the right shape; _coerce checks it."""
    if tp is str:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # e.g. an unquoted word for a number field: _coerce reports it


def _field_type(path: list[str]) -> Any:
    cls: Any = Config
    for i, part in enumerate(path):
        require(dataclasses.is_dataclass(cls), f"unknown key {'.'.join(path)}")
        hints = typing.get_type_hints(cls)
        require(part in hints, f"unknown key {'.'.join(path[: i + 1])}")
        cls = hints[part]
    return cls


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Merge ``--a.b value`` pairs (or a {"a.b": value} dict) into a raw config dict."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        it = iter(overrides)
        for tok in it:
            require(tok.startswith("--"), f"expected an override like --train.steps 100, got {tok!r}")
            key = tok[2:]
            if "=" in key:
                key, text = key.split("=", 1)
            else:
                text = next(it, None)
                require(text is not None, f"override --{key} needs a value")
            path = key.split(".")
            require(len(path) >= 2, f"override --{key} must name a section and a field, e.g. --train.steps")
            pairs.append((key, _parse_cli_value(text, _field_type(path))))
    for key, value in pairs:
        path = key.split(".")
        _field_type(path)  # unknown keys fail here, with the full dotted name
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"override {key} goes through a non-table value")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a TOML recipe, apply dotted overrides, build and validate the tree."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            # a bare preset name resolves to configs/<name>.toml in the project
            preset = Path(__file__).resolve().parent.parent / "configs" / f"{p.name}.toml"
            require(preset.is_file(), f"config file not found: {path}")
            p = preset
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
    if overrides:
        apply_overrides(raw, overrides)
    return _build(Config, raw, "").validate()
