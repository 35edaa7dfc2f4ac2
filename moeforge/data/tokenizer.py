"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), special tokens, chat format.

Choices:
- Byte-level BPE with no normaliser and no prefix space: every string, any Unicode, encodes
  and decodes back exactly (``decode(encode(x)) == x``); there is no unknown token.
- Special tokens come first in the vocabulary, in a fixed order, so their ids are the same
  for every vocabulary size: <|bos|>=0, <|eos|>=1, <|pad|>=2, <|system|>=3, <|user|>=4,
  <|assistant|>=5, <|end|>=6.
- Chat format: ``<|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>``.
  :func:`encode_chat` returns a loss mask that is 1 on assistant content and its <|end|>,
  which is what SFT trains on.
- Saved as one ``tokenizer.json``, loadable by ``transformers.PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moeforge.errors import UserError

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ROLES = ("system", "user", "assistant")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path | None = None) -> Tokenizer:
    """Train byte-level BPE on ``texts``; write ``out_path`` atomically when given."""
    tok = Tokenizer(models.BPE())
    # use_regex=True keeps GPT-2's split of words/numbers/punctuation so merges stay inside words
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tok.save(str(tmp))
        os.replace(tmp, out_path)  # a reader never sees half a tokenizer
    return tok


@dataclass
class MoeTokenizer:
    """Thin wrapper: the ``tokenizers.Tokenizer`` plus the ids every stage needs."""

    tok: Tokenizer
    path: str = ""

    def __post_init__(self) -> None:
        ids = {t: self.tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"{self.path or 'tokenizer'}: missing special token(s) {', '.join(missing)}")
        self.bos_id, self.eos_id, self.pad_id = ids["<|bos|>"], ids["<|eos|>"], ids["<|pad|>"]
        self.end_id = ids["<|end|>"]
        self.role_ids = {r: ids[f"<|{r}|>"] for r in ROLES}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def special_ids(self) -> dict[str, int]:
        return {t: self.tok.token_to_id(t) for t in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Encode untrusted text: a typed "<|end|>" stays text, so nobody can forge a role switch."""
        self.tok.encode_special_tokens = True
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # the Rust side runs a batch on all cores (RAYON_NUM_THREADS caps it)
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | Path) -> MoeTokenizer:
    """Load ``tokenizer.json``; a missing, corrupt or incomplete file is a one-line UserError."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"{p}: tokenizer file not found (run `moeforge prepare` or `moeforge tokenizer train`)")
    try:
        json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: tokenizer file is not valid JSON ({e.__class__.__name__}: {e})") from None
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on schema errors
        raise UserError(f"{p}: not a valid tokenizers file ({str(e).splitlines()[0][:200]})") from None
    return MoeTokenizer(tok, str(p))


# ----------------------------------------------------------------------------- chat format
def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")


def render_chat(messages: list[dict], add_generation_prompt: bool = False, bos: bool = True) -> str:
    """The conversation as text with role tokens (special tokens are matched when encoding)."""
    _check_messages(messages)
    out = ["<|bos|>"] if bos else []
    for m in messages:
        out.append(f"<|{m['role']}|>{m['content']}<|end|>")
    if add_generation_prompt:
        out.append("<|assistant|>")
    return "".join(out)


def encode_chat(tok: MoeTokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and a loss mask (1 = train on it: assistant content and its <|end|>)."""
    _check_messages(messages)
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        body = tok.encode_plain(m["content"])
        train = 1 if m["role"] == "assistant" else 0
        ids += [tok.role_ids[m["role"]], *body, tok.end_id]
        mask += [0] + [train] * (len(body) + 1)
    return ids, mask


# ----------------------------------------------------------------------------- CLI
def _read_lines(paths: list[str]) -> Iterator[str]:
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                yield from f
        except FileNotFoundError:
            raise UserError(f"{p}: input file not found") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text (byte {e.start})") from None


def cli(argv: list[str]) -> int:
    """``moeforge tokenizer train|encode``."""
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "encode"], help="train: BPE on the cleaned mix (or --input files); "
                        "encode: show the tokens of TEXT")
    parser.add_argument("text", nargs="?", default="", help="text to encode (encode)")
    parser.add_argument("--input", nargs="*", default=None, help="train on these UTF-8 text files instead of the mix")
    parser.add_argument("--out", default=None, help="where to write tokenizer.json (default: the data config's)")
    args, cfg = parse_config_args(argv, parser)
    out = Path(args.out or cfg.data.tokenizer or Path(cfg.data.data_dir) / "tokenizer.json")
    if args.action == "encode":
        tok = load_tokenizer(out)
        ids = tok.encode(args.text)
        print(json.dumps({"ids": ids, "tokens": [tok.tok.id_to_token(i) for i in ids], "n": len(ids)}, ensure_ascii=False))
        return 0
    if args.input:
        tok = train_tokenizer(_read_lines(args.input), cfg.data.vocab_size, out)
    else:
        from moeforge.data.prepare import build_tokenizer

        tok = build_tokenizer(cfg, out)
    print(f"wrote {out} (vocab {tok.get_vocab_size()})")
    return 0
