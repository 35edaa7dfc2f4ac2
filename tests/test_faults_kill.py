"""SIGKILL a real `moeforge pretrain` process and resume it: nothing of the run is lost.

Proves, on the tiny model (dim 64, 2 layers, vocab 256) in single-threaded CPU processes:
- killed at a random step (three seeds, a random moment inside the step), ``--resume``
  continues from the newest checkpoint and the loss of every step equals the
  uninterrupted run's, bitwise;
- killed *while a checkpoint is being written* (half-written optimizer file, or every
  file written but the COMPLETE marker not yet), the previous checkpoint stays valid
  and is the one resumed; the partial directory is never taken for a checkpoint, not
  even when it is given a real step directory's name, and the next save removes it.

One uninterrupted reference run is shared by every test of the module.
"""

from __future__ import annotations

import random
import shutil
import time

import pytest

from fault_helpers import losses, pretrain_argv, resumed_from, run, sigkill, start, wait_for
from moeforge.train import checkpoint as ckpt
from train_helpers import write_shards

STEPS = 8  # pretrain_argv's default; a checkpoint every 2 steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    write_shards(tmp / "data", n_train=6000, n_val=1000)
    rc, log = run(pretrain_argv(tmp, "ref"), tmp / "ref.log")
    assert rc == 0, log[-2000:]
    want = losses(tmp / "runs" / "ref")
    assert sorted(want) == list(range(1, STEPS + 1))
    return tmp, want


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_step_then_resume_is_bitwise(world, seed):
    tmp, want = world
    rng = random.Random(seed)
    after, delay = rng.randint(3, STEPS - 2), rng.uniform(0.0, 0.05)  # step 2's checkpoint exists by step 3
    name = f"kill{seed}"
    run_dir = tmp / "runs" / name
    # each step slowed by 0.1 s: a tiny step takes milliseconds, and without it the run
    # could finish between the poll that saw step `after` and the kill
    proc = start(pretrain_argv(tmp, name), tmp / f"{name}.log", patches=[("no_plots", ""), ("slow_steps", "0.1")])
    wait_for(lambda: max(losses(run_dir), default=0) >= after, proc, tmp / f"{name}.log", what=f"step {after}")
    time.sleep(delay)  # somewhere inside the next step (or its checkpoint write)
    sigkill(proc)
    reached = max(losses(run_dir))
    assert after <= reached < STEPS

    rc, log = run(pretrain_argv(tmp, name, "--resume"), tmp / f"{name}-resume.log")
    assert rc == 0, log[-2000:]
    start_step = int(resumed_from(run_dir).rsplit("_", 1)[1])
    assert start_step % 2 == 0 and 2 <= start_step <= reached  # the newest checkpoint before the kill
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want, (seed, after, start_step)  # every step's loss, bitwise


@pytest.mark.slow
@pytest.mark.parametrize("where", ["pause_in_optimizer_write", "pause_before_marker"])
def test_sigkill_during_checkpoint_write_resumes_previous_checkpoint(world, where):
    tmp, want = world
    run_dir = tmp / "runs" / where
    root = run_dir / "checkpoints"
    paused = tmp / f"{where}.paused"
    log = tmp / f"{where}.log"
    proc = start(pretrain_argv(tmp, where), log, patches=[("no_plots", ""), (where, f"step_000004:{paused}")])
    wait_for(paused.exists, proc, log, what="the checkpoint writer to pause")
    sigkill(proc)

    partial = root / ".tmp-step_000004"
    assert partial.is_dir() and not (partial / ckpt.MARKER).exists()
    assert (partial / "model.safetensors").is_file()  # really mid-write: some files are there
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_000002"]
    ckpt.verify(root / "step_000002")  # the previous checkpoint is intact
    # a copy of the partial directory under a real step name is still no checkpoint
    shutil.copytree(partial, root / "step_000006")
    assert ckpt.latest(root) == root / "step_000002"

    rc, out = run(pretrain_argv(tmp, where, "--resume"), tmp / f"{where}-resume.log")
    assert rc == 0, out[-2000:]
    assert "step_000006 is incomplete" in out  # reported, skipped
    assert resumed_from(run_dir) == str(root / "step_000002")
    assert losses(run_dir) == want
    assert not partial.exists()  # leftovers of the crash are removed by the next save
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_000008", "step_000006", "step_000004"]
    for _, p in ckpt.step_dirs(root):
        ckpt.verify(p)  # step 6 was rewritten as a real checkpoint
