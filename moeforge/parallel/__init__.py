"""Parallelism applied from outside to a plain model: ``apply(model, mesh, cfg)``.

Order matters and is fixed here:
1. pipeline: cut the model into this rank's stages (everything after works per stage);
2. tensor parallel: DTensor plans on attention, dense MLP, shared experts, head (and the
   norms under sequence parallelism);
3. expert parallel: keep this rank's experts, swap in the all-to-all dispatcher;
4. data parallel: FSDP2 units per block (and per expert group), then the root.
TP and EP must precede FSDP because FSDP shards whatever parameters it finds (DTensor
TP shards become 2D; EP's local experts are sharded over the edp replicas).

A trainer's step looks the same under every layout except pipelining:
- ``pp == 1``: ``out = model(tokens)``, ``lm_loss(out, ...)``, backward, and
  ``counts = out.expert_counts`` (summed over micro-batches);
- ``pp > 1``: ``res = model.step(tokens, labels)`` runs forward and backward of the whole
  batch through the schedule and returns the loss parts and ``res["counts"]``.
Then ``update_balancing_bias(model, counts, gamma, mesh)`` once per optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

from moeforge.config import Config
from moeforge.parallel.mesh import (ParallelMesh, all_reduce_expert_counts, all_reduce_mean, build_mesh,
                                    check_layout, init_distributed)

__all__ = ["apply", "build_mesh", "check_layout", "init_distributed", "all_reduce_expert_counts",
           "all_reduce_mean", "update_balancing_bias", "ParallelMesh"]


def apply(model: nn.Module, mesh: ParallelMesh | None, cfg: Config) -> nn.Module:
    """Parallelize ``model`` (a :class:`Transformer`) for ``mesh``; identity when mesh is None."""
    if mesh is None:
        return model
    from moeforge.parallel.data import apply_fsdp
    from moeforge.parallel.expert import apply_expert_parallel
    from moeforge.parallel.pipeline import build_pipeline
    from moeforge.parallel.tensor import apply_tensor_parallel

    p = cfg.parallel
    if p.pp > 1:
        pipe = build_pipeline(model, cfg, mesh)
        parts: list[nn.Module] = list(pipe.stages)
    else:
        pipe, parts = None, [model]
    for part in parts:
        if p.tp > 1:
            apply_tensor_parallel(part, mesh, vocab_parallel_loss=p.loss_parallel and pipe is None,
                                  sequence_parallel=p.sequence_parallel)
        if p.ep > 1:
            apply_expert_parallel(part, mesh)
        if mesh.dp > 1:
            apply_fsdp(part, mesh, p.reshard_after_forward, p.param_dtype)
    return pipe if pipe is not None else model


@torch.no_grad()
def update_balancing_bias(model: nn.Module, counts: torch.Tensor, gamma: float, mesh: ParallelMesh | None) -> torch.Tensor:
    """Global counts from this rank's ``counts`` [n_moe, E_local]; move every local gate's bias.

    Returns the global counts [n_moe, E] (for metrics). Every rank gets the same counts,
    so the bias stays identical everywhere without being communicated.
    """
    total = all_reduce_expert_counts(counts, mesh)
    if gamma > 0:
        for moe, c in zip(model.moe_layers(), total):
            if moe is not None:  # another pipeline rank holds it
                moe.gate.update_bias(c, gamma)
    return total
