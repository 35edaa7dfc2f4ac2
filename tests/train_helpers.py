"""Shared by tests/test_train_*.py: a very small model config and tiny learnable token data.

The data is a noisy bigram chain (next = perm[current] with probability 0.9), so a
2-layer model's loss falls visibly within tens of steps. ``write_shards`` stores it in
the data pipeline's on-disk format (manifest + uint16 shards) for subprocess tests;
``MemDataset`` serves it from memory with the TokenDataset interface for in-process ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moeforge.config import Config, load_config

VOCAB = 256

# the tiny MoE of the train, fault and post-training tests (2 layers, dim 64, 4 routed experts);
# vocabulary and context are each suite's own
MODEL = {
    "model.dim": 64, "model.n_layers": 2, "model.n_dense_layers": 1, "model.n_heads": 2,
    "model.inter_dim": 128, "model.moe_inter_dim": 32, "model.n_routed_experts": 4, "model.n_activated_experts": 2,
    "model.n_expert_groups": 1, "model.n_limited_groups": 1, "model.kv_lora_rank": 32, "model.q_lora_rank": 0,
    "model.qk_nope_head_dim": 16, "model.qk_rope_head_dim": 8, "model.v_head_dim": 16, "model.init_std": 0.02,
}

SMALL = {
    **MODEL, "model.vocab_size": VOCAB, "model.max_seq_len": 64, "model.bias_update_speed": 0.01,
    "train.seq_len": 32, "train.micro_batch_size": 4, "train.grad_accum": 1, "train.steps": 10, "train.lr": 3e-3,
    "train.min_lr": 3e-4, "train.warmup_steps": 2, "train.dtype": "fp32", "train.eval_every": 0, "train.eval_batches": 2,
    "train.ckpt_every": 0, "train.log_every": 1, "train.progress": False, "train.device": "cpu",
    "fp8.enabled": False,
}


def config_from(base: dict, tmp: Path, **overrides) -> Config:
    """``base`` with runs in ``tmp/runs``, data in ``tmp/data`` and ``overrides`` (``train__lr`` = ``train.lr``)."""
    over = dict(base, **{"train.out_dir": str(tmp / "runs"), "data.data_dir": str(tmp / "data")})
    over.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, over)


def small_config(tmp: Path, **overrides) -> Config:
    return config_from(SMALL, tmp, **overrides)


def bigram_tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(99).permutation(VOCAB)
    out = np.empty(n, dtype=np.uint16)
    x = 0
    noise = rng.random(n) < 0.1
    rand = rng.integers(0, VOCAB, n)
    for i in range(n):
        out[i] = x
        x = rand[i] if noise[i] else perm[x]
    return out


class MemDataset:
    """TokenDataset stand-in: windows of seq_len+1 at stride seq_len over one array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train"):
        self.tokens, self.seq_len, self.split = torch.from_numpy(tokens.astype(np.int64)), seq_len, split
        self.vocab_size, self.data_dir = VOCAB, Path("<memory>")
        self.manifest = {"tokenizer": {"bytes_per_token": 2.0}}

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1]


def mem_datasets(seq_len: int = 32, n_train: int = 20000, n_val: int = 2000):
    return MemDataset(bigram_tokens(n_train, 0), seq_len), MemDataset(bigram_tokens(n_val, 1), seq_len, "val")


def write_shards(data_dir: Path, n_train: int = 20000, n_val: int = 2000) -> Path:
    """The bigram data in the data pipeline's format (manifest.json + uint16 shards)."""
    from moeforge.data.shards import FORMAT, sha256_file, write_manifest, write_shard

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "tokenizer.json").write_text("{}")  # only its hash is checked by the loader
    splits = {}
    for name, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        entry = write_shard(data_dir / f"{name}_000000.bin", bigram_tokens(n, seed))
        splits[name] = {"tokens": n, "shards": [entry]}
    write_manifest(data_dir, {"format": FORMAT, "vocab_size": VOCAB, "dtype": "uint16", "splits": splits,
                              "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(data_dir / "tokenizer.json"),
                                            "bytes_per_token": 2.0}})
    return data_dir


def losses(run_dir: Path) -> dict[int, float]:
    from moeforge.train.metrics import read_records

    return {r["step"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if r.get("kind") == "train"}
