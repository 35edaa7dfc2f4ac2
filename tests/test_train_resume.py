"""SIGKILL a real `moeforge pretrain` process mid-run, resume it, and get the same losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import SMALL, losses, write_shards

ROOT = Path(__file__).resolve().parent.parent


def _cmd(tmp: Path, run_name: str, *extra: str) -> list[str]:
    over = dict(SMALL, **{"train.steps": 12, "train.ckpt_every": 2, "train.keep_last": 2,
                          "train.out_dir": str(tmp / "runs"), "train.run_name": run_name,
                          "data.data_dir": str(tmp / "data")})
    args = [sys.executable, "-m", "moeforge.cli", "pretrain", "--config", "configs/tiny.toml"]
    for k, v in over.items():
        args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return args + list(extra)


def _env() -> dict[str, str]:
    # the same thread count in every process: float reductions must split the same way
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses_bitwise(tmp_path):
    write_shards(tmp_path / "data")
    ref = subprocess.run(_cmd(tmp_path, "ref"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "[pretrain] checkpoint:" in ref.stdout and "step_000012" in ref.stdout

    cut_dir = tmp_path / "runs" / "cut"
    proc = subprocess.Popen(_cmd(tmp_path, "cut"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (cut_dir / "checkpoints" / "step_000004" / "COMPLETE").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # it really died mid-run
    killed_at = max(losses(cut_dir))
    assert killed_at < 12

    res = subprocess.run(_cmd(tmp_path, "cut", "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    want, got = losses(tmp_path / "runs" / "ref"), losses(cut_dir)
    assert sorted(got) == list(range(1, 13))
    assert got == want  # every step's loss, bitwise
