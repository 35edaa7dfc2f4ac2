"""`moeforge count`: parameter counts of a recipe, built on the meta device (no memory).

Prints total parameters, activated parameters per token (with and without the input
embedding lookup) and the MTP modules' own parameters, as a table or JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from moeforge.config import ModelConfig
from moeforge.model.transformer import Transformer, count_parameters


def count_config(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return count_parameters(model)


def _human(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cli(argv: list[str]) -> int:
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge count", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, cfg = parse_config_args(argv, parser)
    counts = count_config(cfg.model)
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    labels = {
        "total": "total (main model, excl. MTP)",
        "activated": "activated per token",
        "activated_without_embedding": "activated per token, excl. embedding lookup",
        "embedding": "input embedding",
        "head": "output head",
        "mtp_total": "MTP modules (unique)",
        "mtp_activated": "MTP activated per token (unique)",
    }
    for key, label in labels.items():
        print(f"{label:<46} {_human(counts[key]):>9}  ({counts[key]:,})")
    return 0
