"""Non-finite numbers injected into the loss *and into the gradients* of a training step.

``test_train_loop.py`` already covers a NaN loss. Here the loss can stay finite while the
backward pass produces NaN/Inf (what an overflowing FP8/BF16 GEMM does), and the fault
can sit in one micro-batch of several. Proves:
- the step is skipped: no AdamW update (parameters, moments and step count unchanged),
  no move of the MoE balancing bias; it is logged (a ``skip`` record naming the step,
  a console line) and training continues;
- a streak of poisoned gradients stops ``moeforge pretrain`` with exit code 2 and one
  line naming the steps and the checkpoint, that checkpoint holds the last good weights,
  and ``--resume`` from it finishes the run once the fault is gone.
"""

from __future__ import annotations

import pytest
import torch

from fault_helpers import assert_one_line, cli, fast, pretrain_argv  # noqa: F401 (fast: autouse fixture)
from moeforge.train import checkpoint as ckpt
from moeforge.train.loop import train
from moeforge.train.metrics import read_records
from moeforge.train.optim import AdamW
from moeforge.train.pretrain import PretrainStage, build_model
from train_helpers import losses, mem_datasets, small_config, write_shards


class _Poison(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``value``."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.value, None


class FaultyStage(PretrainStage):
    """Injects ``fault`` at the given 0-based steps and snapshots the model and optimizer there."""

    fault, bad_steps, opt = "", set(), None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.micro, self.snapshots = 0, {}

    def loss(self, model, batch, step):
        if step not in self.snapshots:  # the state every step starts from
            moments = {k: v.clone() for k, v in self.opt.state_tensors().items()} if self.opt else {}
            self.snapshots[step] = ({k: v.clone() for k, v in model.state_dict().items()}, moments)
        parts = super().loss(model, batch, step)
        self.micro += 1
        if step in self.bad_steps:
            if self.fault == "inf loss":
                parts["loss"] = parts["loss"] * float("inf")
            elif self.fault == "nan grads":  # the loss stays finite
                parts["loss"] = _Poison.apply(parts["loss"], float("nan"))
            elif self.fault == "inf grads in 2nd micro-batch" and self.micro % 2 == 0:
                parts["loss"] = _Poison.apply(parts["loss"], float("inf"))
        return parts


@pytest.mark.parametrize("fault", ["inf loss", "nan grads", "inf grads in 2nd micro-batch"])
def test_non_finite_step_is_skipped_without_any_update(tmp_path, monkeypatch, capsys, fault):
    accum = 2 if "micro-batch" in fault else 1
    cfg = small_config(tmp_path, train__steps=5, train__grad_accum=accum, train__micro_batch_size=4 // accum)
    model = build_model(cfg, torch.device("cpu"))
    stage = FaultyStage(cfg, *mem_datasets(), torch.device("cpu"))
    stage.fault, stage.bad_steps = fault, {2}
    updates = []
    real_init, real_step = AdamW.from_config, AdamW.step

    def from_config(*a, **k):
        stage.opt = real_init(*a, **k)
        return stage.opt

    def step(self):
        updates.append(self.step_count)
        real_step(self)

    monkeypatch.setattr(AdamW, "from_config", staticmethod(from_config))
    monkeypatch.setattr(AdamW, "step", step)
    res = train(model, stage, cfg, tmp_path / "run")

    assert res.status == "done" and res.step == 5
    assert len(updates) == 4  # five steps, one skipped
    (w2, m2), (w3, m3) = stage.snapshots[2], stage.snapshots[3]
    for k in w2:  # weights and the router bias buffer did not move during the skipped step
        assert torch.equal(w2[k], w3[k]), k
    assert m2.keys() == m3.keys() and all(torch.equal(m2[k], m3[k]) for k in m2)  # nor did the moments
    assert any(not torch.equal(stage.snapshots[1][0][k], w2[k]) for k in w2)  # (a normal step does move them)
    skips = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "skip"]
    assert [s["step"] for s in skips] == [3]
    assert "step 3: non-finite loss or gradient" in capsys.readouterr().out
    assert set(losses(tmp_path / "run")) == {1, 2, 4, 5}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_streak_of_poisoned_gradients_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    write_shards(tmp_path / "data", n_train=6000, n_val=1000)
    real = PretrainStage.loss

    def poisoned(self, model, batch, step):
        parts = real(self, model, batch, step)
        if step >= 3:  # from the 4th step on, every gradient is NaN while the loss looks fine
            parts["loss"] = _Poison.apply(parts["loss"], float("nan"))
        return parts

    monkeypatch.setattr(PretrainStage, "loss", poisoned)
    argv = pretrain_argv(tmp_path, "run", train__steps=10, train__ckpt_every=3, train__max_bad_steps=3)
    rc, _, err = cli(argv)
    root = tmp_path / "runs" / "run" / "checkpoints"
    assert_one_line(rc, err, "training stopped: 3 consecutive non-finite steps (4-6)", str(root / "step_000006"))
    good = ckpt.load_tensors(root / "step_000003", "model.safetensors")
    stopped = ckpt.load_tensors(root / "step_000006", "model.safetensors")
    assert all(torch.equal(good[k], stopped[k]) for k in good)  # the last good weights

    monkeypatch.setattr(PretrainStage, "loss", real)  # the fault is gone (e.g. a lower lr)
    rc, _, err = cli(argv + ["--resume"])
    assert rc == 0, err
    assert sorted(losses(root.parent)) == [1, 2, 3, 7, 8, 9, 10]  # 4-6 were skipped, the run finished
