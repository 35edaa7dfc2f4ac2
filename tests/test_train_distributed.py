"""`moeforge pretrain` under torchrun on 2 gloo ranks equals one process on the same global batch.

Runs (subprocesses, OMP_NUM_THREADS=1, a tiny model on the bigram shards of
train_helpers): one process with micro_batch_size 4, then 2 ranks with 2 each, with
2 accumulated micro-batches per step (gradients reduced on the last only) and
checkpoints every 2 steps. Checked, against the single process (fp32, rtol 1e-4):
- dp_shard=2 (FSDP): the logged loss of every step matches;
- its sharded step-4 checkpoint resumes under dp_shard=2 x ep=2 (experts split over
  the ranks, all-to-all dispatch) and in one process: steps 5-6 match both times;
- the router bias ends identical on both ranks of both layouts and equal to the single
  process's (sign updates from the same global counts);
- pp=2 (1F1B, 2 pipeline micro-batches per batch; the forward_backward hook): every
  step's loss, the eval loss and the bias of the MoE layers each rank holds match, rank
  0 alone logs, and its step-4 checkpoint resumes in one process (steps 5-6 match).

The ranks run this file as their script: it calls ``moeforge.cli.main`` (the torchrun
entry point, unchanged) and afterwards saves its rank's router biases for the checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import SMALL, losses, small_config, write_shards

from moeforge.model.transformer import Transformer
from moeforge.train.checkpoint import load_tensors
from moeforge.train.metrics import read_records
from moeforge.train.post_common import load_weights

OVERRIDES = {**SMALL, "train.steps": 6, "train.grad_accum": 2, "train.ckpt_every": 2, "train.keep_last": 3,
             "train.schedule": "constant"}


def _args(tmp: Path, run: str, **extra) -> list[str]:
    over = {**OVERRIDES, "train.out_dir": str(tmp / "runs"), "train.run_name": run, "data.data_dir": str(tmp / "data"),
            **{k.replace("__", "."): v for k, v in extra.items()}}
    return ["pretrain"] + [a for k, v in over.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOEFORGE_DIST_TIMEOUT": "120",
            "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}


def _run(cmd: list[str], tmp: Path) -> None:
    res = subprocess.run(cmd, env=_env(), cwd=tmp, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


def _torchrun(tmp: Path, run: str, **extra) -> None:
    from test_parallel_harness import free_port

    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
          __file__, *_args(tmp, run, **extra)], tmp)


def _single(tmp: Path, run: str, **extra) -> None:
    _run([sys.executable, __file__, *_args(tmp, run, **extra)], tmp)


def _biases(tmp: Path, run: str, rank: int) -> list[torch.Tensor]:
    return torch.load(tmp / "runs" / run / f"router_bias.rank{rank}.pt")


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) and a, (a, b)
    torch.testing.assert_close(torch.tensor([a[k] for k in sorted(a)]), torch.tensor([b[k] for k in sorted(b)]),
                               rtol=1e-4, atol=0)


@pytest.mark.slow
def test_pretrain_dp2_matches_one_process_and_resumes_as_ep2_and_in_one_process(tmp_path):
    write_shards(tmp_path / "data")
    _single(tmp_path, "one", train__micro_batch_size=4)
    _torchrun(tmp_path, "dp2", train__micro_batch_size=2, parallel__dp_shard=2)
    step4 = tmp_path / "runs" / "dp2" / "checkpoints" / "step_000004"
    assert (step4 / ".metadata").is_file() and not (step4 / "model.safetensors").exists()  # sharded
    _torchrun(tmp_path, "ep2", train__micro_batch_size=2, parallel__dp_shard=2, parallel__ep=2, resume=str(step4))
    _single(tmp_path, "resumed", train__micro_batch_size=4, resume=str(step4))
    ref = losses(tmp_path / "runs" / "one")
    assert len(ref) == 6
    _close(losses(tmp_path / "runs" / "dp2"), ref)
    for run in ("ep2", "resumed"):
        _close(losses(tmp_path / "runs" / run), {k: v for k, v in ref.items() if k > 4})
    ref_bias = _biases(tmp_path, "one", 0)
    for run in ("dp2", "ep2"):
        for rank in (0, 1):
            for got, want in zip(_biases(tmp_path, run, rank), ref_bias):
                assert torch.equal(got, want), f"{run} rank {rank}: router bias differs"
    records = read_records(tmp_path / "runs" / "dp2" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote them

    # post-training, chat and eval read a sharded checkpoint's full weights by name (ep2's experts included)
    model = Transformer(small_config(tmp_path).model)
    load_weights(model, tmp_path / "runs" / "ep2" / "checkpoints" / "step_000006")
    want = load_tensors(tmp_path / "runs" / "one" / "checkpoints" / "step_000006", "model.safetensors")
    for k, v in model.state_dict().items():  # seen: 3e-6 (Adam magnifies rounding); a misplaced tensor: O(0.02)
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_pretrain_pp2_matches_one_process_and_resumes_in_one_process(tmp_path):
    write_shards(tmp_path / "data")
    evals = {"train__eval_every": 3}
    _single(tmp_path, "one", train__micro_batch_size=4, **evals)
    _torchrun(tmp_path, "pp2", train__micro_batch_size=4, parallel__pp=2, parallel__pp_microbatches=2, **evals)
    step4 = tmp_path / "runs" / "pp2" / "checkpoints" / "step_000004"
    assert (step4 / ".metadata").is_file()
    _single(tmp_path, "resumed", train__micro_batch_size=4, resume=str(step4), **evals)
    ref = losses(tmp_path / "runs" / "one")
    assert len(ref) == 6
    _close(losses(tmp_path / "runs" / "pp2"), ref)
    _close(losses(tmp_path / "runs" / "resumed"), {k: v for k, v in ref.items() if k > 4})
    records = read_records(tmp_path / "runs" / "pp2" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote them
    norms = {r["step"]: r["grad_norm"] for r in records if r["kind"] == "train"}  # the clipping sees the global norm
    _close(norms, {r["step"]: r["grad_norm"] for r in read_records(tmp_path / "runs" / "one" / "metrics.jsonl")
                   if r["kind"] == "train"})
    ref_eval = [r["loss"] for r in read_records(tmp_path / "runs" / "one" / "metrics.jsonl") if r["kind"] == "eval"]
    got_eval = [r["loss"] for r in records if r["kind"] == "eval"]
    assert len(ref_eval) == 2
    torch.testing.assert_close(torch.tensor(got_eval), torch.tensor(ref_eval), rtol=1e-4, atol=0)
    ref_bias = _biases(tmp_path, "one", 0)
    held = 0
    for rank in (0, 1):
        for i, got in enumerate(_biases(tmp_path, "pp2", rank)):
            if got is not None:
                held += 1
                assert torch.equal(got, ref_bias[i]), f"pp2 rank {rank}: router bias of MoE layer {i} differs"
    assert held == len(ref_bias)  # each MoE layer on exactly one stage


if __name__ == "__main__":  # one rank (or the single process) of the runs above
    from moeforge.cli import main
    from moeforge.train import pretrain

    real_train = pretrain.train

    def train_and_keep_bias(model, stage, cfg, run_dir, **kw):
        result = real_train(model, stage, cfg, run_dir, **kw)
        rank = int(os.environ.get("RANK", "0"))
        biases = [m.gate.bias.clone() if m is not None else None for m in model.moe_layers()]  # None: another stage's
        torch.save(biases, Path(run_dir) / f"router_bias.rank{rank}.pt")
        return result

    pretrain.train = train_and_keep_bias
    sys.exit(main(sys.argv[1:]))
