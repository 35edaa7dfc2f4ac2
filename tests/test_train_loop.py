"""The training loop in-process: loss falls, accumulation = big batch, NaN skip and streak
stop, Ctrl-C checkpoint + bitwise resume, corrupt/incomplete checkpoints, bad inputs."""

from __future__ import annotations

import os
import signal
import tomllib

import pytest
import torch

from moeforge.errors import UserError
from moeforge.train import checkpoint as ckpt
from moeforge.train.loop import TrainingStopped, train
from moeforge.train.metrics import read_records
from moeforge.train.pretrain import PretrainStage, build_model, pretrain, run_pretrain
from train_helpers import losses, mem_datasets, small_config


def test_loss_falls_and_run_dir_has_everything(tmp_path):
    cfg = small_config(tmp_path, train__steps=24, train__eval_every=12, train__ckpt_every=12)
    run = pretrain(cfg, datasets=mem_datasets())
    recs = read_records(run / "metrics.jsonl")
    train_recs = [r for r in recs if r["kind"] == "train"]
    first = sum(r["lm"] for r in train_recs[:3]) / 3
    last = sum(r["lm"] for r in train_recs[-3:]) / 3
    assert last < first - 0.8, (first, last)  # ln(256)=5.5 at the start; the bigram chain is learnable
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [12, 24] and evals[1]["loss"] < evals[0]["loss"]
    assert evals[1]["ppl"] == pytest.approx(torch.tensor(evals[1]["loss"]).exp().item(), rel=1e-5)
    assert evals[1]["bpb"] == pytest.approx(evals[1]["loss"] / 0.6931471805599453 / 2.0)
    r = train_recs[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb", "mtp", "aux"):
        assert r[key] is not None and r[key] >= 0, key
    assert len(r["maxvio"]) == 2 and len(r["expert_load"]) == 2 and len(r["expert_load"][0]) == 4
    assert any((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert (run / "plots" / "expert_load.png").stat().st_size > 1000
    assert tomllib.loads((run / "config.toml").read_text())["train"]["steps"] == 24
    assert [p.name for _, p in ckpt.step_dirs(run / "checkpoints")] == ["step_000024", "step_000012"]
    # the router bias was updated, checkpointed, and is not a parameter
    state = ckpt.load_tensors(run / "checkpoints" / "step_000024", "model.safetensors")
    assert state["layers.1.ffn.gate.bias"].abs().sum() > 0


def _one_step(tmp_path, monkeypatch, name, mbs, accum):
    """Params after one step, and the (clipped) gradients AdamW received."""
    from moeforge.train.optim import AdamW

    seen = {}
    step = AdamW.step

    def recording_step(self):
        seen.update({n: p.grad.clone() for n, p in self.params})
        step(self)

    monkeypatch.setattr(AdamW, "step", recording_step)
    cfg = small_config(tmp_path, train__steps=1, train__micro_batch_size=mbs, train__grad_accum=accum,
                       train__run_name=name)
    model = build_model(cfg, torch.device("cpu"))
    stage = PretrainStage(cfg, *mem_datasets(), torch.device("cpu"))
    train(model, stage, cfg, tmp_path / name)
    return model.state_dict(), seen


def test_accumulating_micro_batches_equals_one_big_batch(tmp_path, monkeypatch):
    big, g_big = _one_step(tmp_path, monkeypatch, "big", mbs=8, accum=1)
    small, g_small = _one_step(tmp_path, monkeypatch, "small", mbs=2, accum=4)  # the same 8 windows, in 4 parts
    assert g_big.keys() == g_small.keys() and len(g_big) > 10
    for k in g_big:  # fp32: equal up to summation order
        torch.testing.assert_close(g_small[k], g_big[k], rtol=1e-5, atol=1e-7, msg=k)
    for k in big:  # Adam's first step is ~lr*sign(g), which magnifies rounding of near-zero gradients
        torch.testing.assert_close(small[k], big[k], rtol=0, atol=1e-5, msg=k)
    assert torch.equal(small["layers.1.ffn.gate.bias"], big["layers.1.ffn.gate.bias"])  # counts summed over micro-batches


class NanStage(PretrainStage):
    """Pretraining whose loss is NaN at the given 0-based steps."""

    bad_steps: set[int] = set()

    def loss(self, model, batch, step):
        parts = super().loss(model, batch, step)
        if step in self.bad_steps:
            parts["loss"] = parts["loss"] * float("nan")
        return parts


def _run_nan(tmp_path, bad, **over):
    cfg = small_config(tmp_path, **over)
    model = build_model(cfg, torch.device("cpu"))
    stage = NanStage(cfg, *mem_datasets(), torch.device("cpu"))
    stage.bad_steps = bad
    return cfg, model, train(model, stage, cfg, tmp_path / "runs" / cfg.train.run_name)


def test_nan_step_is_skipped_and_logged(tmp_path, capsys):
    cfg, model, res = _run_nan(tmp_path, {2}, train__steps=5)
    assert res.status == "done" and res.step == 5
    recs = read_records(res.run_dir / "metrics.jsonl")
    skips = [r for r in recs if r["kind"] == "skip"]
    assert [s["step"] for s in skips] == [3] and skips[0]["loss"] is None
    assert 3 not in losses(res.run_dir) and set(losses(res.run_dir)) == {1, 2, 4, 5}
    assert "step 3: non-finite loss" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_streak_stops_with_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingStopped, match=r"3 consecutive non-finite steps \(4-6\).*step_000006"):
        _run_nan(tmp_path, {3, 4, 5, 6, 7}, train__steps=10, train__max_bad_steps=3, train__ckpt_every=3)
    root = tmp_path / "runs" / "tiny" / "checkpoints"
    good = ckpt.load_tensors(root / "step_000003", "model.safetensors")  # after the last finite step
    stopped = ckpt.load_tensors(root / "step_000006", "model.safetensors")
    assert ckpt.verify(root / "step_000006")["stopped"] == "non-finite steps 4-6"
    for k in good:
        assert torch.equal(good[k], stopped[k]), k


class InterruptStage(PretrainStage):
    """Sends itself SIGINT (a Ctrl-C) during the given 0-based step."""

    at: int = -1

    def loss(self, model, batch, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().loss(model, batch, step)


def test_ctrl_c_writes_checkpoint_and_resume_is_bitwise(tmp_path):
    ref = pretrain(small_config(tmp_path, train__steps=6, train__run_name="ref"), datasets=mem_datasets())
    cfg = small_config(tmp_path, train__steps=6, train__run_name="cut")
    model = build_model(cfg, torch.device("cpu"))
    stage = InterruptStage(cfg, *mem_datasets(), torch.device("cpu"))
    stage.at = 2
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    res = train(model, stage, cfg, tmp_path / "runs" / "cut")
    assert res.status == "interrupted" and res.step == 3 and res.checkpoint.name == "step_000003"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    out = run_pretrain(cfg, resume="latest", datasets=mem_datasets())
    assert out.status == "done" and out.step == 6
    assert losses(tmp_path / "runs" / "cut") == losses(ref)  # bitwise: same floats, step for step


def test_truncated_checkpoint_is_rejected_and_previous_used(tmp_path, capsys):
    cfg = small_config(tmp_path, train__steps=4, train__ckpt_every=2, train__keep_last=3)
    run = pretrain(cfg, datasets=mem_datasets())
    root = run / "checkpoints"
    bad = root / "step_000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(UserError, match=r"step_000004/model.safetensors is corrupt"):
        ckpt.verify(root / "step_000004")
    (root / "step_000005").mkdir()  # a write that died before its COMPLETE marker
    capsys.readouterr()
    assert ckpt.latest(root) == root / "step_000002"
    err = capsys.readouterr().err
    assert "step_000005 is incomplete" in err and "step_000004/model.safetensors is corrupt" in err
    res = run_pretrain(small_config(tmp_path, train__steps=4, train__ckpt_every=2, train__keep_last=3),
                       resume="latest", datasets=mem_datasets())
    assert res.step == 4 and ckpt.verify(root / "step_000004")["step"] == 4  # rewritten, valid again


def test_bad_inputs_fail_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match=r"output directory .*file/tiny cannot be written"):
        pretrain(small_config(tmp_path, train__out_dir=str(blocker)), datasets=mem_datasets())
    with pytest.raises(UserError, match=r"no valid checkpoint"):
        pretrain(small_config(tmp_path), resume="latest", datasets=mem_datasets())
    with pytest.raises(UserError, match=r"does not exist"):
        pretrain(small_config(tmp_path), resume=tmp_path / "nope" / "step_000001", datasets=mem_datasets())
    cfg = small_config(tmp_path, train__steps=2, train__ckpt_every=0)
    pretrain(cfg, datasets=mem_datasets())
    with pytest.raises(UserError, match=r"already holds checkpoints: pass --resume"):
        pretrain(cfg, datasets=mem_datasets())
    with pytest.raises(UserError, match=r"trained with model.dim=64 but this config has model.dim=32"):
        pretrain(small_config(tmp_path, train__steps=3, model__dim=32), resume="latest", datasets=mem_datasets())


def test_activation_checkpointing_gives_the_same_gradients():
    import torch

    from moeforge.config import load_config
    from moeforge.train.losses import lm_loss
    from moeforge.train.pretrain import build_model

    over = {"model.vocab_size": 64, "model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.inter_dim": 48,
            "model.moe_inter_dim": 16, "model.q_lora_rank": 16, "model.kv_lora_rank": 16,
            "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 4, "model.v_head_dim": 8,
            "model.n_expert_groups": 1, "model.n_limited_groups": 1, "train.dtype": "fp32"}
    tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for ac in (False, True):
        cfg = load_config(None, {**over, "train.activation_checkpointing": ac})
        model = build_model(cfg, torch.device("cpu"))
        out = model(tok[:, :-1])
        lm_loss(out, tok[:, 1:], cfg.model)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert out.expert_counts is not None
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_mfu_uses_the_best_gemm_rate_seen(tmp_path, monkeypatch):
    """The GEMM peak is measured again at each log point and the best kept: a slow first
    measurement (a busy host) must not inflate every later MFU figure."""
    import moeforge.train.loop as loop
    import moeforge.train.metrics as metrics

    # far above what this tiny model reaches, so no figure is raised to the step's own rate
    rates = iter([1e14, 4e14, 2e14, 3e14, 5e14] + [5e14] * 100)  # start-up, then one per log point
    for mod in (loop, metrics):  # start-up measures through metrics.gemm_peak_flops
        monkeypatch.setattr(mod, "measure_peak_flops", lambda *a, **k: next(rates))
    cfg = small_config(tmp_path, train__steps=8, train__log_every=2)
    run = pretrain(cfg, datasets=mem_datasets())
    recs = [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "train"]
    peaks = [r["flops_per_s"] / r["mfu"] for r in recs]
    assert peaks == pytest.approx([4e14, 4e14, 4e14, 5e14, 5e14][: len(peaks)], rel=1e-6)
    assert [r["peak_flops"] for r in recs] == pytest.approx(peaks, rel=1e-6)


def test_mfu_never_above_100_percent_with_a_too_low_measured_peak(tmp_path, monkeypatch):
    """A peak measured far too low (a busy host, or the wrong dtype: bf16 on an AVX2 CPU once
    gave "MFU 405%") cannot push MFU over 100%: the step's own rate bounds the peak from below."""
    import moeforge.train.loop as loop
    import moeforge.train.metrics as metrics

    for mod in (loop, metrics):
        monkeypatch.setattr(mod, "measure_peak_flops", lambda *a, **k: 1.0)  # 1 FLOP/s
    cfg = small_config(tmp_path, train__steps=4, train__log_every=1)
    res = run_pretrain(cfg, datasets=mem_datasets())
    recs = [r for r in read_records(res.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(recs) == 4 and all(0 < r["mfu"] <= 1.0 for r in recs)
    assert all(r["peak_flops"] >= r["flops_per_s"] for r in recs)
    assert 0 < res.summary["mfu"] <= 1.0


def test_measured_gemm_peak_is_a_real_rate():
    """The MFU denominator itself (not mocked): a finite rate of at least 1 GFLOP/s in fp32,
    and the rate one timed GEMM of the same size gives, to within the noise of a busy host."""
    import math
    import time

    from moeforge.train.metrics import measure_peak_flops

    rate = measure_peak_flops(torch.float32, torch.device("cpu"), n=512)
    assert 1e9 < rate < math.inf
    a = torch.randn(512, 512)
    a @ a
    t = time.perf_counter()
    a @ a
    assert rate >= 0.2 * 2 * 512**3 / (time.perf_counter() - t)  # a best-of-5 is not far below one call
