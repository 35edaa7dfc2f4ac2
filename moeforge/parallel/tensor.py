"""Tensor parallelism with DTensor plans: attention heads, dense MLP, shared experts, head;
optional sequence parallelism and vocabulary-parallel loss.

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
    vocabulary-parallel loss is on. The embedding stays replicated: a rowwise
    (vocab-split) embedding together with the colwise head failed in backward on torch
    2.13 once MTP reuses both ("mixed torch.Tensor and DTensor"), and it is a lookup, not a GEMM.
- Vocabulary-parallel loss (``parallel.loss_parallel``): logits stay a vocab-sharded
  DTensor and ``F.cross_entropy`` on them runs torch's ``loss_parallel`` kernels (each
  rank reduces max / sum-exp over its vocabulary slice, never a full [tokens, V] tensor).
  Those kernels are DTensor op handlers that ``loss_parallel()`` installs only inside
  its ``with`` block, and the backward must run inside it too. A trainer loop would have
  to wrap both forward-loss and ``backward()`` in :func:`loss_context`; instead,
  :func:`apply_tensor_parallel` installs the handlers for the whole process when the
  option is on, so any loop works unchanged. They only act on DTensor log-softmax /
  NLL ops, and with the option on the only such DTensors are these logits.
  ``lm_loss`` turns the replicated DTensor loss into a plain tensor before adding the
  plain balance loss. :func:`loss_context` remains for callers that want the scope.
- The split GEMMs run on local shards: each colwise/rowwise module's own ``forward``
  is called with its weight's local shard and the local activations, and only the
  inputs/outputs are DTensors (the styles' hooks do the collectives). So a Linear
  subclass whose autograd Function knows nothing of DTensor (``Fp8Linear``: blockwise
  FP8 quantization of *this rank's* shard) works unchanged, and the GEMM pays no DTensor
  dispatch. The input's gradient is declared ``Partial`` for colwise (each rank holds
  its heads' share; the style's input hook all-reduces it), the output is ``Shard(-1)``
  for colwise and ``Partial`` for rowwise (reduced by the style's output hook).
- Heads per rank: modules keep the *global* head count in ``n_heads``; TP rewrites it to
  the local count so their ``view(b, s, n_heads, ...)`` reshapes local shards. This is
  training/prefill only: the absorbed MLA decode path reads ``wkv_b.weight`` whole.
- MLA's decoupled RoPE key comes from the replicated ``wkv_a`` and is shared by all
  heads, so each rank's backward only sees its own heads' share of its gradient; a hook
  on ``wkv_a`` all-reduces that share (identity forward, sum backward). The latent part
  needs no such fix: ``wkv_b``'s colwise input already reduces its gradient.
- Without sequence parallelism every tensor between sub-layers is a plain replicated
  tensor, so residual adds, RMSNorm and the MoE router need no DTensor awareness.
- Sequence parallelism (``parallel.sequence_parallel``): between sub-layers the residual
  stream of the main layers is a plain tensor holding this rank's S/tp positions, and the
  two norms of each block run on it (``SequenceParallel`` style: replicated weight,
  gradient reduced by DTensor). Each sub-layer all-gathers its normalised input once
  (a pre-hook on ``attn`` / ``ffn``) and leaves through a reduce-scatter (``wo`` and the
  MLP's ``w2`` rowwise with ``Shard(1)`` output) instead of an all-reduce: the same
  bytes moved, activations between sub-layers divided by tp.
  * Attention (MLA and MHA) sees all positions as without SP, so the RoPE-key hook,
    the replicated ``wq_a`` / ``wkv_a`` and causal attention are unchanged. Gathering
    the latents instead of the dim-wide input would move fewer bytes; not done.
  * MoE: routed experts see the full gathered tokens (chosen over "each rank routes its
    own shard"): routing, the expert counts and the sequence-wise balance loss are then
    exactly those of plain TP, whose balance loss needs whole sequences (f_i * P_i is a
    product of two per-sequence sums, not a sum over shards). The routed work is
    repeated on the tp ranks as without SP; split it with expert parallelism. Shared
    experts keep their colwise/rowwise plan; the MoE output (replicated) is then
    cut to this rank's positions (free forward, all-gather backward).
  * The stream is cut to sequence shards entering the first main layer and gathered
    leaving the last (per pipeline stage), so the final norm, head and MTP see full
    sequences. MTP blocks use plain TP: they see S-k positions, which tp rarely divides.
  * The sequence length of the main layers must be divisible by tp (checked by the
    config for ``train.seq_len``, and here at run time).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel, loss_parallel,
                                               parallelize_module)
from torch.distributed.tensor.parallel.loss import _enable_custom_loss_ops

from moeforge.model.attention import MLA, MHA
from moeforge.model.layers import MLP
from moeforge.model.moe import MoE
from moeforge.model.transformer import Block

SEQ = Shard(1)  # sequence-parallel layout of [B, S, D] activations


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


def _relayout(t: torch.Tensor, mesh, src, dst) -> torch.Tensor:
    """Plain local tensor laid out as ``src`` over ``mesh`` -> plain local tensor as ``dst``
    (differentiable: the backward is the reverse collective)."""
    if not isinstance(t, DTensor):
        if dst == SEQ and t.shape[SEQ.dim] % mesh.size():
            raise ValueError(f"sequence parallelism: {t.shape[SEQ.dim]} positions are not divisible by "
                             f"tp={mesh.size()}")
        t = DTensor.from_local(t, mesh, (src,), run_check=False)
    return t.redistribute(mesh, (dst,)).to_local()


def _relayout_input(module: nn.Module, mesh, src, dst) -> None:
    """Relayout a module's first positional input (the activations) before its forward."""
    module.register_forward_pre_hook(lambda _m, args: (_relayout(args[0], mesh, src, dst), *args[1:]))


def _relayout_output(module: nn.Module, mesh, src, dst) -> None:
    module.register_forward_hook(lambda _m, _args, out: _relayout(out, mesh, src, dst))


@contextlib.contextmanager
def _local_weight(lin: nn.Module):
    """``lin.weight`` is its local shard (a differentiable view of the DTensor parameter) inside."""
    w = lin._parameters["weight"]
    lin._parameters["weight"] = w.to_local()
    try:
        yield
    finally:
        lin._parameters["weight"] = w


def _compute_locally(lin: nn.Module, colwise: bool) -> None:
    """Run ``lin``'s class ``forward`` on local shards (see the module docstring for the
    placements of the input's gradient and of the output)."""
    if getattr(lin, "bias", None) is not None:  # rowwise would add a local bias tp times
        raise TypeError(f"tensor parallelism expects bias-free linears, {type(lin).__name__} has a bias")
    forward = type(lin).forward

    def local_forward(x: DTensor) -> DTensor:
        x_grad = Partial() if colwise else Shard(x.ndim - 1)
        with _local_weight(lin):
            y = forward(lin, x.to_local(grad_placements=(x_grad,)))
        return DTensor.from_local(y, x.device_mesh, (Shard(y.ndim - 1) if colwise else Partial(),), run_check=False)

    lin.forward = local_forward


def _parallelize(root: nn.Module, mesh, plan: dict) -> None:
    """``parallelize_module`` plus local GEMMs for the colwise/rowwise modules of ``plan``."""
    parallelize_module(root, mesh, plan)
    for name, style in plan.items():
        if isinstance(style, (ColwiseParallel, RowwiseParallel)):
            _compute_locally(root.get_submodule(name), colwise=isinstance(style, ColwiseParallel))


def _mlp_plan(prefix: str, out=Replicate()) -> dict:
    return {f"{prefix}w1": ColwiseParallel(), f"{prefix}w3": ColwiseParallel(),
            f"{prefix}w2": RowwiseParallel(output_layouts=out)}


def block_plan(blk: Block, tp: int, group: dist.ProcessGroup, sequence_parallel: bool = False) -> dict:
    """The plan for one block; also rescales its attention's head counts to local ones.

    With ``sequence_parallel`` the plan covers the norms and the sub-layers' exits; the
    all-gathers at their entries are hooks added by :func:`apply_tensor_parallel`.
    """
    attn, plan = blk.attn, {}
    out = SEQ if sequence_parallel else Replicate()
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
    plan["attn.wo"] = RowwiseParallel(output_layouts=out)
    if isinstance(blk.ffn, MLP):
        plan.update(_mlp_plan("ffn.", out))
    elif isinstance(blk.ffn, MoE) and blk.ffn.shared_experts is not None:
        plan.update(_mlp_plan("ffn.shared_experts."))  # inside the MoE: replicated, like the routed output
    if sequence_parallel:
        plan["attn_norm"] = plan["ffn_norm"] = SequenceParallel(use_local_output=True)
    return plan


def _sequence_parallel_block(blk: Block, mesh) -> None:
    """Entry gathers of a sequence-parallel block (see the module docstring)."""
    _relayout_input(blk.attn, mesh, SEQ, Replicate())
    _relayout_input(blk.ffn, mesh, SEQ, Replicate())
    if isinstance(blk.ffn, MoE):
        _relayout_output(blk.ffn, mesh, Replicate(), SEQ)


def _main_blocks(module: nn.Module) -> list[Block]:
    """The main-model blocks of ``module`` (a model, or a pipeline stage's ModuleDict), in order."""
    layers = getattr(module, "layers", None) or []
    return list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)


def apply_tensor_parallel(module: nn.Module, mesh, vocab_parallel_loss: bool = False,
                          sequence_parallel: bool = False) -> nn.Module:
    """Parallelize every block under ``module`` (a model or a pipeline stage) over ``tp``."""
    tp_mesh = mesh.dense["tp"]
    tp, group = tp_mesh.size(), tp_mesh.get_group()
    main = _main_blocks(module) if sequence_parallel else []
    sp_blocks = {id(b) for b in main}
    for blk in [m for m in module.modules() if isinstance(m, Block)]:
        sp = id(blk) in sp_blocks
        _parallelize(blk, tp_mesh, block_plan(blk, tp, group, sp))
        if sp:
            _sequence_parallel_block(blk, tp_mesh)
    if main:
        _relayout_input(main[0], tp_mesh, Replicate(), SEQ)  # a free cut; all-gather in backward
        _relayout_output(main[-1], tp_mesh, SEQ, Replicate())
    if getattr(module, "head", None) is not None:
        _parallelize(module, tp_mesh, {"head": ColwiseParallel(
            output_layouts=Shard(-1) if vocab_parallel_loss else Replicate(), use_local_output=not vocab_parallel_loss)})
        if vocab_parallel_loss:
            _enable_custom_loss_ops()  # process-wide; see the module docstring
    return module


def loss_context(enabled: bool):
    """``loss_parallel()`` when logits are vocab-sharded DTensors and its handlers are not
    installed process-wide already (its exit would remove them), else a no-op context."""
    installed = torch.ops.aten._log_softmax.default in DTensor._op_dispatcher._custom_op_handlers
    return loss_parallel() if enabled and not installed else contextlib.nullcontext()
