"""What the trainer needs under torchrun: the mesh, global step statistics, sharded checkpoints.

``loop.py`` stays one loop: with ``mesh is None`` (one process, no torchrun) every helper
here falls through to the single-process code, bit for bit.

Choices:
- :func:`setup` joins the process group only when ``WORLD_SIZE > 1``, after the layout
  has been checked (one-line errors before any process-group work). Every layout
  ``check_layout`` accepts runs, pipeline parallelism included: the pretrain stage then
  drives the schedule through the loop's ``forward_backward`` hook (see ``loop.py``).
- ``train.micro_batch_size`` is per data-parallel rank (as torchrun users expect); the
  global batch is ``micro_batch_size * dp * micro-batches``, and token counts (batch
  ramp, tokens/s) are global. So ``dp_shard=2, micro_batch_size=2`` trains on exactly the
  batches of one process with ``micro_batch_size=4``.
- One all-reduce per step carries the loss parts (averaged over ranks; tensor- and
  pipeline-parallel ranks hold equal copies, so the world mean is the dp mean) and the squared gradient
  norm. Every rank therefore sees the same numbers: the finiteness check, clipping and
  the skip decision agree without another collective.
- The gradient norm is layout-agnostic: each rank sums the squares of the gradient
  elements it holds and divides by how many ranks hold the same elements (ranks of its
  pipeline stage over the number of distinct shards: DTensor ``Shard`` dims, times ep
  for expert weights, which are plain per-rank slices). That covers FSDP, HSDP, TP, EP
  and their mixes without grouping parameters by mesh.
- Checkpoints: every rank writes its shards with ``torch.distributed.checkpoint`` into
  the usual ``.tmp-step_XXXXXX`` directory; rank 0 then adds ``state.json`` (checksums of
  every file) and the ``COMPLETE`` marker and renames, exactly as ``checkpoint.py`` does
  for one process, so ``verify``/``latest``/fallback work unchanged. DCP records global
  shapes, so such a checkpoint resumes under another dp/ep/pp layout or in one process
  (``restore`` recognises it by DCP's ``.metadata`` file); under pp each rank writes its
  stages' tensors, under the unpipelined names. This assumes the ranks share
  one filesystem (one machine, or a shared mount on a cluster).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from moeforge.config import Config
from moeforge.parallel import build_mesh, check_layout, init_distributed
from moeforge.parallel.checkpoint import is_expert, load_named, save_named
from moeforge.parallel.mesh import ParallelMesh, device
from moeforge.train import checkpoint as ckpt

DCP_METADATA = ".metadata"


def setup(cfg: Config) -> ParallelMesh | None:
    """Check the layout, join the process group and build the mesh; None in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world)
    if world == 1:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and local > 1 and "OMP_NUM_THREADS" not in os.environ:
        # several ranks share this machine's cores: without a cap each would start one
        # thread per core and they would oversubscribe the CPU many times over
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    init_distributed()
    return build_mesh(cfg)


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs, plots and writes run files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. preparing data on disk), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def any_rank(flag: bool, mesh: ParallelMesh | None) -> bool:
    """True on every rank if it is true on one (a Ctrl-C seen by only some ranks)."""
    if mesh is None:
        return flag
    t = torch.tensor([float(flag)], device=device())
    dist.all_reduce(t)
    return t.item() > 0


def _grad_sq(named_params: list[tuple[str, nn.Parameter]], mesh: ParallelMesh, device) -> torch.Tensor:
    """This rank's share of the global squared gradient norm (see the module docstring)."""
    holders = dist.get_world_size() // mesh.cfg.pp
    total = torch.zeros((), dtype=torch.float32, device=device)
    for name, p in named_params:
        g = p.grad
        if g is None:
            continue
        shards = 1
        if isinstance(g, DTensor):
            shards = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if isinstance(pl, Shard))
            g = g.to_local()
        if mesh.expert is not None and is_expert(name):
            shards *= mesh.size("ep")
        total = total + g.float().pow(2).sum() * (shards / holders)
    return total


def step_values(parts: list[torch.Tensor], opt, mesh: ParallelMesh | None) -> tuple[list[float], torch.Tensor]:
    """Loss parts averaged over ranks plus the global gradient norm, as floats (the step's
    one host sync), and the norm as a tensor for clipping."""
    if mesh is None:
        norm = torch.nn.utils.get_total_norm(opt.grads()).float()
        return torch.stack(parts + [norm]).tolist(), norm
    world = dist.get_world_size()
    vec = torch.stack([p.float() / world for p in parts] + [_grad_sq(opt.params, mesh, parts[0].device)])
    dist.all_reduce(vec)
    vec[-1] = vec[-1].sqrt()
    return vec.tolist(), vec[-1]


def clip_(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor, mesh: ParallelMesh | None) -> None:
    """Scale gradients so that the global norm ``norm`` is at most ``max_norm``."""
    if mesh is None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return
    # per tensor: DTensor grads on different meshes (experts vs blocks) cannot share a foreach kernel
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)


# ----------------------------------------------------------------------------- checkpoints
def _groups(model: nn.Module, opt) -> dict[str, dict[str, torch.Tensor]]:
    """What a sharded checkpoint holds, keyed by parameter name in every group."""
    return {"model": dict(model.state_dict()), "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def save(root: Path, step: int, model: nn.Module, opt, state: dict, keep_last: int,
         mesh: ParallelMesh) -> Path:
    """All ranks write their shards; rank 0 seals the directory (state.json, marker, rename)."""
    groups = _groups(model, opt)

    def write(tmp: Path) -> None:
        barrier()  # rank 0 has emptied and created tmp
        save_named(tmp, groups, mesh)  # returns once every rank's shards and the metadata are written

    final = root / ckpt.step_dir_name(step)
    if is_main():
        ckpt.write_step(root, step, write, state, keep_last)
    else:
        write(root / f".tmp-{final.name}")
    barrier()  # no rank reads it (or starts the next save) before the rename
    return final


def load(path: Path, model: nn.Module, opt, mesh: ParallelMesh | None) -> None:
    """Fill model and optimizer moments from a sharded checkpoint, under any dp/ep layout."""
    load_named(path, _groups(model, opt), mesh)


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The full model tensors of a sharded checkpoint, in this process (for post-training
    init, chat and evaluation, which read single-process checkpoints by name)."""
    import torch.distributed.checkpoint as dcp

    from moeforge.parallel.checkpoint import check_metadata

    check_metadata(path)  # before DCP unpickles it
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.items() if k.startswith("model.")}
    dcp.load({"model": model}, checkpoint_id=str(path))
    return model
