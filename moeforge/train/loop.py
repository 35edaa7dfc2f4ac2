"""The one training loop. Pretraining, SFT, reward modelling, DPO and GRPO are *stages*.

A stage is any object with this small interface (duck-typed; see :class:`Stage`)::

    tokens_per_batch: int              nominal tokens per micro-batch (batch ramp, tokens/s)
    next_batch() -> batch              the next training micro-batch, on the model's device
    loss(model, batch, step) -> dict   'loss': scalar to backpropagate (mean over the
                                       micro-batch); other 0-d tensors are logged parts
                                       ('lm', 'mtp', 'aux', ...); optional 'expert_counts'
                                       [n_moe_layers, E] tokens per expert (drives the
                                       MoE bias update; use ModelOutput.expert_counts)
    evaluate(model) -> dict[str,float] held-out metrics; called in eval mode, no_grad
    state_dict() / load_state_dict(d)  JSON-safe data position, saved in checkpoints
    forward_backward(model, batch, step, n) -> dict   optional: for a model that runs
                                       backward itself (a pipeline schedule); backpropagates
                                       loss / n and returns the parts as ``loss`` would

One optimizer step (:func:`train`):
  micro-batches per step from the batch ramp -> for each: ``loss/n`` backward (gradients
  accumulate in FP32 on the master weights) -> global grad norm -> one host sync that
  checks loss and norm are finite -> clip, AdamW step at the scheduled LR -> MoE bias
  update from the expert counts summed over all micro-batches of the step.

Choices:
- Non-finite loss or gradients: the step is skipped (no update, no bias move), logged
  with its number, and counted; ``max_bad_steps`` in a row stop the run with
  :class:`TrainingStopped` after saving the last good weights (unchanged since the last
  finite step). Skipped steps still advance the step counter and the data.
- One ``.tolist()`` per step is the only host sync in the hot path (the finiteness check
  needs it anyway); parts and counts accumulate as tensors.
- Ctrl-C sets a flag: the current step finishes, a checkpoint is written, and the run
  returns with status "interrupted" (resume continues exactly there). A second Ctrl-C
  raises KeyboardInterrupt at once, without a checkpoint.
- Determinism: resume restores weights and buffers (router bias), AdamW moments and
  step count, the stage's position and every RNG state; with the same thread count the
  resumed losses are bitwise equal to an uninterrupted run on CPU.
- Distributed (``mesh`` from ``parallel.build_mesh``; helpers in ``distributed.py``):
  gradients are reduced across data-parallel ranks only on the last micro-batch; the
  step's loss parts and gradient norm come from one all-reduce, so every rank takes the
  same finite/skip/clip decision; the balancing bias moves from the global expert counts
  (identical on all ranks); a stop signal stops all ranks together; checkpoints are
  sharded (DCP); metrics, progress and plots come from rank 0 only. Under pipeline
  parallelism the schedule runs forward and backward together, so the stage supplies
  ``forward_backward`` and :func:`forward_backward` uses it; the rest of the step is the same.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from moeforge import precision
from moeforge.config import Config
from moeforge.errors import UserError
from moeforge.parallel import ParallelMesh, update_balancing_bias
from moeforge.parallel.data import grad_sync
from moeforge.train import checkpoint as ckpt
from moeforge.train import distributed
from moeforge.train.metrics import (Metrics, format_train, gemm_peak_flops, max_violation, measure_peak_flops,
                                    memory_bytes, plot_run, train_flops_per_token, utilisation)
from moeforge.train.optim import AdamW, lr_at, micro_batches_at


class Stage(Protocol):
    tokens_per_batch: int

    def next_batch(self) -> Any: ...
    def loss(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingStopped(UserError):
    """Too many non-finite steps in a row; the message names them and the saved checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # "done" | "interrupted"
    checkpoint: Path | None
    summary: dict[str, Any] = field(default_factory=dict)


class _StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second is immediate.

    SIGTERM is what schedulers (SLURM, Kubernetes) send before killing a job, so it gets the
    same graceful checkpoint as Ctrl-C.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (the routers' bias) by name, as saved on disk."""
    return dict(model.state_dict())


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    want = model.state_dict()
    for k in want:
        if k not in tensors:
            raise UserError(f"checkpoint {where} lacks tensor {k} (a different model?)")
        if tensors[k].shape != want[k].shape:
            raise UserError(f"checkpoint {where}: tensor {k} has shape {tuple(tensors[k].shape)}, the model "
                            f"expects {tuple(want[k].shape)}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise UserError(f"checkpoint {where} has tensor {extra[0]} that the model does not (a different model?)")
    model.load_state_dict(tensors, strict=True)


def update_router_bias(model: nn.Module, counts: torch.Tensor | None, gamma: float,
                       mesh: ParallelMesh | None = None) -> torch.Tensor | None:
    """Aux-loss-free balancing: one sign step per MoE layer from the step's global counts,
    which are returned (all ranks take part, also when ``gamma`` is 0)."""
    return None if counts is None else update_balancing_bias(model, counts, gamma, mesh)


def save_checkpoint(run_dir: Path, cfg: Config, model: nn.Module, opt: AdamW, stage: Stage, step: int,
                    tokens: int, mesh: ParallelMesh | None = None, **extra: Any) -> Path:
    state = {"tokens": tokens, "optimizer_step": opt.step_count, "lr": lr_at(max(step - 1, 0), cfg.train),
             "stage": stage.state_dict(), "rng": ckpt.rng_state(), "config": cfg.to_dict(), **extra}
    root, keep = run_dir / "checkpoints", cfg.train.keep_last
    if mesh is not None:
        return distributed.save(root, step, model, opt, state, keep, mesh)
    return ckpt.save(root, step, model_tensors(model), opt.state_tensors(), state, keep)


def restore(path: Path, cfg: Config, model: nn.Module, opt: AdamW, stage: Stage,
            mesh: ParallelMesh | None = None) -> tuple[int, int]:
    """Load a verified checkpoint (single-process or sharded) into model/optimizer/stage/RNG;
    return (step, tokens)."""
    state = ckpt.verify(path)
    ckpt.check_config(path, state.get("config", {}), cfg.to_dict())
    if distributed.is_sharded(path):
        distributed.load(path, model, opt, mesh)
        opt.step_count = int(state["optimizer_step"])
    elif mesh is not None:
        raise UserError(f"checkpoint {path} was written by a single process; resume it without torchrun")
    else:
        load_model_tensors(model, ckpt.load_tensors(path, "model.safetensors"), path)
        try:
            opt.load_state_tensors(ckpt.load_tensors(path, "optimizer.safetensors"), state["optimizer_step"])
        except (KeyError, ValueError) as e:
            raise UserError(f"checkpoint {path / 'optimizer.safetensors'}: {e.args[0]}") from None
    try:  # a state.json edited by hand (checksums recomputed) must still fail in one line
        stage.load_state_dict(state["stage"])
        ckpt.set_rng_state(state["rng"])
        return int(state["step"]), int(state["tokens"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"checkpoint {path / 'state.json'} has a missing or malformed entry "
                        f"({type(e).__name__}: {e})") from None


def forward_backward(stage: Stage, model: nn.Module, batch: Any, step: int, n_micro: int) -> dict[str, torch.Tensor]:
    """One micro-batch: its loss parts, with ``loss / n_micro`` backpropagated (by the stage
    itself when it has ``forward_backward``, e.g. through a pipeline schedule)."""
    own = getattr(stage, "forward_backward", None)
    if own is not None:
        return own(model, batch, step, n_micro)
    parts = stage.loss(model, batch, step)
    (parts["loss"] / n_micro).backward()
    return parts


@torch.no_grad()
def evaluate(model: nn.Module, stage: Stage) -> dict[str, float]:
    model.eval()
    try:
        return stage.evaluate(model)
    finally:
        model.train()


class _Silent:
    """Metrics of ranks other than 0: they compute the same numbers and record nothing."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def train(model: nn.Module, stage: Stage, cfg: Config, run_dir: Path, resume: Path | None = None,
          mesh: ParallelMesh | None = None) -> TrainResult:
    """Run ``cfg.train.steps`` optimizer steps of ``stage`` on ``model`` (already parallelized
    for ``mesh`` under torchrun); see the module docstring."""
    tc = cfg.train
    device = next(model.parameters()).device
    opt = AdamW.from_config(model, tc)
    step, tokens = restore(resume, cfg, model, opt, stage, mesh) if resume else (0, 0)
    dp = mesh.dp if mesh is not None else 1  # the stage's batches are per rank; tokens are counted globally
    start_step = step
    model.train()
    params = [p for _, p in opt.params]
    dtypes = precision.record(cfg, device)  # what the step computes in, and why (printed once)
    gemm_dtypes = [precision.DTYPES[v] for k, v in dtypes.items() if k in ("train.dtype", "fp8.cpu_gemm_dtype")]
    flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
    peak, peak_dtype = gemm_peak_flops(gemm_dtypes, device)
    metrics = Metrics(run_dir, tc.steps, start_step, tc.progress) if distributed.is_main() else _Silent()
    metrics.write({"kind": "info", "step": step, "resumed_from": str(resume) if resume else None,
                   "flops_per_token": flops_per_token, "peak_flops": peak, "device": str(device), **dtypes})
    bad: list[int] = []  # consecutive non-finite steps
    last_ckpt: Path | None = None
    interval = {"tokens": 0, "time": 0.0, "counts": None}
    run = {"tokens": 0, "time": 0.0}  # step time only: eval and checkpoints excluded
    history: list[float] = []
    status = "done"
    t_run = time.perf_counter()
    try:
        with _StopFlag() as stop:
            while step < tc.steps:
                t0 = time.perf_counter()
                n_micro = micro_batches_at(tokens, tc)
                opt.lr = lr_at(step, tc)
                acc: dict[str, torch.Tensor] = {}
                counts = None
                for i in range(n_micro):
                    with grad_sync(model, i == n_micro - 1):  # one gradient reduction per step
                        parts = forward_backward(stage, model, stage.next_batch(), step, n_micro)
                    c = parts.get("expert_counts")
                    if c is not None:
                        counts = c.detach().clone() if counts is None else counts + c.detach()
                    for k, v in parts.items():
                        if k != "expert_counts":
                            acc[k] = v.detach().float() + acc[k] if k in acc else v.detach().float()
                keys = sorted(acc)
                # the step's one host sync; under a mesh also its one all-reduce (parts and norm)
                values, grad_norm = distributed.step_values([acc[k] / n_micro for k in keys], opt, mesh)
                rec = dict(zip(keys, values), grad_norm=values[-1])
                step += 1
                tokens += n_micro * stage.tokens_per_batch * dp
                if all(math.isfinite(v) for v in values):
                    if tc.grad_clip > 0:
                        distributed.clip_(params, tc.grad_clip, grad_norm, mesh)
                    opt.step()
                    gamma = cfg.model.bias_update_speed if step - 1 < tc.bias_freeze_at * tc.steps else 0.0
                    counts = update_router_bias(model, counts, gamma, mesh)
                    if counts is not None:
                        interval["counts"] = counts if interval["counts"] is None else interval["counts"] + counts
                    bad.clear()
                else:
                    bad.append(step)
                    metrics.write({"kind": "skip", "step": step, **rec})
                    metrics.print(f"step {step}: non-finite loss or gradient ({', '.join(f'{k}={v}' for k, v in rec.items())}); "
                                  f"step skipped ({len(bad)}/{tc.max_bad_steps} in a row)")
                opt.zero_grad()
                dt = time.perf_counter() - t0
                for acc_ in (interval, run):
                    acc_["tokens"] += n_micro * stage.tokens_per_batch * dp
                    acc_["time"] += dt
                if len(bad) >= tc.max_bad_steps:
                    last_ckpt = save_checkpoint(run_dir, cfg, model, opt, stage, step, tokens, mesh,
                                                stopped=f"non-finite steps {bad[0]}-{bad[-1]}")
                    raise TrainingStopped(
                        f"training stopped: {len(bad)} consecutive non-finite steps ({bad[0]}-{bad[-1]}); "
                        f"the last good weights are saved in {last_ckpt} (try a lower train.lr)")
                if not bad:
                    history.append(rec["loss"])
                    metrics.advance(step, rec["loss"])
                if not bad and (step % tc.log_every == 0 or step == tc.steps or step == start_step + 1):
                    tps = interval["tokens"] / max(interval["time"], 1e-9)
                    # the GEMM rate again (~3 ms), keeping the best seen: measured once at start-up
                    # on a busy shared host it once read 418 GFLOP/s where ~1100 was usual, and
                    # that run's logged MFU came out nearly 2x too high
                    peak = max(peak, measure_peak_flops(peak_dtype, device, reps=2))
                    mfu, peak = utilisation(tps * flops_per_token, peak)
                    rec.update(kind="train", step=step, tokens=tokens, lr=opt.lr, micro_batches=n_micro, tokens_per_s=tps,
                               flops_per_s=tps * flops_per_token, mfu=mfu, peak_flops=peak,
                               memory_mb=memory_bytes(device) / 2**20, elapsed_s=time.perf_counter() - t_run)
                    if counts is not None:
                        vio = max_violation(counts)
                        load = interval["counts"].float() / interval["counts"].sum(-1, keepdim=True).clamp_min(1)
                        rec.update(maxvio=vio.tolist(), maxvio_mean=vio.mean().item(), expert_load=load.tolist())
                    metrics.write(rec)
                    metrics.print(format_train(rec, tc.steps))
                    interval = {"tokens": 0, "time": 0.0, "counts": None}
                if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                    ev = evaluate(model, stage)
                    metrics.write({"kind": "eval", "step": step, **ev})
                    metrics.print(f"eval @ step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                stopping = distributed.any_rank(stop.set, mesh)
                if stopping or step == tc.steps or (tc.ckpt_every and step % tc.ckpt_every == 0):
                    last_ckpt = save_checkpoint(run_dir, cfg, model, opt, stage, step, tokens, mesh)
                if stopping:
                    status = "interrupted"
                    metrics.print(f"interrupted: checkpoint of step {step} written to {last_ckpt}")
                    break
    finally:
        metrics.close()
        try:
            if distributed.is_main():
                plot_run(run_dir)
        except Exception as e:  # a plotting problem must not hide the training outcome
            print(f"warning: plots not written ({type(e).__name__}: {e})")
    summary = {"steps": step - start_step, "first_loss": history[0] if history else None,
               "last_loss": history[-1] if history else None, "tokens": tokens,
               "tokens_per_s": run["tokens"] / max(run["time"], 1e-9),
               "mfu": utilisation(run["tokens"] / max(run["time"], 1e-9) * flops_per_token, peak)[0],
               "mfu_peak_dtype": next(k for k, v in precision.DTYPES.items() if v == peak_dtype), **dtypes,
               "elapsed_s": time.perf_counter() - t_run}
    return TrainResult(run_dir=run_dir, step=step, status=status, checkpoint=last_ckpt, summary=summary)
