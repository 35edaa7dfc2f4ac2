"""Data pipeline: per-stage throughput on the built-in corpus, and MinHash dedup precision/recall.

Part 1 runs ``prepare`` from scratch on the built-in corpus (``data.builtin_mb`` MB; 1 MB with
--quick) and reports each stage's throughput from the manifest's timings: building the
corpus (MB/s), datatrove clean + exact + near dedup (MB/s), BPE training (MB/s of sample),
tokenize + pack (tokens/s).

Part 2 measures near-dedup quality on a synthetic corpus with planted near-duplicates
(``synthetic.planted_duplicates``: copies of random documents with 1-40 word substitutions,
so the true Jaccard of the pairs spans ~0.95 to ~0.3). Recall = planted pairs with Jaccard
>= 0.8 of which one copy was removed; precision = removed documents that belong to a
planted pair (an unrelated document removed is a false positive). Targets: recall >= 0.9,
precision >= 0.95. Recall by Jaccard bin shows the LSH S-curve around the threshold.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from moeforge.bench import write_results
from moeforge.config import load_config
from moeforge.data.prepare import prepare
from moeforge.data.stages import dedup_texts, shingle_jaccard
from moeforge.data.synthetic import planted_duplicates


def stage_throughput(mb: float, tmp: Path) -> tuple[list[dict], dict]:
    cfg = load_config(None, {"data.data_dir": str(tmp / "data"), "data.builtin_mb": mb})
    t0 = time.perf_counter()
    prepare(cfg, force=True)
    wall = time.perf_counter() - t0
    m = json.loads((tmp / "data" / "manifest.json").read_text())
    t = m["timings"]
    raw_mb = sum(d["bytes"] for d in m["builtin"]["domains"].values()) / 1e6
    clean_mb = sum(d["bytes"] for d in m["domains"].values()) / 1e6
    tokens = sum(d["tokens"] for d in m["domains"].values())
    rows = [
        {"stage": "build built-in corpus", "seconds": t["sources_s"], "input": f"{raw_mb:.2f} MB",
         "throughput": f"{raw_mb / t['sources_s']:.2f} MB/s"},
        {"stage": "clean + exact + near dedup (datatrove)", "seconds": t["clean_dedup_s"], "input": f"{raw_mb:.2f} MB",
         "throughput": f"{raw_mb / t['clean_dedup_s']:.2f} MB/s"},
        {"stage": "train BPE tokenizer", "seconds": t["tokenizer_s"],
         "input": f"{m['tokenizer']['trained_on_bytes'] / 1e6:.2f} MB",
         "throughput": f"{m['tokenizer']['trained_on_bytes'] / 1e6 / t['tokenizer_s']:.2f} MB/s"},
        {"stage": "tokenize + pack", "seconds": t["pack_s"], "input": f"{clean_mb:.2f} MB",
         "throughput": f"{tokens / t['pack_s']:.0f} tokens/s"},
    ]
    summary = {"prepare_wall_s": round(wall, 2), "raw_mb": round(raw_mb, 2), "clean_mb": round(clean_mb, 2),
               "train_tokens": m["splits"]["train"]["tokens"], "vocab_size": m["vocab_size"],
               "bytes_per_token": m["tokenizer"]["bytes_per_token"], "filter_drops": sum(m["filter_drops"].values()),
               "exact_removed": m["dedup"]["exact_removed"], "near_removed": m["dedup"]["near_removed"]}
    return rows, summary


def dedup_quality(n_docs: int, n_dups: int, tmp: Path) -> tuple[list[dict], dict]:
    from moeforge.data.config import DataConfig

    texts, pairs = planted_duplicates(random.Random(0), n_docs=n_docs, n_dups=n_dups)
    t0 = time.perf_counter()
    kept, _ = dedup_texts(texts, DataConfig(exact_dedup=False), tmp / "dedup")
    secs = time.perf_counter() - t0
    sims = [(shingle_jaccard(texts[a], texts[b]), a, b) for a, b in pairs]
    removed = set(range(len(texts))) - kept
    members = {i for _, a, b in sims for i in (a, b)}
    high = [(a, b) for s, a, b in sims if s >= 0.8]
    recall = sum(not ({a, b} <= kept) for a, b in high) / max(1, len(high))
    precision = len(removed & members) / max(1, len(removed))
    rows = []
    for lo, hi in [(0.0, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]:
        b = [(a, c) for s, a, c in sims if lo <= s < hi]
        if b:
            rows.append({"jaccard": f"[{lo:.1f}, {min(hi, 1.0):.1f})", "pairs": len(b),
                         "detected": round(sum(not ({a, c} <= kept) for a, c in b) / len(b), 3)})
    summary = {"documents": len(texts), "planted_pairs": len(pairs), "pairs_jaccard_ge_0.8": len(high),
               "recall_at_0.8": round(recall, 4), "precision": round(precision, 4), "removed": len(removed),
               "seconds": round(secs, 2), "docs_per_s": round(len(texts) / secs, 1)}
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows, s1 = stage_throughput(1.0 if args.quick else 4.0, tmp)
        write_results("data_stages", "Data pipeline stage throughput (built-in corpus)", rows, summary=s1,
                      notes=["2 shared CPU cores; absolute rates are indicative only."])
        qrows, s2 = dedup_quality(300 if args.quick else 1000, 200 if args.quick else 600, tmp)
        write_results("data_dedup", "MinHash + LSH near-dedup on planted duplicates (14 bands x 8 rows, 5-grams)",
                      qrows, summary=s2,
                      notes=["recall = planted pairs with true Jaccard >= 0.8 where one copy was removed",
                             "precision = removed documents that belong to a planted pair",
                             "targets: recall >= 0.9, precision >= 0.95"])
    for r in rows:
        print(r)
    print(s1)
    for r in qrows:
        print(r)
    print(s2)


if __name__ == "__main__":
    main()
