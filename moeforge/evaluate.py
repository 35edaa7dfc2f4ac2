"""Held-out evaluation of a run's checkpoints: math accuracy, answer format, sample generations.

Choices:
- The same greedy evaluation the post-training stages log (``post_common.greedy_eval`` on
  ``math_eval.jsonl``, never trained on) is applied to every stage's final checkpoint,
  so the report can put "after pretrain / after SFT / after GRPO" side by side.
- Each checkpoint rebuilds its model from the config saved inside it (the weights decide
  the architecture), in the compute dtype of the recipe, without FP8 or MTP: evaluation
  measures what the weights learned, not the training numerics.
- Samples are drawn with a fixed seed from a few fixed prompts, so two runs of the same
  recipe show comparable text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from moeforge.config import Config, ModelConfig

SAMPLE_PROMPTS = [  # in the style of the built-in SFT and math data, so samples show what was learned
    "What is 7 + 5?",
    "What is 4 * 3?",
    "How many letters are in the word 'harbor'?",
]


def load_checkpoint_model(cfg: Config, path: Path):
    """The model stored in checkpoint ``path`` (its own saved [model] section), eval mode."""
    from moeforge.train.post_common import load_weights, saved_config
    from moeforge.train.pretrain import build_model, pick_device

    saved = saved_config(path).get("model") or dataclasses.asdict(cfg.model)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    eval_cfg = dataclasses.replace(cfg, model=ModelConfig(**{k: v for k, v in saved.items() if k in names}),
                                   fp8=dataclasses.replace(cfg.fp8, enabled=False))
    model = build_model(eval_cfg, pick_device(cfg.train.device)).drop_mtp()
    load_weights(model, path)
    return model.eval()


@torch.no_grad()
def evaluate_checkpoints(cfg: Config, checkpoints: dict[str, Path], n_problems: int = 100,
                         max_new_tokens: int = 24, n_samples: int = 3) -> dict[str, Any]:
    """Accuracy per stage and a few samples from the last stage's model."""
    from moeforge.generate import generate, stop_ids_of
    from moeforge.train.post_common import (decode_answer, encode_prompt, greedy_eval, load_tokenizer_for,
                                            math_eval_problems)

    tok = load_tokenizer_for(cfg)
    problems = math_eval_problems(cfg, n_problems)
    accuracy: dict[str, dict[str, float]] = {}
    samples: list[dict[str, str]] = []
    for i, (stage, path) in enumerate(checkpoints.items()):
        model = load_checkpoint_model(cfg, path)
        r = greedy_eval(model, tok, problems, max_new_tokens)
        accuracy[stage] = {"accuracy": round(r.get("correct", 0.0), 4), "format": round(r.get("format", 0.0), 4),
                           "answer_tokens": round(r.get("answer_tokens", 0.0), 1)}
        if i == len(checkpoints) - 1 and n_samples:
            prompts = SAMPLE_PROMPTS[:n_samples]
            gen = generate(model, [encode_prompt(tok, p) for p in prompts], 48, temperature=0.7, top_p=0.95,
                           stop_ids=stop_ids_of(tok), seed=cfg.train.seed)
            samples = [{"stage": stage, "prompt": p, "completion": decode_answer(tok, t)}
                       for p, t in zip(prompts, gen.tokens)]
    return {"accuracy": accuracy, "problems": len(problems), "samples": samples,
            "accuracy_note": f"Greedy answers to {len(problems)} held-out math problems (math_eval.jsonl): "
                             "accuracy = exact integer answer; format = 'The answer is N.' closed by <|end|>."}
