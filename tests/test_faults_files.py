"""Damaged files through the real CLI: one stderr line that names the file, exit code 2.

Proves, with ``moeforge.cli.main`` run in this process (no traceback may escape it):
- a truncated, bit-flipped, emptied, deleted or unmarked file of the newest checkpoint:
  resuming it explicitly fails in one line naming the file and what is wrong, and
  ``--resume`` warns in one line and falls back to the previous checkpoint, then
  finishes the run (and rewrites the damaged step as a valid checkpoint);
- a damaged data shard (truncated, modified, missing; in the train *or* val split), a
  broken manifest (cut short, or valid JSON of the wrong shape, or a shard path that
  leaves the data directory) and a broken tokenizer file each stop ``moeforge pretrain``
  before training with one line naming the file.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fault_helpers import assert_one_line, cli, fast, finished_run, pretrain_argv, resumed_from  # noqa: F401 (fast)
from moeforge.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Shards and a finished 4-step run with checkpoints at steps 2 and 4."""
    return finished_run(tmp_path_factory.mktemp("files"), "base", steps=4)


def _flip(path, at: int = -20) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


CHECKPOINT_DAMAGE = {
    "truncated model": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                        "model.safetensors is corrupt"),
    "flipped optimizer byte": ("optimizer.safetensors", _flip, "optimizer.safetensors is corrupt"),
    "empty model": ("model.safetensors", lambda p: p.write_bytes(b""), "model.safetensors is corrupt"),
    "deleted optimizer": ("optimizer.safetensors", lambda p: p.unlink(), "optimizer.safetensors is missing"),
    "garbage state": ("state.json", lambda p: p.write_text("{"), "state.json is missing or corrupt"),
    "no marker": ("COMPLETE", lambda p: p.unlink(), "is incomplete"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_named_and_resume_falls_back(base, tmp_path, damage):
    fname, hurt, what = CHECKPOINT_DAMAGE[damage]
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copytree(base / "runs" / "base", tmp_path / "runs" / "base")
    root = tmp_path / "runs" / "base" / "checkpoints"
    good = {f: ckpt.sha256_file(root / "step_000002" / f) for f in ckpt.FILES}
    hurt(root / "step_000004" / fname)

    rc, _, err = cli(pretrain_argv(tmp_path, "base", "--resume", str(root / "step_000004"), train__steps=4))
    assert_one_line(rc, err, "step_000004", what)

    rc, out, err = cli(pretrain_argv(tmp_path, "base", "--resume", train__steps=4))
    assert rc == 0, err
    warnings = [ln for ln in err if "skipping" in ln]
    assert len(warnings) == 1 and "step_000004" in warnings[0] and what in warnings[0], err
    assert not any("Traceback" in ln for ln in err)
    assert resumed_from(root.parent) == str(root / "step_000002")
    assert {f: ckpt.sha256_file(root / "step_000002" / f) for f in ckpt.FILES} == good  # untouched
    assert ckpt.verify(root / "step_000004")["step"] == 4  # the damaged step was trained and saved again


def _manifest(edit):
    def hurt(data):
        m = json.loads((data / "manifest.json").read_text())
        edit(m)
        (data / "manifest.json").write_text(json.dumps(m))
    return hurt


def _shard(m, **kv):
    m["splits"]["train"]["shards"][0].update(kv)


DATA_DAMAGE = {
    "truncated train shard": (lambda d: (d / "train_000000.bin").write_bytes((d / "train_000000.bin").read_bytes()[:999]),
                              "train_000000.bin", "size mismatch"),
    "modified train shard": (lambda d: _flip(d / "train_000000.bin", 100), "train_000000.bin", "checksum mismatch"),
    "modified val shard": (lambda d: _flip(d / "val_000000.bin", 10), "val_000000.bin", "checksum mismatch"),
    "missing train shard": (lambda d: (d / "train_000000.bin").unlink(), "train_000000.bin", "missing"),
    "truncated manifest": (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:80]),
                           "manifest.json", "not valid JSON"),
    "manifest of another format": (_manifest(lambda m: m.update(format="v0")), "manifest.json", "not a moeforge"),
    "manifest splits not a table": (_manifest(lambda m: m.update(splits=[1, 2])), "manifest.json", "splits"),
    "manifest shard without checksum": (_manifest(lambda m: m["splits"]["train"]["shards"][0].pop("sha256")),
                                        "manifest.json", "shards[0]"),
    "manifest shard count not a number": (_manifest(lambda m: _shard(m, tokens="many")), "manifest.json", "shards[0]"),
    "manifest shard outside data dir": (_manifest(lambda m: _shard(m, file="../../etc/passwd")), "manifest.json",
                                        "plain 'file' name"),
    "manifest vocab not a number": (_manifest(lambda m: m.update(vocab_size="256")), "manifest.json", "vocab_size"),
    "manifest unknown dtype": (_manifest(lambda m: m.update(dtype="float99")), "manifest.json", "dtype"),
    "manifest tokenizer not a table": (_manifest(lambda m: m.update(tokenizer="tokenizer.json")), "manifest.json",
                                       "tokenizer"),
    "truncated tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "mod'),
                            "tokenizer.json", "not valid JSON"),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", "not found"),
}


@pytest.mark.parametrize("damage", list(DATA_DAMAGE))
def test_damaged_data_file_stops_pretrain_in_one_line(base, tmp_path, damage):
    hurt, fname, what = DATA_DAMAGE[damage]
    shutil.copytree(base / "data", tmp_path / "data")
    hurt(tmp_path / "data")
    rc, _, err = cli(pretrain_argv(tmp_path, "run", train__eval_every=1))
    assert_one_line(rc, err, fname, what)
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()  # stopped before training
