"""Pieces the post-training stages share: init checkpoints, JSONL input, pairs, log-probs, math eval, runs.

SFT, the reward model, DPO and GRPO are each a stage on the one loop (``loop.py``); what
they have in common lives here so it is written once:

- :func:`prepare_post` turns (config, init checkpoint) into the effective config of a
  stage: the model section is taken from the init checkpoint (the weights decide the
  architecture; a different ``[model]`` in the recipe is reported, not silently used),
  then ``[train]`` is overridden by the stage's section (``post_config.stage_config``).
- :func:`read_jsonl` reads user files line by line: a bad line is reported with its file
  and line number and skipped, the run continues; only a file with no usable line fails.
- Preference pairs (:func:`load_pairs`) have the labelling app's schema
  ``{"prompt", "chosen", "rejected", "ratings"?}``; with no export, :func:`math_pairs`
  makes them from the verifiable math domain (a correct answer vs a wrong number, a number
  copied from the question, or no answer); :class:`PairStage` walks them for the reward
  model and DPO.
- :func:`token_logprobs` is the one place that turns a forward pass into per-token
  log-probabilities of the given tokens (gather minus logsumexp, no [B,S,V] log-softmax
  copy); DPO's sequence log-probs and GRPO's ratios and KL are built on it.
- Prompts use the chat template of ``moeforge.generate.render_chat`` (shared with SFT
  through ``tokenizer.encode_chat``); an answer is its tokens plus ``<|end|>``.
- :func:`run_post_stage` is the common driver: run directory, config.toml, eval before,
  the loop, eval after, ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moeforge.config import Config
from moeforge.errors import UserError
from moeforge.train import checkpoint as ckpt
from moeforge.train.post_config import stage_config

ANSWER_FORMAT = re.compile(r"The answer is (-?\d+)\.\s*$")


# ----------------------------------------------------------------------------- init checkpoints
def resolve_init(init: str | Path) -> Path:
    """A step directory (verified), or the newest valid step of a run / checkpoints dir."""
    p = Path(init)
    if not p.exists():
        raise UserError(f"--init {p}: no such checkpoint")
    return ckpt.resolve(p, p)


def saved_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text()).get("config", {})


def prepare_post(cfg: Config, section: str, init: str | Path | None) -> tuple[Config, Path]:
    """Effective config of a post-training stage and the verified init checkpoint path."""
    init = init or getattr(cfg, section).init
    if not init:
        raise UserError(f"{section}: no initial checkpoint (pass --init CHECKPOINT or set {section}.init)")
    path = resolve_init(init)
    model_saved = saved_config(path).get("model")
    if model_saved:
        from moeforge.config import ModelConfig

        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model = ModelConfig(**{k: v for k, v in model_saved.items() if k in fields})
        diff = [k for k in sorted(fields) if getattr(model, k) != getattr(cfg.model, k)]
        if diff:
            print(f"[{section}] model config taken from {path} (differs from the recipe in {', '.join(diff[:4])})")
        cfg = dataclasses.replace(cfg, model=model)
    return stage_config(cfg, section), path


def load_weights(model: nn.Module, path: Path, prefix: str = "") -> None:
    """Load ``model.safetensors`` (or a sharded checkpoint's model) of ``path`` into ``model``
    (keys under ``prefix``).

    MTP modules may be absent on either side (post-training stages other than SFT drop
    them); every other tensor must match by name and shape.
    """
    from moeforge.train import distributed

    if distributed.is_sharded(path):  # written under torchrun
        tensors = distributed.read_model(path)
    else:
        tensors = ckpt.load_tensors(path, "model.safetensors")
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = model.state_dict()
    for k, v in want.items():
        if k not in tensors:
            if k.startswith("mtp."):
                continue
            raise UserError(f"checkpoint {path} lacks tensor {prefix}{k} (a different model?)")
        if tensors[k].shape != v.shape:
            raise UserError(f"checkpoint {path}: tensor {prefix}{k} has shape {tuple(tensors[k].shape)}, the model "
                            f"expects {tuple(v.shape)}")
    model.load_state_dict({k: v for k, v in tensors.items() if k in want}, strict=False)


def build_from(cfg: Config, path: Path, device: torch.device, keep_mtp: bool = False):
    """The trainer's model (dtype, FP8, compile as configured) with the init weights loaded."""
    import os

    from moeforge.train.pretrain import build_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # their data is not split across ranks yet; every rank would repeat the same work
        raise UserError("post-training stages run in one process for now: launch them without torchrun")
    model = build_model(cfg, device)
    if not keep_mtp:
        model.drop_mtp()
    load_weights(model, path)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference model: same weights, no gradients, eval mode (DPO and GRPO)."""
    import copy

    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def load_tokenizer_for(cfg: Config):
    from moeforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer or Path(cfg.data.data_dir) / "tokenizer.json")
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"tokenizer vocabulary {tok.vocab_size} exceeds model.vocab_size={cfg.model.vocab_size}")
    return tok


# ----------------------------------------------------------------------------- JSONL input
def read_jsonl(path: str | Path, parse: Callable[[Any], Any], what: str) -> tuple[list[Any], list[str]]:
    """Records ``parse(obj)`` of each line; a line that is not JSON or that ``parse`` rejects
    (by raising ValueError/KeyError/TypeError) is reported as ``file:line: reason`` and skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found")
    good, bad = [], []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                good.append(parse(obj))
            except UnicodeDecodeError:
                bad.append(f"{p}:{n}: not UTF-8")
            except json.JSONDecodeError as e:
                bad.append(f"{p}:{n}: not valid JSON ({e.msg})")
            except (ValueError, KeyError, TypeError) as e:
                bad.append(f"{p}:{n}: {e}")
    for msg in bad[:10]:
        print(f"warning: skipped {msg}")
    if len(bad) > 10:
        print(f"warning: ... and {len(bad) - 10} more invalid lines in {p}")
    if not good:
        raise UserError(f"{p}: no valid {what} ({len(bad)} invalid lines{'; first: ' + bad[0] if bad else ''})")
    return good, bad


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, at least one item on each side."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = min(max(1, round(len(items) * fraction)), len(items) - 1)
    if n_val < 1:
        raise UserError(f"need at least 2 examples to hold some out, got {len(items)}")
    return items[n_val:], items[:n_val]


# ----------------------------------------------------------------------------- chat encoding
def prompt_messages(prompt: Any) -> list[dict]:
    """A pair's or problem's prompt: a user string, or a list of chat messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise ValueError("prompt must be a string or a list of {role, content} messages")


def encode_prompt(tok, prompt: Any) -> list[int]:
    from moeforge.generate import render_chat

    try:
        return render_chat(prompt_messages(prompt), tok)
    except UserError as e:  # a malformed message inside a list prompt
        raise ValueError(str(e)) from None


def encode_answer(tok, text: str) -> list[int]:
    return tok.encode(text) + [tok.end_id]


# ----------------------------------------------------------------------------- preference pairs
def _parse_pair(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise ValueError("a pair must be a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
    prompt_messages(obj["prompt"])
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"field {key!r} must be a non-empty string")
    if obj["chosen"] == obj["rejected"]:
        raise ValueError("chosen and rejected are the same text")
    return {"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"],
            "ratings": obj.get("ratings")}


def load_pairs(path: str | Path) -> tuple[list[dict], list[str]]:
    """Preference pairs from JSONL (the labelling app's export); bad lines reported and skipped."""
    return read_jsonl(path, _parse_pair, "preference pairs")


def math_pairs(n: int, seed: int, level: str = "standard") -> list[dict]:
    """``n`` pairs from the verifiable math domain: the correct answer is chosen over a wrong one.

    Wrong answers, in equal shares: a nearby wrong number, a number copied from the
    question, or no number at all — from hard to easy to tell apart.
    """
    from moeforge.data.synthetic import make_math_problem

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, ans = make_math_problem(rng, level)
        a = int(ans)
        kind = rng.randrange(3)
        if kind == 0:
            wrong = f"The answer is {a + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])}."
        elif kind == 1:
            nums = [x for x in re.findall(r"\d+", prompt) if int(x) != a] or [str(a + 1)]
            wrong = f"The answer is {rng.choice(nums)}."
        else:
            wrong = rng.choice(["I am not sure.", "Let me think about it.", "That depends on the numbers."])
        out.append({"prompt": prompt, "chosen": f"The answer is {a}.", "rejected": wrong, "ratings": None})
    return out


def pairs_source(path: str | Path | None, n_generated: int, seed: int,
                 level: str = "standard") -> tuple[list[dict], str, int]:
    """(pairs, description, invalid lines): the export when given, else generated math pairs."""
    if path:
        pairs, bad = load_pairs(path)
        return pairs, f"preference pairs from {path}", len(bad)
    return math_pairs(n_generated, seed, level), f"{n_generated} pairs generated from the verifiable math domain", 0


def encode_pairs(tok, pairs: list[dict], max_len: int) -> tuple[list[dict], int]:
    """Token ids of each pair: prompt ids, chosen and rejected answer ids. Pairs whose longer
    sequence exceeds ``max_len`` tokens are skipped and counted."""
    out, too_long = [], 0
    for p in pairs:
        prompt = encode_prompt(tok, p["prompt"])
        ch, rj = encode_answer(tok, p["chosen"]), encode_answer(tok, p["rejected"])
        if len(prompt) + max(len(ch), len(rj)) > max_len:
            too_long += 1
            continue
        out.append({"prompt": prompt, "chosen": ch, "rejected": rj, "ratings": p.get("ratings")})
    if too_long:
        print(f"warning: {too_long} pair(s) longer than {max_len} tokens skipped")
    if not out:
        raise UserError(f"no preference pair fits in {max_len} tokens")
    return out, too_long


class PairStage:
    """What the pair stages (reward model, DPO) share: a seeded walk over the training pairs,
    reshuffled each epoch and resumable (``state_dict``), ``micro_batch_size`` pairs a batch, and
    held-out evaluation in chunks of that size.

    A subclass gives ``batch_of(pairs)`` (a batch with ``tokens``) and ``heldout_sums(model,
    batch, n)``: the sums over the ``n`` pairs of ``batch`` of each held-out number;
    :meth:`evaluate` returns their means over all held-out pairs."""

    def __init__(self, cfg: Config, tok, train_pairs: list[dict], val_pairs: list[dict], device):
        self.cfg, self.tok, self.device = cfg, tok, device
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.tokens_per_batch = 2 * cfg.train.micro_batch_size * cfg.train.seq_len
        self.epoch, self.pos = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train_pairs)))
        random.Random(self.cfg.train.seed * 1000 + epoch).shuffle(order)
        return order

    def batch_of(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def heldout_sums(self, model, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        raise NotImplementedError

    def next_batch(self):
        take = []
        while len(take) < self.cfg.train.micro_batch_size:
            if self.pos >= len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            take.append(self.train_pairs[self.order[self.pos]])
            self.pos += 1
        batch = self.batch_of(take)
        self.tokens_per_batch = batch["tokens"].numel()  # real padded size, for tokens/s and MFU
        return batch

    def evaluate(self, model) -> dict[str, float]:
        sums: dict[str, float] = {}
        mbs, n = self.cfg.train.micro_batch_size, 0
        for s in range(0, len(self.val_pairs), mbs):
            chunk = self.val_pairs[s: s + mbs]
            for k, v in self.heldout_sums(model, self.batch_of(chunk), len(chunk)).items():
                sums[k] = sums.get(k, 0.0) + v
            n += len(chunk)
        return {k: v / n for k, v in sums.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.order = self._order(self.epoch)


def pad_rows(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] token ids and the lengths [B]."""
    width = max(len(r) for r in rows)
    t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        t[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return t.to(device), torch.tensor([len(r) for r in rows], device=device)


def response_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """prompt+answer rows, right-padded, and a mask [B, L-1] over the answer tokens aligned
    with :func:`token_logprobs` (position t scores token t+1)."""
    tokens, lengths = pad_rows([p + a for p, a in zip(prompts, answers)], pad_id, device)
    pos = torch.arange(tokens.shape[1] - 1, device=device)[None]
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)[:, None]
    mask = (pos >= start) & (pos < lengths[:, None] - 1)
    return {"tokens": tokens, "mask": mask.float(), "lengths": lengths}


# ----------------------------------------------------------------------------- log-probs
def token_logprobs(model: nn.Module, tokens: torch.Tensor):
    """(log p(tokens[:, t+1] | tokens[:, :t+1]) as [B, L-1] FP32, the ModelOutput)."""
    out = model(tokens[:, :-1], with_mtp=False)
    logits = out.logits.float()
    picked = logits.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1), out


def add_moe_parts(parts: dict[str, torch.Tensor], out, cfg: Config) -> dict[str, torch.Tensor]:
    """Sequence-balance loss and expert counts, as pretraining has them (keeps MoE balanced)."""
    if out.aux_loss is not None and cfg.model.seq_aux_alpha > 0:
        aux = cfg.model.seq_aux_alpha * out.aux_loss
        parts["loss"] = parts["loss"] + aux
        parts["aux"] = aux.detach()
    if out.expert_counts is not None:
        parts["expert_counts"] = out.expert_counts
    return parts


# ----------------------------------------------------------------------------- math problems
def score_math(text: str, finished: bool, answer: str) -> dict[str, float]:
    """Rule-based verdict on a completion: exact integer answer, and the trained format
    ("... The answer is N." closed by the end token)."""
    from moeforge.data.synthetic import check_answer

    return {"correct": float(check_answer(text, answer)),
            "format": float(finished and ANSWER_FORMAT.search(text) is not None)}


def math_eval_problems(cfg: Config, n: int) -> list[dict]:
    """The first ``n`` held-out problems of ``math_eval.jsonl`` (generated ones when absent)."""
    if n <= 0:
        return []
    path = Path(cfg.data.data_dir) / "math_eval.jsonl"
    if path.is_file():
        probs, _ = read_jsonl(path, lambda o: {"prompt": o["prompt"], "answer": str(o["answer"])}, "math problems")
        return probs[:n]
    from moeforge.data.synthetic import make_math_problem

    rng = random.Random(cfg.data.seed + 7919)  # not the SFT or GRPO stream
    return [dict(zip(("prompt", "answer"), make_math_problem(rng, cfg.data.math_level))) for _ in range(n)]


def decode_answer(tok, tokens: list[int]) -> str:
    return tok.decode([t for t in tokens if t not in (tok.end_id, tok.eos_id)])


@torch.no_grad()
def greedy_eval(model, tok, problems: list[dict], max_new_tokens: int,
                judge: Callable[[dict, str, bool], dict[str, float]] | None = None, batch: int = 64) -> dict[str, float]:
    """Greedy answers to ``problems``; the mean of each score ``judge`` returns (default: math)."""
    from moeforge.generate import generate, stop_ids_of

    judge = judge or (lambda prob, text, fin: score_math(text, fin, prob["answer"]))
    totals: dict[str, float] = {}
    length = 0
    for s in range(0, len(problems), batch):
        chunk = problems[s: s + batch]
        gen = generate(model, [encode_prompt(tok, p["prompt"]) for p in chunk], max_new_tokens, temperature=0.0,
                       stop_ids=stop_ids_of(tok))
        for prob, toks, fin in zip(chunk, gen.tokens, gen.finished):
            for k, v in judge(prob, decode_answer(tok, toks), fin).items():
                totals[k] = totals.get(k, 0.0) + v
            length += len(toks)
    n = max(len(problems), 1)
    return {**{k: v / n for k, v in totals.items()}, "answer_tokens": length / n}


# ----------------------------------------------------------------------------- the driver
def open_run(cfg: Config, resume: str | Path | None) -> tuple[Path, Path | None]:
    """Run directory (writable, config.toml written) and the checkpoint to resume, if any."""
    from moeforge.train.metrics import config_toml, prepare_run_dir

    run_dir = prepare_run_dir(cfg)
    root = run_dir / "checkpoints"
    resume_path = ckpt.resolve(resume, root) if resume is not None else None
    if resume_path is None and ckpt.step_dirs(root):
        raise UserError(f"{root} already holds checkpoints: pass --resume to continue that run, or choose "
                        "another run name (--<section>.run_name or --train.run_name)")
    (run_dir / "config.toml").write_text(config_toml(cfg))
    return run_dir, resume_path


def evaluate_now(model: nn.Module, stage) -> dict[str, float]:
    from moeforge.train.loop import evaluate

    return evaluate(model, stage)


def _final_eval(run_dir: Path, step: int) -> dict[str, float] | None:
    """The loop's own evaluation at the last step, when it made one (no need to repeat it)."""
    from moeforge.train.metrics import read_records

    evals = [r for r in read_records(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    if evals and evals[-1].get("step") == step:
        return {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    return None


def run_post_stage(name: str, cfg: Config, model: nn.Module, stage, run_dir: Path, resume: Path | None,
                   info: dict[str, Any], derive: Callable[[dict | None, dict], dict] | None = None):
    """Eval before, the shared loop, eval after; ``summary.json`` in the run dir; the TrainResult.

    ``derive(before, after)`` adds headline numbers (held-out accuracy, gains) to the summary."""
    import time

    from moeforge.train.loop import train

    t0 = time.perf_counter()
    before = evaluate_now(model, stage) if resume is None else None
    t_eval = time.perf_counter() - t0
    result = train(model, stage, cfg, run_dir, resume=resume)
    after = _final_eval(run_dir, result.step) or evaluate_now(model, stage)
    summary = {"stage": name, **info, "status": result.status, "steps": result.step,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "eval_before": before, "eval_after": after, "train": result.summary, "eval_s": t_eval}
    if derive is not None:
        summary.update(derive(before, after))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    result.summary = {**result.summary, **{k: v for k, v in summary.items() if k != "train"}}

    def fmt(d):
        return ", ".join(f"{k} {v:.4g}" for k, v in d.items()) if d else "-"

    print(f"[{name}] {result.status} after {result.step} steps; eval before: {fmt(before)}")
    print(f"[{name}] eval after: {fmt(after)}")
    print(f"[{name}] summary: {run_dir / 'summary.json'}; checkpoint: {result.checkpoint}")
    return result


def stage_cli(argv: list[str], section: str, doc: str, run: Callable[..., Any],
              flag: tuple[str, str] | None = None) -> int:
    """``moeforge <section> --config ... --init CKPT [--resume] [FLAG] [overrides]``: parse, then
    ``run(cfg, init, [FLAG's value,] resume=...)``; returns the exit code (130 when interrupted).

    ``flag`` is (name, help) of the stage's one input option (``--pairs``, ``--reward-model``)."""
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog=f"moeforge {section}", description=doc.splitlines()[0])
    parser.add_argument("--init", default=None, help="checkpoint to start from: a step directory or a run directory "
                        f"(default: {section}.init)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from this stage's latest checkpoint, or from PATH")
    if flag:
        parser.add_argument(flag[0], dest="input", metavar=flag[0].lstrip("-").replace("-", "_").upper(), default=None,
                            help=flag[1])
    args, cfg = parse_config_args(argv, parser)
    sec = getattr(cfg, section)
    if not sec.run_name:  # a stage run must not land in (and be refused by) the pretraining run dir
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sec, run_name=f"{cfg.train.run_name}-{section}")})
    result = run(cfg, args.init, *((args.input,) if flag else ()), resume=args.resume)
    return 130 if result.status == "interrupted" else 0
