"""Exact and near-duplicate removal on planted duplicates (datatrove stages, in-process)."""

from __future__ import annotations

import random

from moeforge.data.config import DataConfig
from moeforge.data.stages import dedup_texts, shingle_jaccard
from moeforge.data.synthetic import planted_duplicates


def test_exact_dedup_removes_normalised_copies_only(tmp_path):
    base = "The committee met on Tuesday and agreed to the budget for the next year, after a long debate."
    texts = [base,
             "  the COMMITTEE met on tuesday, and agreed to the budget for the next year after a long debate!! ",
             "A different sentence about the weather in the mountains, which was cold and wet all week long."]
    kept, stats = dedup_texts(texts, DataConfig(near_dedup=False), tmp_path)
    assert len(kept) == 2 and 2 in kept and len(kept & {0, 1}) == 1
    assert any("stage 3" in name and c.get("dropped") == 1 for name, c in stats["exact"])


def test_near_dedup_removes_close_copies_and_keeps_distant_ones(tmp_path):
    rng = random.Random(0)
    texts, _ = planted_duplicates(rng, n_docs=30, n_dups=0)
    words = texts[0].replace(".", "").split()
    close = list(words)
    for pos in (20, 120, 220):  # 3 substitutions in 300 words: Jaccard ~0.9
        close[pos] = "zzzz"
    far = list(words)
    for pos in range(0, 300, 5):  # every 5th word changed: no 5-gram survives
        far[pos] = "qqqq"
    texts += [" ".join(close), " ".join(far)]
    assert shingle_jaccard(texts[0], texts[30]) > 0.8 and shingle_jaccard(texts[0], texts[31]) < 0.1
    kept, _ = dedup_texts(texts, DataConfig(exact_dedup=False), tmp_path)
    assert len(kept & {0, 30}) == 1  # exactly one of the close pair survives
    assert 31 in kept and set(range(1, 30)) <= kept


def test_near_dedup_recall_on_planted_pairs(tmp_path):
    texts, pairs = planted_duplicates(random.Random(1), n_docs=60, n_dups=40, edits=(1, 8))
    kept, _ = dedup_texts(texts, DataConfig(exact_dedup=False), tmp_path)
    high = [(a, b) for a, b in pairs if shingle_jaccard(texts[a], texts[b]) >= 0.8]
    found = sum(not ({a, b} <= kept) for a, b in high)
    assert len(high) >= 20 and found / len(high) >= 0.85
    planted_members = {i for p in pairs for i in p}
    removed = set(range(len(texts))) - kept
    assert removed <= planted_members  # nothing unrelated removed


def test_generated_domains_skip_dedup(tmp_path):
    """Templated math differs only in numbers, which normalisation erases: it must not be deduplicated."""
    import json

    from moeforge.data.sources import make_reader
    from moeforge.data.stages import run_all

    src = tmp_path / "math.jsonl"
    docs = [f"Problem: What is {a} + {a + 1}? Solution: {a} + {a + 1} = {2 * a + 1}. The answer is {2 * a + 1}."
            for a in range(10, 30)]
    src.write_text("".join(json.dumps({"text": t, "id": str(i)}) + "\n" for i, t in enumerate(docs)))
    reader = make_reader({"domain": "math", "path": str(src), "kind": "jsonl", "filters": "generated"})
    folders, stats = run_all([reader], DataConfig(), tmp_path / "work", workers=1)
    n = sum(1 for f in folders for p in f.rglob("*.jsonl") for _ in p.open())
    assert n == len(docs) and "minhash" not in stats
