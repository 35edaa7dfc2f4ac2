"""Tensor parallelism with DTensor plans: attention heads, dense MLP and shared experts.

Choices:
- Megatron's pairing: the first projection of a sub-layer is split by output columns
  (each rank computes some heads / some hidden units), the last by input rows, so one
  all-reduce per sub-layer in forward and one in backward.
  * MLA: ``wq`` (or ``wq_b``) and ``wkv_b`` colwise (their rows are head-major, so a
    contiguous chunk is whole heads), ``wo`` rowwise. The low-rank down-projections
    ``wq_a`` / ``wkv_a`` and their norms stay replicated: they are small, and the
    latent they produce is what every head needs.
  * MHA/GQA: ``wq``, ``wk``, ``wv`` colwise, ``wo`` rowwise.
  * Dense MLP and shared experts: ``w1``, ``w3`` colwise, ``w2`` rowwise. Routed experts
    are not split here; they scale with expert parallelism (expert.py).
  * Head colwise over the vocabulary, gathered back to full logits unless
    vocabulary-parallel loss is on (then logits stay a vocab-sharded DTensor: wrap the
    loss in :func:`loss_context`; ``lm_loss`` must then turn the replicated DTensor
    cross-entropy into a local tensor, e.g. ``.full_tensor()``, before adding the plain
    balance loss, or backward mixes the two). The embedding stays replicated: a rowwise (vocab-split)
    embedding together with the colwise head failed in backward on torch 2.13 once MTP
    reuses both ("mixed torch.Tensor and DTensor"), and it is a lookup, not a GEMM.
- Heads per rank: modules keep the *global* head count in ``n_heads``; TP rewrites it to
  the local count so their ``view(b, s, n_heads, ...)`` reshapes local shards. This is
  training/prefill only: the absorbed MLA decode path reads ``wkv_b.weight`` whole.
- MLA's decoupled RoPE key comes from the replicated ``wkv_a`` and is shared by all
  heads, so each rank's backward only sees its own heads' share of its gradient; a hook
  on ``wkv_a`` all-reduces that share (identity forward, sum backward). The latent part
  needs no such fix: ``wkv_b``'s colwise input already reduces its gradient.
- Every other tensor between sub-layers is a plain replicated tensor
  (``use_local_output=True``), so residual adds, RMSNorm and the MoE router need no
  DTensor awareness. Sequence parallelism (norms on sequence shards) is not implemented
  yet: it would turn the residual stream into DTensors through MLA and the MoE router.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from moeforge.model.attention import MLA, MHA
from moeforge.model.layers import MLP
from moeforge.model.moe import MoE
from moeforge.model.transformer import Block


class _SumGrad(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient over the tp group in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _rope_key_hook(attn: MLA, group: dist.ProcessGroup):
    def hook(_mod, _inp, out):
        kv, pe = out.split([attn.kv_lora_rank, attn.rope], dim=-1)
        return torch.cat([kv, _SumGrad.apply(pe, group)], dim=-1)

    return hook


def _mlp_plan(prefix: str) -> dict:
    return {f"{prefix}w1": ColwiseParallel(), f"{prefix}w3": ColwiseParallel(), f"{prefix}w2": RowwiseParallel()}


def block_plan(blk: Block, tp: int, group: dist.ProcessGroup) -> dict:
    """The plan for one block; also rescales its attention's head counts to local ones."""
    attn, plan = blk.attn, {}
    if isinstance(attn, MLA):
        plan["attn.wq" if attn.q_lora_rank == 0 else "attn.wq_b"] = ColwiseParallel()
        plan["attn.wkv_b"] = ColwiseParallel()
        attn.wkv_a.register_forward_hook(_rope_key_hook(attn, group))
    elif isinstance(attn, MHA):
        plan.update({f"attn.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")})
        attn.n_kv //= tp
    else:  # pragma: no cover - a new attention type must get its own plan
        raise TypeError(f"no tensor-parallel plan for {type(attn).__name__}")
    attn.n_heads //= tp
    plan["attn.wo"] = RowwiseParallel()
    if isinstance(blk.ffn, MLP):
        plan.update(_mlp_plan("ffn."))
    elif isinstance(blk.ffn, MoE) and blk.ffn.shared_experts is not None:
        plan.update(_mlp_plan("ffn.shared_experts."))
    return plan


def apply_tensor_parallel(module: nn.Module, mesh, vocab_parallel_loss: bool = False) -> nn.Module:
    """Parallelize every block under ``module`` (a model or a pipeline stage) over ``tp``."""
    tp_mesh = mesh.dense["tp"]
    tp, group = tp_mesh.size(), tp_mesh.get_group()
    for blk in [m for m in module.modules() if isinstance(m, Block)]:
        parallelize_module(blk, tp_mesh, block_plan(blk, tp, group))
    if getattr(module, "head", None) is not None:
        parallelize_module(module.head, tp_mesh, ColwiseParallel(
            output_layouts=Shard(-1) if vocab_parallel_loss else Replicate(), use_local_output=not vocab_parallel_loss))
    return module


def loss_context(enabled: bool):
    """``loss_parallel()`` when logits are vocab-sharded DTensors, else a no-op context."""
    return loss_parallel() if enabled else contextlib.nullcontext()
