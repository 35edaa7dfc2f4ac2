"""`moeforge <command>`: one entry point, one module per command.

Choices:
- Each command lives in the module that implements it and exposes ``cli(argv) -> int``;
  this file only maps names to modules (imported lazily, so ``moeforge count`` does not
  pay for tokenizers or the web app).
- Every command that takes a recipe accepts ``--config FILE`` followed by dotted
  overrides (``--train.steps 50``); :func:`parse_config_args` does that for all of them.
- Errors a user can fix (bad config, missing file) print one line and exit 2; tracebacks
  are for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moeforge.config import Config, load_config
from moeforge.errors import ConfigError, UserError
from moeforge.runtime import tune_allocator

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("moeforge.pipeline", "the whole recipe: data, tokenizer, pretrain (FP8), SFT, reward, GRPO, report"),
    "prepare": ("moeforge.data.prepare", "build clean, deduplicated, tokenized shards from sources"),
    "tokenizer": ("moeforge.data.tokenizer", "train or inspect the byte-level BPE tokenizer"),
    "pretrain": ("moeforge.train.pretrain", "pretrain a model on token shards"),
    "sft": ("moeforge.train.sft", "supervised fine-tuning on chat conversations"),
    "reward": ("moeforge.train.reward", "train a reward model on preference pairs"),
    "dpo": ("moeforge.train.dpo", "direct preference optimisation"),
    "grpo": ("moeforge.train.grpo", "group relative policy optimisation with verifiable rewards"),
    "label": ("moeforge.feedback.app", "web app for collecting human preferences"),
    "chat": ("moeforge.generate", "interactive chat with a checkpoint"),
    "export": ("moeforge.model.hf", "export a checkpoint to the Hugging Face DeepSeek-V3 layout"),
    "import": ("moeforge.model.hf", "import a Hugging Face DeepSeek-V3 checkpoint"),
    "count": ("moeforge.model.count", "count total and activated parameters of a config"),
    "plan": ("moeforge.parallel.plan", "show the parallel layout a config would use"),
    "bench": ("moeforge.bench", "run the benchmarks"),
}


def parse_config_args(argv: list[str], parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Config]:
    """Parse a command's own flags plus ``--config FILE`` and dotted overrides.

    Flags containing a dot (``--train.steps``) are config overrides; everything else goes
    to ``parser``. Raises ConfigError with one line on any problem.
    """
    parser.add_argument("--config", default=None, help="TOML recipe (a path, or a preset name like 'tiny')")
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and "." in tok.split("=", 1)[0]:
            overrides.append(tok)
            if "=" not in tok:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {tok} needs a value")
                overrides.append(argv[i + 1])
                i += 1
        else:
            own.append(tok)
        i += 1
    args = parser.parse_args(own)
    cfg = load_config(args.config, overrides)
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(k) for k in COMMANDS)
        print("usage: moeforge <command> [--config FILE] [--section.field value ...]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moeforge: unknown command {name!r} (try `moeforge --help`)", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    tune_allocator()  # before the first large tensor; see runtime.py
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("moeforge"):
            print(f"moeforge: command {name!r} is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    entry = getattr(module, f"cli_{name}", None) or getattr(module, "cli")
    try:
        return int(entry(rest) or 0)
    except ConfigError as e:
        print(f"moeforge {name}: config error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"moeforge {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moeforge {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
