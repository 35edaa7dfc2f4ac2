"""Two gloo ranks (FSDP over ``dp_shard=2``), one of them killed or frozen mid-training.

Proves, with processes forked from the fault suite's forkserver:
- SIGKILL of rank 1 in the middle of a step: rank 0 does not hang; it leaves its
  collective with an error within a bounded time and exits with a message naming the
  step and the failure;
- SIGSTOP of rank 1 (a hung, not dead, peer): rank 0 gives up after the process-group
  timeout that ``parallel.mesh.init_distributed`` sets from ``MOEFORGE_DIST_TIMEOUT``
  (5 s here), instead of waiting forever;
- the killed job resumes on two fresh ranks from its last complete distributed (DCP)
  checkpoint, and every step's loss matches the uninterrupted job's within fp32
  tolerance.
The training step is the parallel tests' (``test_parallel_harness.train``'s model and
loss); checkpoints are written with ``moeforge.parallel.checkpoint``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from fault_helpers import _context
from test_parallel_harness import batches, free_port, tiny_config, tiny_model

STEPS, TIMEOUT_S = 6, 5


def _job(rank: int, port: int, tmp: str, tag: str, fault: str, at: int, resume: bool) -> None:
    """One rank of the job: train STEPS steps, DCP checkpoint every 2, rank 1 may hurt itself at step ``at``."""
    tmp_ = Path(tmp)
    fd = os.open(tmp_ / f"{tag}-rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), MOEFORGE_DIST_TIMEOUT=str(TIMEOUT_S))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moeforge.parallel import all_reduce_mean, apply, build_mesh
    from moeforge.parallel import checkpoint as pcheckpoint
    from moeforge.train.losses import lm_loss

    step = 0
    try:
        cfg = tiny_config(dp_shard=2)
        mesh = build_mesh(cfg)  # joins the process group with the bounded timeout
        model = apply(tiny_model(cfg), mesh, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4)
        ckdir = tmp_ / "ckpt"
        if resume:
            done = sorted(int(p.name.split("_")[1]) for p in ckdir.glob("step_*") if (p / "COMPLETE").exists())
            extra = {"step": torch.tensor(0)}
            pcheckpoint.load(ckdir / f"step_{done[-1]}", model, opt, mesh, extra=extra)
            step = int(extra["step"])
        data = batches(STEPS)
        n = data[0][0].shape[0] // 2
        while step < STEPS:
            if rank == 1 and step == at and fault:
                os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            tokens, labels = (t[rank * n:(rank + 1) * n] for t in data[step])
            loss = lm_loss(model(tokens), labels, cfg.model)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = all_reduce_mean(loss, mesh).item()
            step += 1
            if rank == 0:
                with open(tmp_ / f"{tag}-losses.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": mean}) + "\n")
            if step % 2 == 0:
                pcheckpoint.save(ckdir / f"step_{step}", model, opt, mesh, extra={"step": torch.tensor(step)})
                dist.barrier()
                if rank == 0:  # written by every rank: now it counts
                    (ckdir / f"step_{step}" / "COMPLETE").write_text("")
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)
    except Exception as e:
        print(f"rank {rank}: lost the job at step {step + 1}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
              flush=True)
        os._exit(3)


def _launch(tmp: Path, tag: str, fault: str = "", at: int = -1, resume: bool = False):
    port = free_port()
    procs = [_context().Process(target=_job, args=(r, port, str(tmp), tag, fault, at, resume), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    return procs


def _losses(tmp: Path, tag: str) -> dict[int, float]:
    path = tmp / f"{tag}-losses.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def _join(procs, timeout: float) -> None:
    for p in procs:
        p.join(timeout)
        assert p.exitcode is not None, "a rank is still running"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist-ref")
    procs = _launch(tmp, "ref")
    _join(procs, 240)
    assert [p.exitcode for p in procs] == [0, 0], (tmp / "ref-rank0.log").read_text()[-2000:]
    want = _losses(tmp, "ref")
    assert sorted(want) == list(range(1, STEPS + 1))
    return want


@pytest.mark.slow
def test_killed_rank_stops_the_other_and_the_job_resumes(reference, tmp_path):
    procs = _launch(tmp_path, "cut", fault="kill", at=4)  # checkpoints at steps 2 and 4 exist by then
    procs[1].join(240)
    assert procs[1].exitcode == -signal.SIGKILL
    t0 = time.time()
    procs[0].join(60)
    assert procs[0].exitcode == 3, "rank 0 did not leave its collective"
    assert time.time() - t0 < 60
    msg = (tmp_path / "cut-rank0.log").read_text()
    assert "rank 0: lost the job at step 5" in msg, msg[-2000:]

    procs = _launch(tmp_path, "resume", resume=True)
    _join(procs, 240)
    assert [p.exitcode for p in procs] == [0, 0], (tmp_path / "resume-rank0.log").read_text()[-2000:]
    got = {**_losses(tmp_path, "cut"), **_losses(tmp_path, "resume")}
    assert sorted(_losses(tmp_path, "resume")) == [5, 6]  # resumed from step 4
    assert sorted(got) == sorted(reference)
    for s in reference:
        assert got[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), s


@pytest.mark.slow
def test_frozen_rank_makes_the_other_time_out(tmp_path):
    procs = _launch(tmp_path, "frozen", fault="stop", at=1)
    try:
        deadline = time.time() + 240
        while procs[1].is_alive() and time.time() < deadline:  # wait until rank 1 has frozen itself
            if open(f"/proc/{procs[1].pid}/stat").read().split(")")[1].split()[0] == "T":
                break
            time.sleep(0.05)
        t0 = time.time()
        procs[0].join(TIMEOUT_S + 60)
        waited = time.time() - t0
        assert procs[0].exitcode == 3, "rank 0 is still waiting for the frozen peer"
        assert waited < TIMEOUT_S + 60
        msg = (tmp_path / "frozen-rank0.log").read_text()
        assert "rank 0: lost the job at step 2" in msg and "Timed out" in msg, msg[-2000:]
    finally:
        procs[1].kill()
        procs[1].join(30)
