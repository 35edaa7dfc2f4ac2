"""Shared by tests/test_post_*.py: a tiny world for the post-training stages.

``tiny_world(tmp)`` builds, in seconds, what the stages read from disk: a small BPE
tokenizer (with the chat special tokens) trained on generated math and dialogue text,
``sft.jsonl`` and ``math_eval.jsonl`` in the data directory, and an init checkpoint of a
randomly initialised 2-layer, dim-64 MoE model in the checkpoint format of the loop.

``single_thread`` (autouse where imported) runs each test on one torch thread: on a
shared 2-core machine, tiny tensors are ~10x slower with two contending threads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from moeforge.config import Config
from moeforge.data.synthetic import make_dialogue, make_math_document, make_math_problem
from moeforge.data.tokenizer import load_tokenizer, render_chat, train_tokenizer
from moeforge.model.transformer import Transformer
from moeforge.train import checkpoint as ckpt
from train_helpers import MODEL, config_from

VOCAB = 512

TINY = {
    **MODEL, "model.vocab_size": VOCAB, "model.max_seq_len": 256, "model.mtp_depth": 1,
    "train.dtype": "fp32", "train.device": "cpu", "train.progress": False, "train.log_every": 1, "fp8.enabled": False,
}


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(tmp: Path, **overrides) -> Config:
    return config_from(TINY, tmp, **overrides)


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_world(tmp: Path, seed: int = 0) -> tuple[Config, Path]:
    """(config, init checkpoint path) with tokenizer, sft.jsonl and math_eval.jsonl on disk."""
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = [make_math_document(rng) for _ in range(300)]
    texts += [render_chat(make_dialogue(rng)["messages"], bos=False) for _ in range(300)]
    if not (data / "tokenizer.json").is_file():
        train_tokenizer(texts, VOCAB, data / "tokenizer.json")
    write_jsonl(data / "sft.jsonl", [make_dialogue(rng) for _ in range(200)])
    write_jsonl(data / "math_eval.jsonl", [dict(zip(("prompt", "answer"), make_math_problem(rng))) for _ in range(50)])
    cfg = tiny_config(tmp)
    assert load_tokenizer(data / "tokenizer.json").vocab_size <= VOCAB
    return cfg, save_init(cfg, tmp / "init")


def save_init(cfg: Config, root: Path, model: torch.nn.Module | None = None) -> Path:
    """A checkpoint of ``model`` (default: a fresh seeded one) that the stages accept as --init."""
    if model is None:
        torch.manual_seed(0)
        model = Transformer(cfg.model)
    return ckpt.save(root / "checkpoints", 0, dict(model.state_dict()), {}, {"config": cfg.to_dict()}, keep_last=1)
