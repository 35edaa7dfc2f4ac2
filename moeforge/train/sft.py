"""`moeforge sft`: supervised fine-tuning on chat conversations, a stage on the shared loop.

    moeforge sft --config configs/tiny.toml --init runs/tiny [--sft.steps 200 ...]

Input schema (JSONL, one conversation per line; ``moeforge.data.synthetic`` documents it)::

    {"messages": [{"role": "system", "content": "..."},     # optional
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Choices:
- The chat template is the one generation uses (``tokenizer.encode_chat``, which
  ``generate.render_chat`` wraps): role tokens are single special ids, so no content can
  forge a turn. The loss covers assistant content and its ``<|end|>`` (so the model learns
  to stop) and nothing else: system, user, role tokens, BOS and padding are IGNORE.
- Packing: whole conversations are laid end to end into rows of ``seq_len + 1`` tokens
  (next-fit in a seeded order, reshuffled every epoch), the rest of a row is padding. A
  conversation is never split, so every answer sees its own prompt; a conversation longer
  than a row is skipped and counted. Conversations in one row can attend to earlier ones
  (the model has no document mask), exactly as in pretraining, where ``<|bos|>`` marks the
  boundary.
- Loss = ``lm_loss`` of pretraining (CE + MTP + sequence balance) on the masked labels, so
  MTP keeps training and the checkpoint layout stays that of the base model.
- Invalid lines (not JSON, wrong schema, no assistant turn) are reported with file and
  line number and skipped; the count goes into ``summary.json``.
- Domain recipes are configs: ``configs/sft-math.toml`` (``sft.data = "builtin:math"``,
  conversations generated from the verifiable math domain) and ``configs/sft-code.toml``
  (``sft.data = "builtin:code"``: "write this standard-library function" conversations).
- Evaluation: masked CE on held-out conversations, and greedy accuracy on held-out math
  problems (``math_eval.jsonl``) when ``sft.eval_problems`` > 0.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

import torch

from moeforge.config import Config
from moeforge.data.tokenizer import ROLES, encode_chat
from moeforge.errors import UserError
from moeforge.train.losses import IGNORE, lm_loss, token_ce
from moeforge.train.post_common import (build_from, greedy_eval, load_tokenizer_for, math_eval_problems, open_run,
                                        prepare_post, read_jsonl, run_post_stage, split_holdout, stage_cli)

BUILTIN_MATH_CONVERSATIONS = 3000
BUILTIN_CODE_CONVERSATIONS = 2000


# ----------------------------------------------------------------------------- data
def parse_conversation(obj: Any) -> list[dict]:
    """The messages of one JSONL record; ValueError says what is wrong with it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise ValueError('expected {"messages": [{"role", "content"}, ...]}')
    msgs = obj["messages"]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: needs a role in {ROLES} and a string content")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise ValueError("no non-empty assistant message (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def math_conversations(n: int, seed: int, level: str = "standard") -> list[list[dict]]:
    """Problem -> "The answer is N." turns from the verifiable math domain (the GRPO format)."""
    from moeforge.data.synthetic import make_math_problem

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, ans = make_math_problem(rng, level)
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": f"The answer is {ans}."}])
    return out


def code_conversations(n: int, seed: int, max_chars: int = 600) -> list[list[dict]]:
    """"Write function f of module m that <docstring line>" -> its source, from the stdlib."""
    from moeforge.data.builtin import stdlib_files

    out: list[list[dict]] = []
    for path in stdlib_files(random.Random(seed)):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            body = ast.get_source_segment(src, node) if doc else None
            if body and len(body) <= max_chars:
                ask = f"Write the Python function `{node.name}` of module `{path.stem}`: {doc.splitlines()[0]}"
                out.append([{"role": "user", "content": ask}, {"role": "assistant", "content": body}])
                if len(out) >= n:
                    return out
    return out


def load_conversations(cfg: Config) -> tuple[list[list[dict]], str, int]:
    """(conversations, where they came from, invalid lines skipped)."""
    src = cfg.sft.data
    if src == "builtin:math":
        convs = math_conversations(BUILTIN_MATH_CONVERSATIONS, cfg.data.seed, cfg.data.math_level)
        return convs, "builtin:math (generated)", 0
    if src == "builtin:code":
        convs = code_conversations(BUILTIN_CODE_CONVERSATIONS, cfg.data.seed)
        if len(convs) < 2:
            raise UserError("builtin:code: too few standard-library functions found")
        return convs, "builtin:code (standard-library functions)", 0
    path = Path(src) if src else Path(cfg.data.data_dir) / "sft.jsonl"
    if not src and not path.is_file():
        raise UserError(f"{path}: no SFT conversations (run `moeforge prepare`, or set sft.data)")
    convs, bad = read_jsonl(path, parse_conversation, "conversations")
    return convs, str(path), len(bad)


def encode_examples(tok, convs: list[list[dict]], row_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, loss mask) per conversation; those longer than a row are skipped and counted."""
    out, too_long = [], 0
    for msgs in convs:
        ids, mask = encode_chat(tok, msgs)
        if len(ids) > row_len:
            too_long += 1
            continue
        out.append((ids, mask))
    return out, too_long


def pack_rows(examples: list[tuple[list[int], list[int]]], row_len: int, pad_id: int,
              order: list[int]) -> list[tuple[list[int], list[int]]]:
    """Next-fit packing of whole examples (in ``order``) into rows of exactly ``row_len``."""
    rows, ids, mask = [], [], []
    for i in order:
        e_ids, e_mask = examples[i]
        if len(ids) + len(e_ids) > row_len:
            rows.append((ids + [pad_id] * (row_len - len(ids)), mask + [0] * (row_len - len(ids))))
            ids, mask = [], []
        ids, mask = ids + e_ids, mask + e_mask
    if ids:
        rows.append((ids + [pad_id] * (row_len - len(ids)), mask + [0] * (row_len - len(ids))))
    return rows


def rows_to_batch(rows: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, S], labels [B, S]): label t is token t+1 where the mask trains on it, else IGNORE."""
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
    return ids[:, :-1].to(device), labels.to(device)


# ----------------------------------------------------------------------------- the stage
class SFTStage:
    """Packed conversations -> masked next-token loss; eval = held-out CE + math accuracy."""

    def __init__(self, cfg: Config, tok, train_convs: list[list[dict]], val_convs: list[list[dict]], device,
                 eval_problems: list[dict] | None = None):
        tc = cfg.train
        self.cfg, self.tok, self.device = cfg, tok, device
        self.row_len = tc.seq_len + 1
        self.examples, self.skipped_long = encode_examples(tok, train_convs, self.row_len)
        val_examples, val_long = encode_examples(tok, val_convs, self.row_len)
        self.skipped_long += val_long
        if not self.examples:
            raise UserError(f"no conversation fits in sft.seq_len+1 = {self.row_len} tokens")
        self.val_rows = pack_rows(val_examples, self.row_len, tok.pad_id, list(range(len(val_examples))))
        self.eval_problems = eval_problems or []
        self.tokens_per_batch = tc.micro_batch_size * tc.seq_len
        self.epoch, self.pos = 0, 0
        self.rows = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list:
        order = list(range(len(self.examples)))
        random.Random(self.cfg.train.seed * 1000 + epoch).shuffle(order)
        return pack_rows(self.examples, self.row_len, self.tok.pad_id, order)

    def next_batch(self):
        mbs = self.cfg.train.micro_batch_size
        take = []
        while len(take) < mbs:
            if self.pos >= len(self.rows):
                self.epoch, self.pos = self.epoch + 1, 0
                self.rows = self._epoch_rows(self.epoch)
            n = min(mbs - len(take), len(self.rows) - self.pos)
            take += self.rows[self.pos: self.pos + n]
            self.pos += n
        return rows_to_batch(take, self.device)

    def loss(self, model, batch, step: int) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        out = model(inputs, labels=labels)  # head and CE fused
        parts = lm_loss(out, labels, self.cfg.model)
        if out.expert_counts is not None:
            parts["expert_counts"] = out.expert_counts
        return parts

    def evaluate(self, model) -> dict[str, float]:
        res: dict[str, float] = {}
        if self.val_rows:
            total, count = 0.0, 0
            mbs = self.cfg.train.micro_batch_size
            for s in range(0, len(self.val_rows), mbs):
                inputs, labels = rows_to_batch(self.val_rows[s: s + mbs], self.device)
                out = model(inputs, with_mtp=False)
                total += token_ce(out.logits, labels, reduction="sum").item()
                count += int((labels != IGNORE).sum())
            res["loss"] = total / max(count, 1)
        if self.eval_problems:
            ev = greedy_eval(model, self.tok, self.eval_problems, self.cfg.sft.eval_max_new_tokens)
            res.update(math_accuracy=ev["correct"], math_format=ev["format"])
        return res

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.rows = self._epoch_rows(self.epoch)


# ----------------------------------------------------------------------------- entry points
def sft(cfg: Config, init: Path | str | None = None, resume: str | Path | None = None):
    """Fine-tune the checkpoint ``init`` on conversations; returns the loop's TrainResult
    (``summary`` also written to ``<run>/summary.json``)."""
    from moeforge.train.pretrain import pick_device

    cfg, init_path = prepare_post(cfg, "sft", init)
    run_dir, resume_path = open_run(cfg, resume)
    tok = load_tokenizer_for(cfg)
    convs, source, n_bad = load_conversations(cfg)
    train_convs, val_convs = split_holdout(convs, cfg.sft.val_fraction, cfg.train.seed)
    device = pick_device(cfg.train.device)
    model = build_from(cfg, init_path, device, keep_mtp=True)
    stage = SFTStage(cfg, tok, train_convs, val_convs, device, math_eval_problems(cfg, cfg.sft.eval_problems))
    print(f"[sft] {len(stage.examples)} conversations from {source} -> {len(stage.rows)} packed rows of "
          f"{stage.row_len} tokens; {n_bad} invalid lines and {stage.skipped_long} too-long conversations skipped")
    info = {"init": str(init_path), "data": source, "train_conversations": len(stage.examples),
            "val_conversations": len(val_convs), "invalid_lines": n_bad, "too_long": stage.skipped_long}
    return run_post_stage("sft", cfg, model, stage, run_dir, resume_path, info)


def cli(argv: list[str]) -> int:
    return stage_cli(argv, "sft", __doc__, sft)
