"""Data parallelism with FSDP2 (``fully_shard``): ZeRO-3 sharding, HSDP and plain replication.

Choices:
- One mechanism for all three: ``fully_shard`` on the dp mesh. ``dp_shard`` > 1 shards
  parameters, gradients and optimizer state (ZeRO-3); ``dp_replicate`` > 1 adds a
  replicate dim (HSDP: all-reduce between replicas, reduce-scatter inside one); with
  ``dp_shard == 1`` that is exactly DDP's all-reduce, without a second wrapper class
  whose ``.module`` indirection the trainer would have to know about.
- Wrapping granularity: each transformer block (and each MTP block) is its own FSDP
  unit, so only one block's full weights exist at a time; the root unit holds the
  embedding, final norm and head. ``reshard_after_forward`` comes from the config
  (False trades memory for not all-gathering again in backward); the root never
  reshards after forward because backward starts with it.
- Under expert parallelism each ``GroupedExperts`` becomes its own unit sharded over
  the ``edp`` replicas of its ep shard, and its gradient is divided by the *full* dp
  size: its local gradient is already the sum over the ep group's tokens (expert.py).
  A divisor other than the group size is a pre-multiplied sum on NCCL; gloo lacks that
  op, so there the reduction is a plain sum with FSDP scaling before and after.
- Optional bf16 parameter all-gather (``parallel.param_dtype = "bf16"``) with FP32
  gradient reduction: halves the all-gather volume. The router then sees bf16-rounded
  weights; the FP32 master copy and optimizer are unaffected.
- Gradient accumulation: :func:`grad_sync` turns gradient reduction off for all but the
  last micro-batch, so accumulating N micro-batches costs one reduce-scatter, not N.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from moeforge.model.moe import GroupedExperts
from moeforge.model.transformer import Block

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _policy(param_dtype: str) -> MixedPrecisionPolicy:
    if param_dtype == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=torch.float32)


def dp_mesh(mesh):
    """The mesh FSDP shards over: 1D ``dp_shard``, or 2D (replicate, shard) for HSDP/DDP."""
    if mesh.cfg.dp_replicate > 1:
        return mesh.dense["dp_replicate", "dp_shard"]
    return mesh.dense["dp_shard"]


def apply_fsdp(module: nn.Module, mesh, reshard_after_forward: bool = True, param_dtype: str = "fp32") -> nn.Module:
    """Wrap blocks, expert groups (under EP) and the root of ``module`` with FSDP2."""
    policy = _policy(param_dtype)
    if mesh.cfg.ep > 1:
        for ex in [m for m in module.modules() if isinstance(m, GroupedExperts)]:
            fully_shard(ex, mesh=mesh.expert["edp"], reshard_after_forward=reshard_after_forward, mp_policy=policy)
            ex.set_gradient_divide_factor(float(mesh.dp))
            edp = mesh.size("edp")  # (a single replica divides in place; forcing sums there divides twice)
            if 1 < edp < mesh.dp and dist.get_backend(mesh.group("edp")) != "nccl":
                ex.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    dmesh = dp_mesh(mesh)
    for blk in [m for m in module.modules() if isinstance(m, Block)]:
        fully_shard(blk, mesh=dmesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(module, mesh=dmesh, reshard_after_forward=False, mp_policy=policy)
    return module


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Within the block, gradients are (enabled) or are not (disabled) reduced across dp.

    Use ``enabled=False`` for every micro-batch but the last of an accumulation step;
    gradients then accumulate locally (unsharded for FSDP) and the last backward reduces
    the sum once. A model without FSDP units is unaffected.
    """
    units = fsdp_units(model)
    for u in units:
        u.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.set_requires_gradient_sync(True, recurse=False)
