"""Count the collectives a piece of code actually issues: calls and bytes per op type, per rank.

``with CommCounter() as c: step()`` then ``c.summary()`` (this rank) or
``gather_summaries(c)`` (every rank's, on every rank; call it *after* the block so
its own all-gather is not counted).

Choices:
- One interception point, a ``TorchDispatchMode`` that watches the ``c10d``,
  ``_c10d_functional`` and ``_c10d_functional_autograd`` operator namespaces. On torch
  2.13 every path goes through one of them (checked by hand with gloo):
  ``torch.distributed.all_reduce`` & co. (FSDP2's all-gather / reduce-scatter /
  HSDP all-reduce, our EP count exchange, the pipeline's loss reductions) call the
  ``c10d::*_`` ops; DTensor redistribution (TP) and ``all_to_all_single_autograd`` (EP
  tokens) call ``_c10d_functional::*``; pipelining's ``batch_isend_irecv`` becomes
  ``c10d::send`` / ``c10d::recv_``. The functional ops reach ``c10d::*`` again inside
  their kernels, but a mode is switched off while it handles an op, so nothing is
  counted twice. Wrapping the ``torch.distributed`` Python functions instead would miss
  the functional path entirely, and patching both would double count.
  Blind spot: a collective issued *inside* another Python ``__torch_dispatch__``
  handler (a tensor subclass) runs with the mode off and is not seen; the benchmark's
  measured/expected ratios are the check that nothing of ours goes that way.
- Bytes are each call's buffer size, the convention of nccl-tests' "size": all-reduce
  and broadcast the tensor; all-gather the gathered *output*; reduce-scatter the full
  *input*; all-to-all the send buffer; send and recv the tensor. With it a DDP step
  all-reduces exactly the gradient bytes and FSDP all-gathers / reduce-scatters exactly
  the (padded) parameter bytes. What a ring algorithm puts on the wire differs by a
  fixed factor per op (all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n).
- Calls over a one-rank group (FSDP2's shard dim under pure replication, say) move
  nothing; they are kept apart in ``local_calls`` and left out of the byte totals.
- The mode sees every tensor op of the block, so it slows the code it watches: time
  steps outside the counter and count in a separate step.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send", "recv", "other")
NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _arg(i: int) -> Callable:
    return lambda args: _nbytes(args[i])


def _gathered(args) -> int:  # functional all-gather: input bytes x group_size
    return _nbytes(args[0]) * args[1]


# op name (without namespace) -> (kind, bytes of the call by the convention above)
_C10D = {
    "allreduce_": ("all_reduce", _arg(0)), "allreduce_coalesced_": ("all_reduce", _arg(0)),
    "allgather_": ("all_gather", _arg(0)), "_allgather_base_": ("all_gather", _arg(0)),
    "allgather_coalesced_": ("all_gather", _arg(0)), "allgather_into_tensor_coalesced_": ("all_gather", _arg(0)),
    "reduce_scatter_": ("reduce_scatter", _arg(1)), "_reduce_scatter_base_": ("reduce_scatter", _arg(1)),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", _arg(1)),
    "alltoall_": ("all_to_all", _arg(1)), "alltoall_base_": ("all_to_all", _arg(1)),
    "broadcast_": ("broadcast", _arg(0)), "send": ("send", _arg(0)),
    "recv_": ("recv", _arg(0)), "recv_any_source_": ("recv", _arg(0)),
    "reduce_": ("other", _arg(0)), "gather_": ("other", _arg(0)), "scatter_": ("other", _arg(1)),
}
_FUNCTIONAL = {
    "all_reduce": ("all_reduce", _arg(0)), "all_reduce_": ("all_reduce", _arg(0)),
    "all_reduce_coalesced": ("all_reduce", _arg(0)), "all_reduce_coalesced_": ("all_reduce", _arg(0)),
    "all_gather_into_tensor": ("all_gather", _gathered), "all_gather_into_tensor_out": ("all_gather", _gathered),
    "all_gather_into_tensor_coalesced": ("all_gather", _gathered),
    "reduce_scatter_tensor": ("reduce_scatter", _arg(0)), "reduce_scatter_tensor_out": ("reduce_scatter", _arg(0)),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", _arg(0)),
    "all_to_all_single": ("all_to_all", _arg(0)),
    "broadcast": ("broadcast", _arg(0)), "broadcast_": ("broadcast", _arg(0)),
    "isend": ("send", _arg(0)), "irecv": ("recv", _arg(0)),
}
_GROUP_ARG = {"c10d": "process_group", "_c10d_functional": "group_name", "_c10d_functional_autograd": "group_name"}


def _group_ranks(func, args, kwargs) -> tuple[int, ...]:
    """Global ranks of the group a collective runs on (from its process group or group name)."""
    names = [a.name for a in func._schema.arguments]
    key = _GROUP_ARG[func.namespace]
    if key not in names:
        return ()
    i = names.index(key)
    g = args[i] if i < len(args) else kwargs[key]
    if isinstance(g, str):
        g = dist.distributed_c10d._resolve_process_group(g)
    elif not isinstance(g, dist.ProcessGroup):  # the c10d ops receive it boxed (a ScriptObject)
        g = dist.ProcessGroup.unbox(g)
    return tuple(dist.get_process_group_ranks(g))


class CommCounter(TorchDispatchMode):
    """Context manager recording every collective issued inside it on this rank."""

    def __init__(self):
        super().__init__()
        self.events: list[dict] = []  # one per call: kind, bytes, group, api, op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in NAMESPACES:
            self._record(func, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, func, args, kwargs) -> None:
        name = func._opname
        if func.namespace == "c10d":
            entry, api = _C10D.get(name), "c10d"
        else:
            entry, api = _FUNCTIONAL.get(name), "functional"
        if name == "batch_p2p_ops":  # functional batched P2P: one event per op
            group = _group_ranks(func, args, kwargs)
            for op, t in zip(args[0], args[3]):
                self.events.append({"kind": "send" if op == "isend" else "recv", "bytes": _nbytes(t),
                                    "group": group, "api": api, "op": str(func)})
            return
        if entry is None:  # wait_tensor, barrier, autograd wrappers: no payload
            return
        kind, size = entry
        self.events.append({"kind": kind, "bytes": int(size(args)), "group": _group_ranks(func, args, kwargs),
                            "api": api, "op": str(func)})

    def summary(self) -> dict:
        """Totals of this rank: ``calls`` and ``bytes`` per kind, the API paths seen per kind,
        bytes per (kind, group), and calls over one-rank groups (not in the totals)."""
        calls, nbytes, local = defaultdict(int), defaultdict(int), defaultdict(int)
        apis, by_group = defaultdict(set), defaultdict(int)
        for e in self.events:
            if len(e["group"]) == 1:
                local[e["kind"]] += 1
                continue
            calls[e["kind"]] += 1
            nbytes[e["kind"]] += e["bytes"]
            apis[e["kind"]].add(e["op"])
            by_group[f"{e['kind']}@{','.join(map(str, e['group']))}"] += e["bytes"]
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {"rank": rank, "calls": dict(calls), "bytes": dict(nbytes), "local_calls": dict(local),
                "ops": {k: sorted(v) for k, v in apis.items()}, "bytes_by_group": dict(by_group)}


def gather_summaries(counter: CommCounter, group: dist.ProcessGroup | None = None) -> list[dict]:
    """Every rank's :meth:`CommCounter.summary`, in rank order, on every rank."""
    mine = counter.summary()
    if not dist.is_initialized():
        return [mine]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


def mean_bytes(summaries: list[dict]) -> dict[str, float]:
    """Bytes per kind averaged over ranks (kinds no rank issued are absent)."""
    kinds = {k for s in summaries for k in s["bytes"]}
    return {k: sum(s["bytes"].get(k, 0) for s in summaries) / len(summaries) for k in KINDS if k in kinds}
