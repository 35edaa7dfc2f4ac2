"""Untrusted weight and checkpoint files never execute code.

Every payload here is a pickle (raw, or a ``torch.save`` zip as in ``.pt``/``.bin``
files) whose unpickling would create a marker file. Each is put where a loader expects
its file, with the checkpoint's checksums recomputed (an attacker can do that), and the
test proves the load is refused with a one-line error and the marker never appears:
- trainer resume (``moeforge pretrain --resume``): payload as ``model.safetensors`` or
  ``optimizer.safetensors``, and a DCP ``.metadata`` pickle in a step directory;
  a hand-edited ``state.json`` with valid checksums fails in one line too;
- post-training/chat loading (``post_common.load_weights``, ``generate.load_for_chat``);
- ``model.hf.load_weights`` (a file, our checkpoint dir, an HF directory), HF import
  (``import_hf`` and ``moeforge import``: payload as ``model.safetensors``, or only a
  ``pytorch_model.bin``, or a broken index) and ``moeforge export``;
- distributed checkpoints (``parallel.checkpoint.load``): DCP unpickles ``.metadata``
  itself, so moeforge checks it with an allow-list first; a genuine one still loads.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fault_helpers import (assert_one_line, cli, fast, finished_run, pretrain_argv, reseal,  # noqa: F401 (fast)
                           write_payload)
from moeforge.errors import UserError
from moeforge.model import hf
from moeforge.train import post_common
from moeforge.train.pretrain import build_model
from train_helpers import small_config


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid 2-step checkpoint (and its data) made by the real CLI."""
    tmp = finished_run(tmp_path_factory.mktemp("untrusted"), "good", steps=2)
    return tmp, tmp / "runs" / "good" / "checkpoints" / "step_000002"


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "unpickling an untrusted file ran code"


def _evil_checkpoint(good_step, dst, fname, marker, kind):
    shutil.copytree(good_step, dst)
    write_payload(dst / fname, marker, kind)
    reseal(dst)
    return dst


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("fname", ["model.safetensors", "optimizer.safetensors"])
def test_resume_refuses_pickled_checkpoint_files(good, tmp_path, marker, fname, kind):
    data, step = good
    evil = _evil_checkpoint(step, tmp_path / "step_000002", fname, marker, kind)
    (tmp_path / "data").symlink_to(data / "data")
    rc, _, err = cli(pretrain_argv(tmp_path, "victim", "--resume", str(evil)))
    assert_one_line(rc, err, str(evil / fname), "cannot be read")


def test_resume_refuses_a_pickled_dcp_metadata_file(good, tmp_path, marker):
    data, step = good
    evil = shutil.copytree(step, tmp_path / "step_000002")
    write_payload(evil / ".metadata", marker)  # what marks a sharded (torchrun) checkpoint
    reseal(evil)
    (tmp_path / "data").symlink_to(data / "data")
    rc, _, err = cli(pretrain_argv(tmp_path, "victim", "--resume", str(evil)))
    assert_one_line(rc, err, str(evil / ".metadata"), "refused as checkpoint metadata")


def test_hand_edited_state_with_valid_checksums_fails_in_one_line(good, tmp_path):
    data, step = good
    edited = shutil.copytree(step, tmp_path / "step_000002")
    state = json.loads((edited / "state.json").read_text())
    del state["rng"]
    (edited / "state.json").write_text(json.dumps(state))
    reseal(edited)
    (tmp_path / "data").symlink_to(data / "data")
    rc, _, err = cli(pretrain_argv(tmp_path, "victim", "--resume", str(edited)))
    assert_one_line(rc, err, "state.json", "rng")


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_weight_loaders_refuse_pickles(good, tmp_path, marker, kind):
    data, step = good
    evil = _evil_checkpoint(step, tmp_path / "evil", "model.safetensors", marker, kind)
    cfg = small_config(data)
    model = build_model(cfg, torch.device("cpu"))
    for load in (lambda: post_common.load_weights(model, evil), lambda: hf.load_weights(model, evil),
                 lambda: hf.load_weights(model, evil / "model.safetensors")):
        with pytest.raises(UserError, match="model.safetensors"):
            load()
    from moeforge.generate import load_for_chat

    with pytest.raises(UserError, match="model.safetensors"):
        load_for_chat(evil, cfg)


def _hf_dir(good, dst):
    data, step = good
    cfg = small_config(data)
    model = build_model(cfg, torch.device("cpu"))
    hf.load_weights(model, step)  # a genuine checkpoint loads
    return hf.export(model, dst, cfg.model), model


def test_hf_import_refuses_pickles(good, tmp_path, marker):
    hfdir, model = _hf_dir(good, tmp_path / "hf")
    for f in hfdir.glob("*.safetensors"):
        write_payload(f, marker, "torch.save")
    with pytest.raises(UserError, match="cannot read safetensors"):
        hf.import_hf(hfdir)
    with pytest.raises(UserError, match="cannot read safetensors"):
        hf.load_weights(model, hfdir)
    rc, _, err = cli(["import", "--hf", str(hfdir), "--out", str(tmp_path / "out")])
    assert_one_line(rc, err, "model.safetensors", "cannot read safetensors")

    for f in hfdir.glob("*.safetensors"):  # only a pickled pytorch_model.bin: never opened
        f.unlink()
    write_payload(hfdir / "pytorch_model.bin", marker, "torch.save")
    rc, _, err = cli(["import", "--hf", str(hfdir), "--out", str(tmp_path / "out")])
    assert_one_line(rc, err, "no safetensors weights")

    (hfdir / "model.safetensors.index.json").write_text('{"weight_map": ')  # broken index
    rc, _, err = cli(["import", "--hf", str(hfdir), "--out", str(tmp_path / "out")])
    assert_one_line(rc, err, "model.safetensors.index.json")


def test_export_refuses_a_pickled_weights_file(good, tmp_path, marker):
    data, _ = good
    evil = write_payload(tmp_path / "model.safetensors", marker, "pickle")
    argv = ["export", "--weights", str(evil), "--out", str(tmp_path / "hf")]
    for k, v in small_config(data).to_dict()["model"].items():
        argv += [f"--model.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    rc, _, err = cli(argv)
    assert_one_line(rc, err, str(evil), "cannot read safetensors")


def test_distributed_checkpoint_metadata_is_allow_listed(tmp_path, marker):
    from moeforge.parallel import checkpoint as pcheckpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    pcheckpoint.save(tmp_path / "dcp", model, opt)
    fresh = torch.nn.Linear(3, 2)
    pcheckpoint.load(tmp_path / "dcp", fresh)  # genuine DCP metadata passes the allow-list
    assert torch.equal(fresh.weight, model.weight)

    write_payload(tmp_path / "dcp" / ".metadata", marker)
    with pytest.raises(UserError, match=r"\.metadata: refused as checkpoint metadata"):
        pcheckpoint.load(tmp_path / "dcp", fresh)
