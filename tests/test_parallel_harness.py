"""Shared pieces of the multi-process parallelism tests (and a check of the launcher itself).

Each test spawns its ranks once (``torch.multiprocessing.spawn`` on gloo, one thread per
rank, a free localhost port) and groups several layouts into that one spawn, because
starting Python + torch per process costs seconds on 2 cores. Every rank also runs the
single-process reference itself on the full batch: the model is tiny, and comparing
locally keeps the ranks free of result plumbing.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeforge.config import load_config
from moeforge.model.transformer import Transformer
from moeforge.parallel import all_reduce_mean, apply, build_mesh, update_balancing_bias
from moeforge.train.losses import lm_loss

TINY = {
    "model.vocab_size": 128, "model.dim": 64, "model.n_layers": 4, "model.n_dense_layers": 1,
    "model.n_heads": 4, "model.inter_dim": 96, "model.moe_inter_dim": 32, "model.q_lora_rank": 32,
    "model.kv_lora_rank": 32, "model.qk_nope_head_dim": 16, "model.qk_rope_head_dim": 8,
    "model.v_head_dim": 16, "model.n_routed_experts": 8, "model.n_activated_experts": 2,
    "model.n_expert_groups": 2, "model.n_limited_groups": 1, "model.seq_aux_alpha": 0.01,
    "model.bias_update_speed": 0.01, "model.mtp_depth": 1, "model.max_seq_len": 32, "model.init_std": 0.05,
    "train.micro_batch_size": 4, "train.seq_len": 16,
}
BATCH, SEQ, LR = 8, 16, 1e-2


def tiny_config(overrides: dict | None = None, **parallel):
    """TINY plus dotted ``overrides`` (e.g. ``{"fp8.enabled": True}``) and ``[parallel]`` sizes."""
    return load_config(None, {**TINY, **(overrides or {}), **{f"parallel.{k}": v for k, v in parallel.items()}})


def tiny_model(cfg) -> Transformer:
    """The seeded tiny model, with FP8 GEMMs when ``cfg.fp8.enabled`` (as the trainer builds it)."""
    from moeforge.fp8 import convert

    torch.manual_seed(0)
    return convert(Transformer(cfg.model), cfg.fp8)


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        seq = torch.randint(0, 128, (BATCH, SEQ + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def local_rows(t: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's share of a global batch along the data-parallel dim."""
    if mesh is None:
        return t
    n, r = mesh.dp, mesh.rank("dp")
    per = t.shape[0] // n
    return t[r * per : (r + 1) * per]


def adamw(model) -> torch.optim.Optimizer:
    # eps = 1e-4, not 1e-8: Adam divides by sqrt(v) + eps, so a coordinate whose gradient
    # is ~1e-7 (a cancellation) turns fp32 rounding of a reordered sum (~1e-9 here) into a
    # visible fraction of an lr-sized step; eps bounds that gain at lr/eps = 100, so
    # parameters can be compared at 1e-6 while a layout bug (O(lr) per step) still shows.
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=1e-4)


def train(model, cfg, mesh, data, accum: int = 1, keep_grads: bool = False, opt=None):
    """AdamW steps on ``data``; returns (losses, biases after each step, last grads or None, optimizer)."""
    from moeforge.parallel.data import grad_sync
    from moeforge.parallel.tensor import loss_context

    opt = opt or adamw(model)
    losses, biases, grads = [], [], None
    for tokens, labels in data:
        tokens, labels = local_rows(tokens, mesh), local_rows(labels, mesh)
        if cfg.parallel.pp > 1:
            res = model.step(tokens, labels)
            loss, counts = res["loss"], res["counts"]
        else:
            loss, counts = 0.0, 0.0
            for i, (tk, lb) in enumerate(zip(tokens.chunk(accum), labels.chunk(accum))):
                with grad_sync(model, i == accum - 1), loss_context(cfg.parallel.loss_parallel):
                    out = model(tk)
                    part = lm_loss(out, lb, cfg.model)["loss"] / accum
                    part.backward()
                loss, counts = loss + part.detach(), counts + out.expert_counts
        update_balancing_bias(model, counts, cfg.model.bias_update_speed, mesh)
        if keep_grads:
            grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(all_reduce_mean(torch.as_tensor(loss), mesh))
        biases.append([m.gate.bias.clone() for m in model.moe_layers() if m is not None])
    return losses, biases, grads, opt


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def reference(cfg, data, overrides: dict | None = None, **kw):
    """The single-process run every layout must reproduce (TINY + ``overrides``)."""
    ref_cfg = tiny_config(overrides)
    model = tiny_model(ref_cfg)
    return (model, *train(model, ref_cfg, None, data, **kw))


def run_layout(data, keep_grads: bool = False, accum: int = 1, overrides: dict | None = None, **parallel):
    """Build the mesh for ``parallel``, apply it to a fresh tiny model (TINY + ``overrides``)
    and train on ``data``."""
    cfg = tiny_config(overrides, **parallel)
    mesh = build_mesh(cfg)
    model = apply(tiny_model(cfg), mesh, cfg)
    return (cfg, mesh, model, *train(model, cfg, mesh, data, accum=accum, keep_grads=keep_grads))


def ep_slice(want: torch.Tensor, got: torch.Tensor, mesh) -> torch.Tensor:
    """The rows of the reference tensor ``want`` that this rank holds as ``got``: its ep
    slice of an expert stack under expert parallelism, else all of it."""
    if got.shape == want.shape:
        return want
    per, r = got.shape[0], mesh.rank("ep")
    return want[r * per : (r + 1) * per]


def assert_params_match(model, ref_model, mesh=None, rtol=1e-4, atol=1e-5, ref_grads=None, grads=None):
    """Every parameter this rank holds equals the reference's (its ep slice for experts).

    Parameters after AdamW steps get atol 1e-5: gradients are compared at atol 1e-7 and
    Adam can turn a gradient difference into a parameter difference up to lr / eps = 100
    times larger (see the optimizer below); 1e-6 failed on one element of 2560 after a
    change of summation order only."""
    ref = dict(ref_model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names, "no parameters on this rank"
    for n, p in model.named_parameters():
        want = ref[n].detach() if ref_grads is None else ref_grads[n]
        got = full(p) if grads is None else grads[n]
        want = ep_slice(want, got, mesh)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def _entry(rank: int, world: int, port: int, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MOEFORGE_DIST_TIMEOUT="120")
    torch.set_num_threads(1)
    from moeforge.parallel.mesh import init_distributed

    init_distributed()
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; any rank's exception fails the test."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _ranks_agree(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world))


@pytest.mark.slow
def test_spawn_harness_runs_collectives():
    spawn(_ranks_agree, 2)
