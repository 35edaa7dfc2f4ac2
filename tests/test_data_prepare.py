"""End to end: user sources with bad files, mixing weights, reuse, atomic rebuild, the CLI."""

from __future__ import annotations

import json
import random

import pytest

from moeforge.cli import main
from moeforge.config import load_config
from moeforge.data.loader import TokenDataset
from moeforge.data.prepare import prepare
from moeforge.errors import ConfigError, UserError

PARA = ("The {w} of the old town was known to everyone who lived there, and the people of the valley "
        "would often speak of it in the evenings. It had been built by the first settlers, who came from "
        "the north with their families and their animals, looking for a place to stay for the winter.\n")
ADJ = ["old", "new", "red", "quiet", "busy", "empty", "tall", "small", "bright", "dark", "warm", "cold"]
WORDS = ["bridge", "market", "library", "tower", "garden", "harbour", "mill", "school", "chapel", "fountain"]


@pytest.fixture
def sources(tmp_path):
    prose = tmp_path / "prose"
    prose.mkdir()
    rng = random.Random(0)
    for i, w in enumerate(WORDS):  # distinct stories: shuffled sentences around a different subject
        sents = [s.strip() + "." for s in PARA.format(w=w).split(".") if s.strip()]
        extra = [f"The {rng.choice(WORDS)} was {rng.choice(ADJ)} and the {rng.choice(WORDS)} was {rng.choice(ADJ)}."
                 for _ in range(12)]
        (prose / f"{i}.txt").write_text(" ".join(rng.sample(sents + extra, len(sents) + len(extra))) + "\n")
    (prose / "dup.txt").write_text((prose / "3.txt").read_text())  # exact duplicate
    (prose / "empty.txt").write_text("")
    (prose / "bin.txt").write_bytes(b"\x00\xff\x00")
    (prose / "bad.txt").write_bytes(b"caf\xe9 au lait " * 20)
    code = tmp_path / "code"
    code.mkdir()
    for w in WORDS[:6]:
        (code / f"{w}.py").write_text(f"def {w}_size(x):\n    \"\"\"How big the {w} is.\"\"\"\n    return len(x.{w})\n\n\n"
                                      f"class {w.title()}:\n    name = {w!r}\n")
    return [{"domain": "prose", "path": str(prose), "kind": "text"},
            {"domain": "code", "path": str(code), "kind": "code"}]


def cfg_for(tmp_path, sources, **over):
    o = {"data.data_dir": str(tmp_path / "out"), "data.sources": sources, "data.vocab_size": 300,
         "data.workers": 1, "data.val_fraction": 0.0, "data.shard_tokens": 1024} | over
    return load_config(None, o)


def test_user_sources_counts_and_reuse(tmp_path, sources, capsys):
    cfg = cfg_for(tmp_path, sources)
    out = prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped_inputs"] == {"empty": 1, "binary": 1, "non_utf8": 1}
    assert m["documents_read"] == {"prose": 11, "code": 6}
    assert m["dedup"]["exact_removed"] >= 1
    assert m["domains"]["prose"]["documents"] == 10
    assert m["vocab_size"] <= 300 and m["dtype"] == "uint16"
    assert set(m["special_tokens"]) >= {"<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"}
    assert sum(m["filter_drops"].values()) >= 0 and "timings" in m
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == stamp  # reused
    assert "up to date" in capsys.readouterr().err
    # a damaged shard makes prepare rebuild instead of serving it
    shard = out / m["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(b"\x00\x00")
    prepare(cfg)
    TokenDataset(out, "train", seq_len=16)  # verifies every checksum


def test_weights_upsample_a_domain(tmp_path, sources):
    cfg = cfg_for(tmp_path, sources, **{"data.weights": {"code": 3.0, "prose": 1.0}})
    m = json.loads((prepare(cfg) / "manifest.json").read_text())
    d = m["domains"]
    assert d["code"]["epochs"] > 1.0 > d["prose"]["epochs"]
    assert abs(d["code"]["share"] - 0.75) < 0.1
    with pytest.raises(ConfigError, match="data.weights names unknown domain"):
        prepare(cfg_for(tmp_path, sources, **{"data.weights": {"poetry": 1.0}, "data.data_dir": str(tmp_path / "x")}))


def test_missing_source_and_vocab_mismatch(tmp_path, sources):
    bad = sources + [{"domain": "web", "path": str(tmp_path / "nowhere"), "kind": "jsonl"}]
    with pytest.raises(UserError, match="nowhere: source path for domain 'web' does not exist"):
        prepare(cfg_for(tmp_path, bad))
    with pytest.raises(ConfigError, match="data.vocab_size=9000 exceeds model.vocab_size"):
        prepare(cfg_for(tmp_path, sources, **{"data.vocab_size": 9000}))


def test_cli_prepare_and_tokenizer(tmp_path, sources, capsys):
    toml = tmp_path / "r.toml"
    lines = ["[data]", f'data_dir = "{tmp_path / "cli"}"', "vocab_size = 300", "workers = 1", "val_fraction = 0.0"]
    for s in sources:
        lines += ["[[data.sources]]"] + [f'{k} = "{v}"' for k, v in s.items()]
    toml.write_text("\n".join(lines) + "\n")
    assert main(["prepare", "--config", str(toml)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["train_tokens"] > 0 and set(out["domains"]) == {"prose", "code"}
    assert main(["tokenizer", "encode", "hello world", "--config", str(toml)]) == 0
    enc = json.loads(capsys.readouterr().out)
    assert enc["n"] == len(enc["ids"]) > 0
    assert main(["prepare", "--config", str(toml), "--data.min_chars", "-3"]) == 2
    assert "data.min_chars" in capsys.readouterr().err


def test_concurrent_prepares_of_one_data_dir_build_it_once(tmp_path, sources):
    """Two processes preparing the same data_dir at once (an FP8 and a BF16 run started
    together) used to race through datatrove's shared work files and both crash; now the
    second waits on the lock, then reuses what the first built."""
    import subprocess
    import sys

    cfg_json = json.dumps({"data.data_dir": str(tmp_path / "out"), "data.sources": sources, "data.vocab_size": 300,
                           "data.workers": 1, "data.val_fraction": 0.0, "data.shard_tokens": 1024})
    code = ("import json, sys\nfrom moeforge.config import load_config\nfrom moeforge.data.prepare import prepare\n"
            f"prepare(load_config(None, json.loads({cfg_json!r})))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    # built once; the other reused it (after waiting on the lock, or, had it started late, at once)
    assert sum("cleaning and deduplicating" in e for e in errs) == 1, errs
    assert sum("up to date" in e for e in errs) == 1, errs
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["documents_read"] == {"prose": 11, "code": 6}
    TokenDataset(tmp_path / "out", "train", seq_len=16)  # every shard verifies
