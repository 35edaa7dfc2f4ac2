"""Expert parallelism: routed experts partitioned over the ep group, tokens moved by all-to-all.

Choices:
- The model stays unaware: :func:`apply_expert_parallel` keeps only this rank's slice of
  each ``GroupedExperts`` (experts ``[r*E/ep, (r+1)*E/ep)`` on ep rank r, contiguous so
  the all-to-all send buffer is just the locally sorted tokens) and swaps
  ``MoE.dispatcher`` for :class:`AllToAllDispatcher`. Router, gate bias and shared
  experts stay replicated: every rank routes its own tokens with the full gate.
- Dispatch = local sort by expert (reusing :class:`LocalDispatcher`), an exchange of the
  per-expert counts (a tiny all-to-all, so every rank knows how many rows it receives),
  then one *uneven* ``all_to_all_single`` of the token rows (and one of their routing
  weights, which the experts apply). Received rows arrive grouped
  by source rank; a stable permutation regroups them by local expert so the grouped
  GEMM sees each expert's tokens contiguous. Combine runs the same steps backwards.
- Autograd goes through ``_functional_collectives.all_to_all_single_autograd`` (its
  backward is the reverse all-to-all), not a hand-written Function.
- Counts: the dispatcher returns tokens *received* per local expert, which is what the
  grouped GEMM needs and what the model records as ``expert_counts``; the global count
  per expert (for the balancing bias) is assembled by ``mesh.all_reduce_expert_counts``,
  so the bias update is identical on every rank.
- Gradients: a local expert receives gradient from the tokens of all ep ranks, i.e. the
  *sum* of their losses' gradients, while every other weight gets the dp *mean*. The
  data-parallel wrapper therefore divides expert gradients by the whole dp size
  (see data.py), not by the edp replicas it reduces over.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moeforge.model.moe import LocalDispatcher, MoE


class AllToAllDispatcher:
    """Drop-in for :class:`LocalDispatcher` when the experts live on ``ep`` ranks."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int):
        self.group = group
        self.ep = ep_size
        self.local = LocalDispatcher()

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n_experts: int):
        xs, ws, counts, local_ctx = self.local.dispatch(x, idx, weights, n_experts)  # rows sorted by global expert
        e_local = n_experts // self.ep
        send = counts.view(self.ep, e_local).contiguous()  # [dest rank, its local expert]
        recv = torch.empty_like(send)  # [source rank, my local expert]
        dist.all_to_all_single(recv, send, group=self.group)
        in_splits = send.sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        xr = all_to_all_single_autograd(xs.contiguous(), out_splits, in_splits, self.group)
        # the routing weights travel with their rows: the experts apply them (expert_ffn.py)
        wr = all_to_all_single_autograd(ws.contiguous(), out_splits, in_splits, self.group)
        # rows arrive source-major; regroup them expert-major for the grouped GEMM
        expert_of_row = torch.arange(e_local, device=x.device).repeat(self.ep).repeat_interleave(recv.flatten())
        perm = expert_of_row.argsort(stable=True)
        return xr.index_select(0, perm), wr.index_select(0, perm), recv.sum(0), (local_ctx, perm, in_splits, out_splits)

    def combine(self, y: torch.Tensor, ctx, n_tokens: int) -> torch.Tensor:
        local_ctx, perm, in_splits, out_splits = ctx
        back = y.index_select(0, perm.argsort())  # expert-major -> source-major (a gather: differentiable)
        ys = all_to_all_single_autograd(back.contiguous(), in_splits, out_splits, self.group)
        return self.local.combine(ys, local_ctx, n_tokens)


def local_expert_range(n_experts: int, ep_size: int, ep_rank: int) -> range:
    per = n_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


@torch.no_grad()
def shard_experts(moe: MoE, ep_size: int, ep_rank: int) -> None:
    """Keep only this rank's experts' weights (fresh Parameters, so nothing else is held)."""
    r = local_expert_range(moe.n_experts, ep_size, ep_rank)
    ex = moe.experts
    for name in ("w1", "w2", "w3"):
        full = getattr(ex, name)
        setattr(ex, name, nn.Parameter(full[r.start : r.stop].clone(), requires_grad=full.requires_grad))


def apply_expert_parallel(module: nn.Module, mesh) -> list[MoE]:
    """Shard every MoE under ``module`` over ``mesh``'s ep group; returns the MoEs touched."""
    ep, rank, group = mesh.size("ep"), mesh.rank("ep"), mesh.group("ep")
    moes = [m for m in module.modules() if isinstance(m, MoE)]
    for moe in moes:
        shard_experts(moe, ep, rank)
        moe.dispatcher = AllToAllDispatcher(group, ep)
    return moes
