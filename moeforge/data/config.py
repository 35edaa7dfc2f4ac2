"""Data settings (the ``[data]`` section of a recipe): sources, filters, dedup, tokenizer, shards.

The data pipeline (``moeforge prepare``) writes token shards plus a manifest into
``data_dir``; trainers read them through ``moeforge.data.loader``.

Choices:
- ``sources`` empty means the built-in corpus (standard-library code, prose taken from its
  docstrings and licence texts, generated math and dialogue; see ``builtin.py``), sized by
  ``builtin_mb``. A recipe can list its own sources as TOML tables instead::

      [[data.sources]]
      domain = "prose"         # any name; mixing weights are per domain
      path = "corpus/books"    # a directory of text files, a .jsonl/.parquet file or a directory of them
      kind = "text"            # "text" | "code" | "jsonl" | "parquet"
      text_key = "text"        # jsonl/parquet only
      weight = 1.0             # share of the training mix (relative to other domains)
      filters = "prose"        # "prose" | "code" | "generated" (default: "code" for kind=code)

- Filter thresholds default to the Gopher / FineWeb values where those exist; every one can be
  overridden (``--data.min_chars 50``) and each drop is counted in the manifest.
- Dedup: exact (hash of normalised text) then MinHash+LSH with ``minhash_buckets`` bands of
  ``minhash_rows`` hashes: the pair-detection probability at Jaccard s is
  1-(1-s^rows)^buckets (14x8: 0.92 at s=0.8, 0.01 at s=0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeforge.errors import require

SOURCE_KINDS = ("text", "code", "jsonl", "parquet")
SOURCE_KEYS = {"domain", "path", "kind", "text_key", "weight", "extensions", "filters"}
FILTER_PROFILES = ("prose", "code", "generated")  # "generated": trusted text, no quality filters or dedup


@dataclass
class DataConfig:
    data_dir: str = "data_cache/tiny"  # token shards + manifest.json
    tokenizer: str = ""  # path to tokenizer.json; empty = <data_dir>/tokenizer.json
    val_fraction: float = 0.02
    seed: int = 1234
    # sources: empty = built-in corpus of about builtin_mb megabytes
    sources: list[dict[str, Any]] = field(default_factory=list)
    builtin_mb: float = 4.0
    weights: dict[str, float] = field(default_factory=dict)  # domain -> mixing weight (overrides source weight)
    # cleaning
    languages: list[str] = field(default_factory=list)  # keep only these (e.g. ["en"]); empty = label only
    min_chars: int = 64
    max_chars: int = 200_000
    max_symbol_ratio: float = 0.1  # '#' and '...' per word (prose)
    min_alpha_words: float = 0.7  # fraction of words containing a letter (prose)
    max_dup_line_frac: float = 0.3  # repeated lines / lines (all text domains)
    max_code_line_len: int = 1000  # longer lines mean minified or generated code
    max_code_avg_line_len: float = 100.0
    min_code_alnum: float = 0.25
    # dedup
    exact_dedup: bool = True
    near_dedup: bool = True
    minhash_ngrams: int = 5
    minhash_buckets: int = 14
    minhash_rows: int = 8
    # tokenizer
    math_level: str = "standard"  # generated math: "standard" (multi-step, word problems) | "easy" (one operation)
    vocab_size: int = 8192
    tokenizer_sample_mb: float = 8.0  # text sampled from the mix to train BPE on
    # shards
    shard_tokens: int = 4_194_304  # tokens per shard file
    workers: int = 0  # datatrove tasks / tokenizer threads; 0 = all cores

    def validate(self) -> None:
        require(bool(self.data_dir), "data.data_dir must not be empty")
        require(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        require(self.builtin_mb > 0, f"data.builtin_mb must be > 0, got {self.builtin_mb}")
        require(self.math_level in ("easy", "standard"),
                 f"data.math_level must be 'easy' or 'standard', got {self.math_level!r}")
        for i, s in enumerate(self.sources):
            where = f"data.sources[{i}]"
            unknown = set(s) - SOURCE_KEYS
            require(not unknown, f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}")
            require(isinstance(s.get("domain"), str) and bool(s.get("domain")), f"{where}.domain must be a non-empty string")
            require(isinstance(s.get("path"), str) and bool(s.get("path")), f"{where}.path must be a non-empty string")
            require(s.get("kind", "text") in SOURCE_KINDS, f"{where}.kind must be one of {', '.join(SOURCE_KINDS)}, got {s.get('kind')!r}")
            require(s.get("filters", "prose") in FILTER_PROFILES,
                     f"{where}.filters must be one of {', '.join(FILTER_PROFILES)}, got {s.get('filters')!r}")
            w = s.get("weight", 1.0)
            require(isinstance(w, (int, float)) and w > 0, f"{where}.weight must be > 0, got {w!r}")
        for d, w in self.weights.items():
            require(isinstance(w, (int, float)) and w >= 0, f"data.weights.{d} must be >= 0, got {w!r}")
        require(self.min_chars >= 1, f"data.min_chars must be >= 1, got {self.min_chars}")
        require(self.max_chars > self.min_chars, f"data.max_chars={self.max_chars} must be > data.min_chars={self.min_chars}")
        for name in ("max_symbol_ratio", "min_alpha_words", "max_dup_line_frac", "min_code_alnum"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, f"data.{name} must be in [0, 1], got {v}")
        require(self.max_code_line_len > 0, f"data.max_code_line_len must be > 0, got {self.max_code_line_len}")
        require(self.max_code_avg_line_len > 0, f"data.max_code_avg_line_len must be > 0, got {self.max_code_avg_line_len}")
        for name in ("minhash_ngrams", "minhash_buckets", "minhash_rows"):
            require(getattr(self, name) >= 1, f"data.{name} must be >= 1, got {getattr(self, name)}")
        require(300 <= self.vocab_size <= 2**32 - 1, f"data.vocab_size must be in [300, 2^32), got {self.vocab_size}")
        require(self.tokenizer_sample_mb > 0, f"data.tokenizer_sample_mb must be > 0, got {self.tokenizer_sample_mb}")
        require(self.shard_tokens >= 1024, f"data.shard_tokens must be >= 1024, got {self.shard_tokens}")
        require(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")
