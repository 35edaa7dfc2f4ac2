"""A full disk or an unwritable directory: detected at the write, one line, nothing lost.

Proves, with ``moeforge pretrain`` in a child process (the faults are injected there):
- a real kernel write failure while the step-4 checkpoint is written (``RLIMIT_FSIZE``
  makes the write fail with EFBIG, as a full disk fails with ENOSPC), in the first or
  the second tensor file; ENOSPC on ``state.json``; EACCES on the optimizer file:
  the run stops with exit code 2 and one stderr line naming the checkpoint and the
  cause, no temporary directory is left, the step-2 checkpoint is byte-for-byte what it
  was, and ``--resume`` (space freed) continues from it to the end;
- an output directory that cannot be created is reported before any training.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fault_helpers import assert_one_line, cli, losses, pretrain_argv, resumed_from, run
from moeforge.train import checkpoint as ckpt
from train_helpers import write_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk")
    write_shards(tmp / "data", n_train=6000, n_val=1000)
    return tmp / "data"


def _model_bytes(tmp: Path) -> int:
    """Size of the tiny model's safetensors file (the optimizer file is about twice that)."""
    import torch
    from safetensors.torch import save_file

    from moeforge.train.pretrain import build_model
    from train_helpers import small_config

    path = tmp / "probe.safetensors"
    save_file(dict(build_model(small_config(tmp), torch.device("cpu")).state_dict()), str(path))
    return path.stat().st_size


FAULTS = {
    "EFBIG in model file": lambda size: ("fsize_limit_at", f"4:{size // 2}", "File too large"),
    "EFBIG in optimizer file": lambda size: ("fsize_limit_at", f"4:{size + 4096}", "File too large"),
    "ENOSPC in state.json": lambda size: ("enospc_in", "step_000004:state.json", os.strerror(errno.ENOSPC)),
    "EACCES in optimizer file": lambda size: ("eacces_in", "step_000004:optimizer.safetensors",
                                              os.strerror(errno.EACCES)),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_write_failure_mid_checkpoint_keeps_previous_and_resumes(data, tmp_path, fault):
    (tmp_path / "data").symlink_to(data)
    name, arg, cause = FAULTS[fault](_model_bytes(tmp_path))
    root = tmp_path / "runs" / "run" / "checkpoints"
    rc, out = run(pretrain_argv(tmp_path, "run"), tmp_path / "full.log", patches=[("no_plots", ""), (name, arg)])
    err = [ln for ln in out.splitlines() if ln.startswith("moeforge pretrain:")]
    assert_one_line(rc, err, "step_000004 could not be written", cause, "earlier checkpoints")
    assert "Traceback" not in out
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_000002"]
    assert not list(root.glob(".tmp-*"))  # the half-written directory is gone
    ckpt.verify(root / "step_000002")  # every byte as written: checksums in state.json, its own in COMPLETE

    rc, out = run(pretrain_argv(tmp_path, "run", "--resume"), tmp_path / "resume.log")
    assert rc == 0, out[-2000:]
    assert resumed_from(root.parent) == str(root / "step_000002")
    assert sorted(losses(root.parent)) == list(range(1, 9))
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_000008", "step_000006", "step_000004"]


def test_output_directory_that_cannot_be_created_is_reported_before_training(data, tmp_path, monkeypatch):
    (tmp_path / "data").symlink_to(data)
    out_dir = tmp_path / "readonly"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(out_dir)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, _, err = cli(pretrain_argv(tmp_path, "run", train__out_dir=str(out_dir)))
    assert_one_line(rc, err, "output directory", str(out_dir / "run"), "Read-only file system")
