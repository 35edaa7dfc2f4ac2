"""The datatrove stages: read + clean, exact dedup, MinHash near-dedup. Same code, any executor.

Each stage is a list of datatrove steps run by an executor. Here that is
``LocalPipelineExecutor`` (``tasks`` file shards on ``workers`` processes); on a cluster the
same step lists go to ``SlurmPipelineExecutor``/``RayPipelineExecutor`` unchanged
(:func:`make_executor` is the one place that picks).

Layout under ``work/``::

    clean/{dedup,keep}/<domain>/<rank>.jsonl   cleaned docs; "keep" = generated (no dedup)
    exact/{sigs,dups}  exact/out/<domain>/...   exact dedup (hash of simplified text)
    minhash/{sigs,buckets,clusters,out}           MinHash + LSH
    logs/<stage>/                                datatrove logs, completions, stats.json

Choices:
- Exact dedup hashes datatrove's ``simplify_text`` (lowercase, no punctuation, numbers -> 0,
  whitespace collapsed), so copies differing in formatting count as exact duplicates.
- Generated domains skip dedup: their templates differ only in numbers, which
  normalisation erases, so near-dedup would wrongly collapse them.
- Hashing is SHA-1 (stdlib) instead of datatrove's default xxhash, one dependency fewer.
- datatrove's completion markers make a rerun skip finished tasks; :func:`run_stage`
  replaces a stage's output folder when it runs it, so no half-written stage is read.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                      MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import simplify_text
from loguru import logger

from moeforge.data.filters import WORD_TOKENIZER, build_filters
from moeforge.data.sources import JsonlLinesReader

HASH = HashConfig(precision=64, hash_fc="sha1")


def simplified_text(doc) -> str:
    return simplify_text(doc.text)


def make_executor(pipeline: list, tasks: int, workers: int, log_dir: Path) -> LocalPipelineExecutor:
    # fork: children inherit our stderr redirect and need no re-import (forkserver would)
    return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(log_dir),
                                 start_method="fork")


def run_stage(name: str, pipeline: list, work: Path, tasks: int, workers: int, outputs: list[Path]) -> dict:
    """Run one stage unless its completions say it is done; return its stats as a plain dict."""
    log_dir = work / "logs" / name
    done = log_dir / "stats.json"
    if not done.is_file():
        shutil.rmtree(log_dir, ignore_errors=True)  # a stage interrupted midway starts over
        for out in outputs:
            shutil.rmtree(out, ignore_errors=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        # datatrove logs every task to stderr through loguru: keep that in the stage's log folder
        with open(log_dir / "console.log", "a") as console, contextlib.redirect_stderr(console):
            logger.remove()
            logger.add(console, level="INFO")
            try:
                make_executor(pipeline, tasks, workers, log_dir).run()
            finally:
                logger.remove()  # in-process tasks replace handlers too: reset all of them
                logger.add(sys.stderr, level="WARNING")
    return read_stats(done)


def read_stats(path: Path) -> list[tuple[str, dict[str, float]]]:
    """[(step name, {counter: total})] from a datatrove stats.json, in pipeline order."""
    out: list[tuple[str, dict[str, float]]] = []
    for step in json.loads(path.read_text()):
        counters = {}
        for k, v in step.get("stats", {}).items():
            total = v.get("total", v.get("sum")) if isinstance(v, dict) else v
            if isinstance(total, (int, float)):
                counters[k] = total
        out.append((step["name"], counters))
    return out


def minhash_config(dcfg) -> MinhashConfig:
    return MinhashConfig(n_grams=dcfg.minhash_ngrams, num_buckets=dcfg.minhash_buckets,
                         hashes_per_bucket=dcfg.minhash_rows, seed=dcfg.seed, hash_config=HASH)


def _writer(folder: Path, route: bool = False) -> JsonlWriter:
    name = "${route}/${domain}/${rank}.jsonl" if route else "${domain}/${rank}.jsonl"
    return JsonlWriter(str(folder), output_filename=name, compression=None)


class _Route:
    """Tag each document with the folder it is written to (generated text skips dedup)."""

    name = "route"

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.metadata["route"] = "keep" if doc.metadata.get("profile") == "generated" else "dedup"
            yield doc


def run_clean(readers: list, dcfg, work: Path, tasks: int, workers: int) -> dict:
    pipeline = [*readers, *build_filters(dcfg), _Route(), _writer(work / "clean", route=True)]
    return run_stage("clean", pipeline, work, tasks, workers, [work / "clean"])


def run_exact(src: Path, dst: Path, work: Path, tasks: int, workers: int) -> dict:
    cfg = ExactDedupConfig(content_getter=simplified_text, hash_config=HASH)
    read = lambda: JsonlLinesReader(str(src))  # noqa: E731  - same files, same order in stages 1 and 3
    stats = run_stage("exact_1", [read(), ExactDedupSignature(str(work / "exact/sigs"), cfg)], work, tasks, workers,
                      [work / "exact/sigs"])
    stats += run_stage("exact_2", [ExactFindDedups(str(work / "exact/sigs"), str(work / "exact/dups"), cfg)], work, 1, 1,
                       [work / "exact/dups"])
    stats += run_stage("exact_3", [read(), ExactDedupFilter(str(work / "exact/dups"), cfg), _writer(dst)], work, tasks,
                       workers, [dst])
    return stats


def run_minhash(src: Path, dst: Path, dcfg, work: Path, tasks: int, workers: int) -> dict:
    mcfg = minhash_config(dcfg)
    m = work / "minhash"
    read = lambda: JsonlLinesReader(str(src))  # noqa: E731
    stats = run_stage("minhash_1", [read(), MinhashDedupSignature(str(m / "sigs"), mcfg, language=WORD_TOKENIZER)],
                      work, tasks, workers, [m / "sigs"])
    stats += run_stage("minhash_2", [MinhashDedupBuckets(str(m / "sigs"), str(m / "buckets"), config=mcfg)], work,
                       mcfg.num_buckets, workers, [m / "buckets"])
    stats += run_stage("minhash_3", [MinhashDedupCluster(str(m / "buckets"), str(m / "clusters"), config=mcfg)], work,
                       1, 1, [m / "clusters"])
    stats += run_stage("minhash_4", [read(), MinhashDedupFilter(str(m / "clusters")), _writer(dst)], work, tasks,
                       workers, [dst])
    return stats


def has_docs(folder: Path) -> bool:
    return folder.is_dir() and any(p.stat().st_size > 0 for p in folder.rglob("*.jsonl"))


def run_dedup(cur: Path, dcfg, work: Path, tasks: int, workers: int) -> tuple[Path, dict]:
    """Exact then near dedup of the JSONL folder ``cur``; returns (output folder, {stage: stats})."""
    stats = {}
    if dcfg.exact_dedup and has_docs(cur):
        stats["exact"] = run_exact(cur, work / "exact" / "out", work, tasks, workers)
        cur = work / "exact" / "out"
    if dcfg.near_dedup and has_docs(cur):
        stats["minhash"] = run_minhash(cur, work / "minhash" / "out", dcfg, work, tasks, workers)
        cur = work / "minhash" / "out"
    return cur, stats


def run_all(readers: list, dcfg, work: Path, workers: int) -> tuple[list[Path], dict]:
    """clean -> exact -> minhash; returns (folders of final docs, {stage: stats})."""
    tasks = max(1, workers)
    stats = {"clean": run_clean(readers, dcfg, work, tasks, workers)}
    cur, more = run_dedup(work / "clean" / "dedup", dcfg, work, tasks, workers)
    return [cur, work / "clean" / "keep"], stats | more


def dedup_texts(texts: list[str], dcfg, work: Path, workers: int = 1) -> tuple[set[int], dict]:
    """Deduplicate a list of strings with the same stages (tests, benchmark): (indices kept, stats)."""
    src = work / "in" / "docs"
    src.mkdir(parents=True, exist_ok=True)
    with open(src / "00000.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": str(i), "metadata": {"domain": "docs"}}) + "\n")
    out, stats = run_dedup(src, dcfg, work, max(1, workers), workers)
    kept = set()
    for p in out.rglob("*.jsonl"):
        kept |= {int(json.loads(line)["id"]) for line in p.open()}
    return kept, stats


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """True Jaccard similarity of word n-gram shingles, as MinHash estimates it."""
    def shingles(t: str) -> set:
        w = WORD_TOKENIZER.word_tokenize(simplify_text(t))
        return {" ".join(w[i: i + n]) for i in range(max(1, len(w) - n + 1))}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(1, len(sa | sb))


def summarize(stats: dict) -> dict:
    """Turn per-step datatrove counters into the manifest's report: what each domain read,
    what each filter dropped and why, what each dedup stage removed."""
    out: dict = {"read": {}, "skipped": {}, "filters": {}, "exact_dedup_removed": 0, "near_dedup_removed": 0,
                 "near_dedup_pairs": 0, "after": {}}
    for name, c in stats.get("clean", []):
        if "READER" in name and "[" in name:
            domain = name.rsplit("[", 1)[1].rstrip("]")
            out["read"][domain] = out["read"].get(domain, 0) + int(c.get("documents", 0))
            for k, v in c.items():
                if k.startswith("skipped_"):
                    out["skipped"][k[8:]] = out["skipped"].get(k[8:], 0) + int(v)
        elif "FILTER" in name:
            for k, v in c.items():
                if k.startswith("dropped_"):
                    out["filters"][k[8:]] = out["filters"].get(k[8:], 0) + int(v)
    for stage in ("clean", "exact", "minhash"):
        for name, c in stats.get(stage, []):
            if "WRITER" in name:
                per = {}
                for k, v in c.items():
                    if k.endswith(".jsonl") and "/" in k:
                        d = k.split("/")[-2]
                        per[d] = per.get(d, 0) + int(v)
                out["after"][stage] = per
            if "exact-deduplication stage 3" in name:
                out["exact_dedup_removed"] = int(c.get("dropped", 0))
            if "MinHash stage 4" in name:
                out["near_dedup_removed"] = int(c.get("dropped", 0))
            if "MinHash stage 2" in name:
                out["near_dedup_pairs"] = int(c.get("total_matches", 0))
    return out
