"""Shards and loader: packing conserves tokens, deterministic resume, disjoint DP ranks, corrupt files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from moeforge.config import load_config
from moeforge.data.loader import TokenDataset, TokenLoader, document_ids, document_mask, load_tokenizer
from moeforge.data.prepare import prepare
from moeforge.errors import UserError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = load_config(None, {"data.data_dir": str(root / "d"), "data.builtin_mb": 0.2, "data.vocab_size": 512,
                             "data.shard_tokens": 8192, "data.workers": 1, "data.val_fraction": 0.1})
    return prepare(cfg)


@pytest.fixture
def copy(data_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(data_dir, dst, ignore=shutil.ignore_patterns("work"))
    return dst


def test_packing_conserves_tokens(data_dir):
    m = json.loads((data_dir / "manifest.json").read_text())
    tok = load_tokenizer(data_dir / "tokenizer.json")
    stream = np.concatenate([np.fromfile(data_dir / s["file"], dtype=m["dtype"])
                             for split in ("train", "val") for s in m["splits"][split]["shards"]])
    # natural mix: every document once, in train or val
    assert all(d["epochs"] == 1.0 for d in m["domains"].values())
    assert stream.size == sum(d["tokens"] for d in m["domains"].values())
    n_docs = sum(d["documents"] for d in m["domains"].values())
    assert (stream == tok.bos_id).sum() == n_docs and (stream == tok.eos_id).sum() == n_docs
    assert len(m["splits"]["train"]["shards"]) > 1  # 8192-token shards
    # every document decodes back to text that begins right after its bos
    text = tok.decode(stream[:2000].tolist())
    assert text.startswith("<|bos|>") and "<|eos|><|bos|>" in text


def test_windows(data_dir):
    ds = TokenDataset(data_dir, "train", seq_len=64)
    a, b = ds[0], ds[1]
    assert a.dtype == torch.long and a.shape == (65,)
    assert a[-1] == b[0]  # stride seq_len: the last target is the next window's first input
    assert ds.vocab_size == 512 and int(max(ds[i].max() for i in range(len(ds)))) < 512
    assert len(ds) == sum((s["tokens"] - 1) // 64 for s in ds.manifest["splits"]["train"]["shards"])


def test_loader_deterministic_and_resumes_exactly(data_dir):
    ds = TokenDataset(data_dir, "train", seq_len=32)
    ref = TokenLoader(ds, batch_size=4, seed=3)
    steps = ref.steps_per_epoch + 5  # crosses an epoch boundary
    full = [ref.next_batch() for _ in range(steps)]
    again = TokenLoader(ds, batch_size=4, seed=3)
    assert all(torch.equal(x, again.next_batch()) for x in full)
    other = TokenLoader(ds, batch_size=4, seed=4).next_batch()
    assert not torch.equal(other, full[0])
    # epochs are reshuffled
    assert not torch.equal(full[0], full[ref.steps_per_epoch])
    # resume from a JSON round trip of the state in the middle
    first = TokenLoader(ds, batch_size=4, seed=3)
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TokenLoader(ds, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(full[7 + i], resumed.next_batch()) for i in range(steps - 7))


def test_data_parallel_ranks_are_disjoint_and_cover_the_global_batch(data_dir):
    ds = TokenDataset(data_dir, "train", seq_len=32)
    single = TokenLoader(ds, batch_size=6, seed=1)
    ranks = [TokenLoader(ds, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    seen: list[list] = [[], []]
    for _ in range(ranks[0].steps_per_epoch):
        g = single.next_indices()
        parts = [r.next_indices() for r in ranks]
        assert parts[0] + parts[1] == g  # same global batch as one process
        for r, p in enumerate(parts):
            seen[r] += p
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == len(seen[0]) == ranks[0].steps_per_epoch * 3  # no repeats within an epoch
    b = TokenLoader(ds, batch_size=3, seed=1, rank=1, world_size=2).next_batch()
    assert torch.equal(b, torch.stack([ds[i] for i in seen[1][:3]]))


def test_document_mask():
    eos = 1
    x = torch.tensor([[0, 5, 6, 1, 0, 7, 1, 0]])
    assert document_ids(x, eos).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2]]
    m = document_mask(x, eos)[0]
    assert m[2, 0] and not m[4, 3] and m[6, 4] and not m[7, 6] and not m[0, 1]


# ----------------------------------------------------------------------------- bad input
def test_checksum_mismatch_names_the_shard(copy):
    shard = copy / "train_00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="train_00001.bin: checksum mismatch"):
        TokenDataset(copy, "train")


def test_truncated_and_missing_shards(copy):
    shard = copy / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(UserError, match="train_00000.bin: size mismatch"):
        TokenDataset(copy, "train")
    shard.unlink()
    with pytest.raises(UserError, match="train_00000.bin: shard listed in the manifest is missing"):
        TokenDataset(copy, "train")


def test_bad_manifest(copy):
    (copy / "manifest.json").write_text('{"format": "moeforge-shards-v1", "vocab')
    with pytest.raises(UserError, match="manifest.json: manifest is not valid JSON"):
        TokenDataset(copy, "train")
    (copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json: no manifest"):
        TokenDataset(copy, "train")


def test_tokenizer_that_does_not_match_the_shards(copy, tmp_path):
    from moeforge.data.tokenizer import train_tokenizer

    other = tmp_path / "other.json"
    train_tokenizer(["some other text entirely"] * 50, 300, other)
    with pytest.raises(UserError, match="other.json: tokenizer does not match the shards"):
        TokenDataset(copy, "train", tokenizer=other)
    shutil.copyfile(other, copy / "tokenizer.json")
    with pytest.raises(UserError, match="tokenizer.json: tokenizer does not match"):
        TokenDataset(copy, "train")


def test_too_little_data_for_a_batch(data_dir):
    ds = TokenDataset(data_dir, "val", seq_len=64)
    with pytest.raises(UserError, match="fewer than one global batch"):
        TokenLoader(ds, batch_size=len(ds) + 1, seed=0)
