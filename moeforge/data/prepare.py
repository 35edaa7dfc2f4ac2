"""``moeforge prepare``: sources -> clean -> dedup -> tokenizer -> token shards + manifest.

One straight program, phase by phase:
  1. sources   the recipe's ``[[data.sources]]``, or the built-in corpus (``builtin.py``)
  2. clean     datatrove: read, normalise, quality filters          (``stages.py``)
  3. dedup     datatrove: exact, then MinHash + LSH                  (``stages.py``)
  4. tokenizer byte-level BPE on a sample of the mix                 (``tokenizer.py``)
  5. pack      tokenize, split, mix by weight, write shards          (``pack.py``)
  6. manifest  counts, drops, dedup, checksums, timings; written last

Choices:
- Reuse: a data_dir whose manifest has the same fingerprint (data config + corpus origin)
  and whose shards verify is returned as is; ``force`` rebuilds. Intermediate stages live
  in ``<data_dir>/work`` and datatrove's completion markers let an interrupted run resume.
- Atomicity: the old manifest is removed before any shard is replaced and the new one is
  written after all shards are in place and hashed, so readers never see a mix.
- ``data.workers`` (0 = all cores) sets datatrove's task and process count and the
  tokenizer's thread count.
- Concurrency: the build holds an exclusive lock on ``<data_dir>/.prepare.lock``, so two
  processes preparing one data_dir (an FP8 and a BF16 run started together, ranks of one
  job) do not race through datatrove's shared work files: the second waits, then finds the
  data up to date and reuses it. (Without it, both crashed in the MinHash stage.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from moeforge.errors import ConfigError, UserError

FINGERPRINT_VERSION = 2  # bump when the built-in corpus generators change


def _workers(dcfg) -> int:
    return dcfg.workers or os.cpu_count() or 1


def fingerprint(cfg) -> str:
    d = dataclasses.asdict(cfg.data)
    for k in ("data_dir", "workers"):
        d.pop(k)
    d["_tasks"] = _workers(cfg.data)  # datatrove's task count decides which duplicate survives
    d["_python"] = platform.python_version()  # the built-in corpus is this interpreter's stdlib
    d["_v"] = FINGERPRINT_VERSION
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _work_dir(cfg) -> Path:
    """<data_dir>/work, emptied when the data config changed since it was filled."""
    work = Path(cfg.data.data_dir) / "work"
    fp = fingerprint(cfg)
    stamp = work / "fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text().strip() != fp):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp)
    return work


def build_clean(cfg) -> tuple[list[Path], dict, dict, list[dict], dict]:
    """Phases 1-3. Returns (final doc folders, datatrove stats, builtin stats, source specs, timings)."""
    try:
        from moeforge.data.builtin import build_builtin, builtin_sources
        from moeforge.data.sources import make_reader
        from moeforge.data.stages import run_all
    except ImportError as e:  # datatrove is the optional [data] extra
        raise UserError(f"moeforge prepare needs datatrove and orjson ({e.name} is missing): "
                        "pip install 'moeforge[data]'") from None

    dcfg, work, t = cfg.data, _work_dir(cfg), {}
    builtin: dict = {}
    specs = list(dcfg.sources)
    t0 = time.perf_counter()
    if not specs:
        raw = work / "raw"
        done = work / "builtin.json"
        if not done.is_file():
            builtin = build_builtin(raw, dcfg.builtin_mb, dcfg.seed, dcfg.math_level)
            done.write_text(json.dumps(builtin))
        builtin = json.loads(done.read_text())
        specs = builtin_sources(raw)
    readers = [make_reader(s) for s in specs]  # a missing path fails here, before any work
    t["sources_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    folders, stats = run_all(readers, dcfg, work, _workers(dcfg))
    t["clean_dedup_s"] = time.perf_counter() - t0
    return folders, stats, builtin, specs, t


def resolve_weights(specs: list[dict], dcfg, domains) -> dict[str, float]:
    """data.weights beats a source's weight; with no weight anywhere, natural proportions (None)."""
    explicit = {s["domain"]: float(s["weight"]) for s in specs if "weight" in s}
    explicit |= {d: float(w) for d, w in dcfg.weights.items()}
    unknown = set(dcfg.weights) - set(domains)
    if unknown:
        raise ConfigError(f"data.weights names unknown domain(s) {sorted(unknown)}; domains: {sorted(domains)}")
    return explicit


def build_tokenizer(cfg, out: str | Path | None = None):
    """Phases 1-4 (``moeforge tokenizer train``): train BPE on a sample of the cleaned mix."""
    from moeforge.data.pack import read_docs, tokenizer_sample
    from moeforge.data.tokenizer import train_tokenizer

    folders, _, _, specs, _ = build_clean(cfg)
    docs = read_docs(folders)
    weights = _natural_or(resolve_weights(specs, cfg.data, docs), docs)
    out = Path(out or cfg.data.tokenizer or Path(cfg.data.data_dir) / "tokenizer.json")
    sample = tokenizer_sample(docs, weights, int(cfg.data.tokenizer_sample_mb * 1e6), cfg.data.seed)
    return train_tokenizer(sample, cfg.data.vocab_size, out)


def _natural_or(weights: dict[str, float], docs: dict) -> dict[str, float]:
    """Fill missing weights with the domain's natural byte share, so unweighted = natural mix."""
    sizes = {d: sum(len(t) for _, t in v) for d, v in docs.items()}
    total = sum(sizes.values()) or 1
    if not weights:
        return {d: s / total for d, s in sizes.items()}
    return {d: weights.get(d, 1.0) for d in docs}


def is_valid(data_dir: Path, fp: str) -> bool:
    from moeforge.data.shards import read_manifest, verify_shard, verify_tokenizer

    try:
        m = read_manifest(data_dir)
        if m.get("fingerprint") != fp:
            return False
        for split in m["splits"].values():
            for entry in split["shards"]:
                verify_shard(data_dir, entry, m["dtype"])
        verify_tokenizer(data_dir, m)
        return True
    except UserError as e:
        _log(f"rebuilding: {e}")
        return False


@contextlib.contextmanager
def _exclusive(data_dir: Path):
    """Hold an exclusive advisory lock on ``data_dir/.prepare.lock`` (blocking), saying so
    when another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".prepare.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process preparing {data_dir} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(cfg, force: bool = False) -> Path:
    """Build (or reuse when valid) the corpus, tokenizer and shards in ``cfg.data.data_dir``."""
    dcfg = cfg.data
    if dcfg.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.vocab_size={dcfg.vocab_size} exceeds model.vocab_size={cfg.model.vocab_size}")
    if dcfg.workers:
        os.environ.setdefault("RAYON_NUM_THREADS", str(dcfg.workers))  # tokenizers' thread pool
    data_dir = Path(dcfg.data_dir)
    fp = fingerprint(cfg)
    def reusable() -> bool:
        return not force and (data_dir / "manifest.json").exists() and is_valid(data_dir, fp)

    if reusable():  # no lock needed to reuse (a read-only data_dir keeps working)
        _log(f"{data_dir} is up to date (fingerprint {fp})")
        return data_dir
    with _exclusive(data_dir):
        if reusable():
            _log(f"{data_dir} is up to date (fingerprint {fp}): another process built it")
            return data_dir
        return _build(cfg, data_dir, fp, force)


def _build(cfg, data_dir: Path, fp: str, force: bool) -> Path:
    dcfg = cfg.data

    from moeforge.data.pack import pack, read_docs, tokenizer_sample
    from moeforge.data.shards import FORMAT, sha256_file, token_dtype, write_manifest
    from moeforge.data.stages import summarize
    from moeforge.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

    t_start = time.perf_counter()
    if force and (data_dir / "work").exists():
        shutil.rmtree(data_dir / "work")
    _log(f"cleaning and deduplicating into {data_dir}/work ...")
    folders, stats, builtin, specs, timings = build_clean(cfg)
    docs = read_docs(folders)
    if not docs:
        raise UserError(f"{data_dir}: no documents survived cleaning (see {data_dir}/work/logs/clean)")
    explicit = resolve_weights(specs, dcfg, docs)
    weights = _natural_or(explicit, docs)  # for the tokenizer sample

    # ---------------------------------------------------------------- tokenizer
    t0 = time.perf_counter()
    tok_path = Path(dcfg.tokenizer) if dcfg.tokenizer else data_dir / "tokenizer.json"
    (data_dir / "manifest.json").unlink(missing_ok=True)  # from here on the data_dir is "not prepared"
    sample_bytes = 0
    if dcfg.tokenizer and tok_path.is_file():
        _log(f"using the existing tokenizer {tok_path}")
    else:
        _log(f"training a {dcfg.vocab_size}-token byte-level BPE ...")
        sample = list(tokenizer_sample(docs, weights, int(dcfg.tokenizer_sample_mb * 1e6), dcfg.seed))
        sample_bytes = sum(len(s.encode("utf-8")) for s in sample)
        train_tokenizer(sample, dcfg.vocab_size, tok_path)
    tok = load_tokenizer(tok_path)
    timings["tokenizer_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- pack
    t0 = time.perf_counter()
    _log("tokenizing and packing ...")
    for old in data_dir.glob("*.bin"):
        old.unlink()
    packed = pack(tok, docs, explicit, dcfg, data_dir)
    timings["pack_s"] = time.perf_counter() - t0
    work = data_dir / "work"
    extras = {}
    for name in ("sft.jsonl", "math_eval.jsonl"):
        if (work / name).is_file():
            shutil.copyfile(work / name, data_dir / name)
            extras[name.split(".")[0]] = name

    # ---------------------------------------------------------------- manifest
    report = summarize(stats)
    total_bytes = sum(v["bytes"] for v in packed["domains"].values())
    total_tokens = sum(v["tokens"] for v in packed["domains"].values())
    timings["total_s"] = time.perf_counter() - t_start
    timings = {k: round(v, 3) for k, v in timings.items()}
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok.vocab_size),
        "layout": "documents as <|bos|> text <|eos|>, concatenated; windows of seq_len+1 are cut at load time",
        "special_tokens": {t: tok.tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "tokenizer": {"file": os.path.relpath(tok_path, data_dir), "sha256": sha256_file(tok_path),
                      "vocab_size": tok.vocab_size, "trained_on_bytes": sample_bytes,
                      "bytes_per_token": round(total_bytes / max(1, total_tokens), 3)},
        "splits": packed["splits"],
        "domains": packed["domains"],
        "weights": {d: v["weight"] for d, v in packed["domains"].items()},
        "mixing": "natural (one epoch per domain)" if not explicit else "by weight (share = weight / sum)",
        "documents_read": report["read"],
        "skipped_inputs": report["skipped"],
        "filter_drops": report["filters"],
        "dedup": {"exact_removed": report["exact_dedup_removed"], "near_removed": report["near_dedup_removed"],
                  "near_candidate_pairs": report["near_dedup_pairs"], "documents_after": report["after"],
                  "minhash": {"ngrams": dcfg.minhash_ngrams, "buckets": dcfg.minhash_buckets,
                              "rows": dcfg.minhash_rows}},
        "sources": specs if dcfg.sources else "builtin",
        "builtin": builtin or None,
        "extras": extras,
        "timings": timings,
        "throughput": {"clean_dedup_mb_s": round(total_bytes / 1e6 / max(1e-9, timings["clean_dedup_s"]), 3),
                       "pack_tokens_s": round(total_tokens / max(1e-9, timings["pack_s"]), 1)},
        "data_config": dataclasses.asdict(dcfg),
    }
    write_manifest(data_dir, manifest)
    tr = packed["splits"]["train"]
    _log(f"done in {timings['total_s']:.1f}s: {tr['tokens']:,} train tokens in {len(tr['shards'])} shard(s), "
         f"{packed['splits']['val']['tokens']:,} val tokens, vocab {tok.vocab_size}")
    return data_dir


def cli(argv: list[str]) -> int:
    from moeforge.cli import parse_config_args

    parser = argparse.ArgumentParser(prog="moeforge prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the data_dir is up to date")
    args, cfg = parse_config_args(argv, parser)
    data_dir = prepare(cfg, force=args.force)
    m = json.loads((data_dir / "manifest.json").read_text())
    print(json.dumps({"data_dir": str(data_dir), "vocab_size": m["vocab_size"],
                      "train_tokens": m["splits"]["train"]["tokens"], "val_tokens": m["splits"]["val"]["tokens"],
                      "domains": {d: v["share"] for d, v in m["domains"].items()}, "timings": m["timings"]}))
    return 0
