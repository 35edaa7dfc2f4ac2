"""Process groups and the DeviceMesh built from ``[parallel]``.

Choices:
- One dense mesh with named dims ``("pp", "dp_replicate", "dp_shard", "tp")``, outermost
  first: tensor parallelism is innermost so its (most frequent) collectives stay inside a
  node, pipeline outermost because it sends the least. Size-1 dims are kept so code can
  always ask for ``mesh["tp"]`` without special cases; ``"dp"`` is the flattened
  (dp_replicate, dp_shard) pair, the group over which losses, gradients and MoE counts
  are averaged/summed.
- Expert parallelism borrows from data parallelism (as DeepSeek-V3: 64-way EP inside
  128-way DP): ``ep`` must divide ``dp_replicate * dp_shard``. A second mesh
  ``("pp", "edp", "ep", "tp")`` over the same ranks, built only when ``ep > 1``, splits
  the data-parallel ranks into ``edp`` replicas of ``ep`` expert shards; rank order
  matches the dense mesh, so the flattened (edp, ep) index equals the dp index.
- Every layout check (world size = product, divisibility) runs in :func:`check_layout`
  *before* any process-group work and raises a one-line :class:`ConfigError`.
- Backend: NCCL when CUDA is present, gloo otherwise; no other code path differs. The
  process-group timeout is bounded (``MOEFORGE_DIST_TIMEOUT`` seconds, default 600) so a
  dead rank makes the others fail instead of hanging forever.
- A world of one process gets no mesh at all (``None``); ``apply`` is then the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeforge.config import Config, ConfigError, ParallelConfig

DENSE_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
EXPERT_DIMS = ("pp", "edp", "ep", "tp")


def check_layout(cfg: Config, world_size: int) -> None:
    """Reject a layout this world cannot run, with one line naming the field (no PG work)."""
    p = cfg.parallel
    if p.world_size != world_size:
        raise ConfigError(
            f"parallel.dp_replicate*dp_shard*tp*pp = {p.dp_replicate}*{p.dp_shard}*{p.tp}*{p.pp} = "
            f"{p.world_size} does not equal the world size {world_size}")
    cfg.validate()  # the static cross-checks (heads, experts, layers)
    if p.pp > 1:
        # checked here, not in Config.validate, so recipes that only size a cluster
        # (`moeforge plan`) load without a batch setting
        stages = p.pp * p.stages_per_rank
        if p.pp_microbatches < stages and p.pp_schedule != "gpipe":
            raise ConfigError(f"parallel.pp_microbatches={p.pp_microbatches} must be >= the {stages} pipeline "
                              f"stages of parallel.pp_schedule={p.pp_schedule!r}")
        if cfg.train.micro_batch_size % p.pp_microbatches:
            raise ConfigError(f"parallel.pp_microbatches={p.pp_microbatches} does not divide "
                              f"train.micro_batch_size={cfg.train.micro_batch_size}")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """This rank's device: its local GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, world).

    Without ``WORLD_SIZE`` (or with 1) nothing is initialised: a single process needs no
    group. Calling it twice is harmless.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(f"WORLD_SIZE={world} but {var} is not set (launch with torchrun)")
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        timeout = timedelta(seconds=float(os.environ.get("MOEFORGE_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend(), timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class ParallelMesh:
    """The meshes of one run plus the config they came from."""

    cfg: ParallelConfig
    dense: DeviceMesh  # dims DENSE_DIMS
    dp_mesh: DeviceMesh  # (dp_replicate, dp_shard) flattened: 1D "dp"
    expert: DeviceMesh | None  # dims EXPERT_DIMS; None when ep == 1

    def size(self, dim: str) -> int:
        if dim in ("edp", "ep"):
            return self.expert[dim].size() if self.expert is not None else (self.cfg.ep if dim == "ep" else self.dp)
        return self._mesh(dim).size()

    def rank(self, dim: str) -> int:
        """This process's coordinate along ``dim``."""
        if dim in ("edp", "ep"):
            if self.expert is None:
                return 0 if dim == "ep" else self.dp_mesh.get_local_rank()
            return self.expert[dim].get_local_rank()
        return self._mesh(dim).get_local_rank()

    def group(self, dim: str) -> dist.ProcessGroup:
        return self._mesh(dim).get_group()

    def _mesh(self, dim: str) -> DeviceMesh:
        if dim == "dp":
            return self.dp_mesh
        return (self.expert if dim in ("edp", "ep") else self.dense)[dim]

    @property
    def dp(self) -> int:
        return self.cfg.dp_replicate * self.cfg.dp_shard


def build_mesh(cfg: Config) -> ParallelMesh | None:
    """Validate the layout, join the process group and build the meshes (None for 1 process)."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    check_layout(cfg, world)
    if world == 1:
        return None
    init_distributed()
    p = cfg.parallel
    dev = device().type
    dense = init_device_mesh(dev, (p.pp, p.dp_replicate, p.dp_shard, p.tp), mesh_dim_names=DENSE_DIMS)
    dp_mesh = dense["dp_replicate", "dp_shard"]._flatten("dp")
    expert = None
    if p.ep > 1:
        edp = p.dp_replicate * p.dp_shard // p.ep
        expert = init_device_mesh(dev, (p.pp, edp, p.ep, p.tp), mesh_dim_names=EXPERT_DIMS)
    return ParallelMesh(p, dense, dp_mesh, expert)


def all_reduce_expert_counts(counts: torch.Tensor, mesh: ParallelMesh | None) -> torch.Tensor:
    """Global tokens per expert from this rank's counts, identical on every rank.

    ``counts`` is what the model reports (``ModelOutput.expert_counts``, [..., E_local]),
    summed over this step's micro-batches. Without EP, E_local = E and the global count is
    the sum over data-parallel ranks. With EP the experts module holds E/ep experts and
    counts the tokens *received* from the whole ep group, so the ep group's counts are
    concatenated (all-gather, ep rank order = expert order) and then summed over the
    ``edp`` replicas. TP ranks route identical tokens and are not summed; pipeline stages
    own disjoint layers (see pipeline.py, which sums its zero-padded rows over ``pp``).
    """
    if mesh is None:
        return counts
    counts = counts.detach().to(torch.float32).contiguous()
    if mesh.expert is not None:
        parts = [torch.empty_like(counts) for _ in range(mesh.size("ep"))]
        dist.all_gather(parts, counts, group=mesh.group("ep"))
        counts = torch.cat(parts, dim=-1)
        if mesh.size("edp") > 1:
            dist.all_reduce(counts, group=mesh.group("edp"))
    elif mesh.dp > 1:
        dist.all_reduce(counts, group=mesh.group("dp"))
    return counts


def all_reduce_mean(value: torch.Tensor, mesh: ParallelMesh | None, dim: str = "dp") -> torch.Tensor:
    """Average a scalar metric (e.g. the loss) over ``dim`` for logging; no autograd."""
    if mesh is None or mesh.size(dim) == 1:
        return value.detach()
    out = value.detach().to(torch.float32).clone()
    dist.all_reduce(out, group=mesh.group(dim))
    return out / mesh.size(dim)
