"""Tokenize, split, mix and pack the cleaned documents into shards.

Choices:
- A document becomes ``<|bos|> text <|eos|>``; documents are concatenated into one stream per
  split and cut into shards of ``shard_tokens``. Sequences are not fixed here: the loader
  takes windows of ``seq_len + 1`` from the stream, so one set of shards serves any context
  length, and packing wastes nothing but each shard's tail (< one window).
- Train/validation split per document by a hash of its id, so the split does not depend on
  the order or number of workers, and a document is never in both.
- Mixing: each domain gets a share ``weight / sum(weights)`` of the training tokens. With no
  weights given the shares are the natural ones (every domain once). A domain whose share is
  above its natural share is up-sampled (whole extra epochs plus a seeded sample of
  documents); one below is down-sampled. The epochs per domain go into the manifest.
  Validation keeps natural proportions (no repeats) so its loss is comparable across mixes.
- Tokenization runs in batches through the Rust tokenizer on all cores, with a progress bar.
- The documents of a split are held in memory (fine for the built-in corpus and tens of MB);
  larger corpora would stream per shard, which this layout already allows.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
from rich.progress import Progress

from moeforge.data.shards import token_dtype, write_shard
from moeforge.data.tokenizer import MoeTokenizer

BATCH = 256


def read_docs(folders: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """{domain: [(id, text)]} from datatrove JSONL output folders, sorted by id (deterministic)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    d = json.loads(line)
                    domain = d.get("metadata", {}).get("domain") or path.parent.name
                    out.setdefault(domain, []).append((str(d["id"]), d["text"]))
    for docs in out.values():
        docs.sort()
    return out


def is_val(doc_id: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def tokenizer_sample(docs: dict[str, list[tuple[str, str]]], weights: dict[str, float], budget_bytes: int,
                     seed: int):
    """Texts for BPE training: each domain contributes its mixing share of ``budget_bytes``."""
    rng = random.Random(seed)
    total_w = sum(weights.values())
    for domain in sorted(docs):
        items = list(docs[domain])
        rng.shuffle(items)
        quota = budget_bytes * weights[domain] / total_w
        used = 0
        for _, text in items:
            if used >= quota:
                break
            yield text
            used += len(text.encode("utf-8"))


def encode_domains(tok: MoeTokenizer, docs: dict[str, list[tuple[str, str]]]) -> dict[str, list[np.ndarray]]:
    """Each document as ``bos + ids + eos`` in a compact array."""
    dtype = token_dtype(tok.vocab_size)
    total = sum(len(v) for v in docs.values())
    out: dict[str, list[np.ndarray]] = {}
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("tokenizing", total=total)
        for domain in sorted(docs):
            texts = [t for _, t in docs[domain]]
            arrs = []
            for i in range(0, len(texts), BATCH):
                for ids in tok.encode_batch(texts[i: i + BATCH]):
                    arrs.append(np.array([tok.bos_id, *ids, tok.eos_id], dtype=dtype))
                progress.advance(task, min(BATCH, len(texts) - i))
            out[domain] = arrs
    return out


def mix_plan(tokens: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    """Epochs per domain so that domain shares match the weights, total = natural total."""
    total = sum(tokens.values())
    wsum = sum(weights[d] for d in tokens if tokens[d] > 0)
    return {d: (total * weights[d] / wsum / n if n and wsum else 0.0) for d, n in tokens.items()}


def sample_epochs(n_docs: int, epochs: float, rng: random.Random) -> list[int]:
    """Document indices for ``epochs`` passes: whole passes, then a seeded sample for the fraction."""
    whole, frac = int(epochs), epochs - int(epochs)
    idx = list(range(n_docs)) * whole
    idx += rng.sample(range(n_docs), round(frac * n_docs))
    return idx


def write_split(out_dir: Path, split: str, arrays: list[np.ndarray], shard_tokens: int, dtype: str) -> list[dict]:
    """Concatenate documents and cut into shards of ``shard_tokens``; return manifest entries."""
    stream = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    entries = []
    for i, start in enumerate(range(0, max(1, stream.size), shard_tokens)):
        part = stream[start: start + shard_tokens]
        if part.size == 0:
            break
        entries.append(write_shard(out_dir / f"{split}_{i:05d}.bin", part))
    return entries


def pack(tok: MoeTokenizer, docs: dict[str, list[tuple[str, str]]], weights: dict[str, float] | None, dcfg,
         out_dir: Path) -> dict:
    """Split, encode, mix, write shards; return the manifest's ``splits`` and ``domains``.
    ``weights`` empty/None: natural proportions (every domain exactly one epoch)."""
    dtype = token_dtype(tok.vocab_size)
    rng = random.Random(dcfg.seed)
    enc = encode_domains(tok, docs)
    train: dict[str, list[np.ndarray]] = {}
    val: list[np.ndarray] = []
    domains: dict[str, dict] = {}
    for d in sorted(docs):
        flags = [is_val(i, dcfg.val_fraction, dcfg.seed) for i, _ in docs[d]]
        train[d] = [a for a, v in zip(enc[d], flags) if not v]
        val += [a for a, v in zip(enc[d], flags) if v]
        domains[d] = {"documents": len(docs[d]), "train_documents": len(train[d]),
                      "val_documents": sum(flags), "bytes": sum(len(t.encode("utf-8")) for _, t in docs[d]),
                      "tokens": int(sum(a.size for a in enc[d])), "train_tokens": int(sum(a.size for a in train[d]))}
    natural = {d: domains[d]["train_tokens"] for d in train}
    weights = {d: float((weights or natural).get(d, 1.0)) for d in train}
    epochs = mix_plan(natural, weights)
    mixed: list[np.ndarray] = []
    for d in sorted(train):
        picks = sample_epochs(len(train[d]), epochs[d], rng)
        mixed += [train[d][i] for i in picks]
        domains[d].update(weight=round(weights[d] / sum(weights.values()), 4), epochs=round(epochs[d], 4),
                          mixed_tokens=int(sum(train[d][i].size for i in picks)))
    total_mixed = sum(v["mixed_tokens"] for v in domains.values()) or 1
    for v in domains.values():
        v["share"] = round(v["mixed_tokens"] / total_mixed, 4)
        v["bytes_per_token"] = round(v["bytes"] / max(1, v["tokens"]), 3)
    rng.shuffle(mixed)  # domains interleaved through the stream, not one after another
    rng.shuffle(val)
    splits = {}
    for split, arrays in (("train", mixed), ("val", val)):
        shards = write_split(out_dir, split, arrays, dcfg.shard_tokens, dtype)
        splits[split] = {"documents": len(arrays), "tokens": int(sum(s["tokens"] for s in shards)), "shards": shards}
    return {"splits": splits, "domains": domains}
