"""Distributed checkpoints: save under one layout, load under another.

Choices:
- ``torch.distributed.checkpoint`` (DCP) with the ``state_dict`` helpers: every rank
  writes only its shards, the metadata records global shapes, and a load under another
  layout reads the slices it needs. Keys are the unpipelined model's parameter names
  (FSDP and TP keep names; :class:`PipelineModel` registers the original sub-modules),
  so dp2 -> 1 process, tp2 -> dp2 or pp2 -> 1 work with no conversion.
- Expert parallelism is the one layout whose parameters are not DTensors (each rank
  holds a plain [E/ep, ...] slice, possibly FSDP-sharded over edp). On save and load
  those tensors are presented as DTensors on the expert mesh (``Shard(0)`` over ep,
  ``Replicate`` over edp) with the global [E, ...] shape, so the files are identical to
  a run without EP; optimizer moments get the same treatment.
- The same functions work in a single process (no process group): DCP then reads and
  writes locally, which is how a sharded run is resumed or inspected on a laptop.
- :func:`export_safetensors` writes one consolidated safetensors file of the model
  (our parameter names) from a sharded run: rank 0 writes after gathering full tensors.
- DCP keeps its ``.metadata`` as a pickle and unpickles it unchecked, so a crafted
  checkpoint directory could run code on load. :func:`load` first reads every
  ``*.metadata`` with an unpickler that only builds DCP's own metadata classes (plus
  torch sizes, dtypes and paths) and refuses anything else. Tensor data is read by DCP
  with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeforge.errors import UserError
from moeforge.model import weight_cache

EXPERT_KEYS = (".experts.w1", ".experts.w2", ".experts.w3")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                 *((m, c) for m in ("pathlib", "pathlib._local")  # paths pickle from pathlib._local on 3.13
                   for c in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else (no functions, no foreign classes)."""

    def find_class(self, module: str, name: str):
        obj = None
        if (module, name) in _SAFE_GLOBALS:
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        elif module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as meta

            obj = getattr(meta, name, None)
            obj = obj if isinstance(obj, type) else None  # its dataclasses and enums only
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return obj


def check_metadata(path: str | Path) -> None:
    """Refuse a DCP directory whose metadata pickles anything but DCP metadata (UserError)."""
    files = sorted(Path(path).glob("*.metadata"))
    if not files:
        raise UserError(f"{path}: not a distributed checkpoint (no .metadata file)")
    for f in files:
        try:
            with open(f, "rb") as fh:
                _MetadataUnpickler(fh).load()
        except Exception as e:  # UnpicklingError, EOFError, AttributeError, ...
            raise UserError(f"{f}: refused as checkpoint metadata ({type(e).__name__}: {e})") from None


def is_expert(key: str) -> bool:
    return key.endswith(EXPERT_KEYS)


def _to_global(t: torch.Tensor, mesh) -> DTensor:
    """This rank's [E/ep, ...] expert slice (maybe FSDP-sharded) as a global [E, ...] DTensor."""
    local = t.full_tensor() if isinstance(t, DTensor) else t
    emesh = mesh.expert["edp", "ep"]
    return DTensor.from_local(local, emesh, [Replicate(), Shard(0)], run_check=False)


def _from_global(g: DTensor, like: torch.Tensor) -> torch.Tensor:
    """Back from the global DTensor to the parameter's own form (re-sharded over edp)."""
    local = g.to_local()
    if isinstance(like, DTensor):
        return DTensor.from_local(local, like.device_mesh, [Replicate()], run_check=False).redistribute(
            like.device_mesh, like.placements)
    return local


def _expert_view(msd: dict, osd: dict, mesh, fn) -> None:
    """Apply ``fn(tensor)`` in place of every expert tensor in model and optimizer state."""
    for k in [k for k in msd if is_expert(k)]:
        msd[k] = fn(msd[k])
    for k, st in osd.get("state", {}).items():
        if is_expert(k):
            for name, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    st[name] = fn(v)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    opts = StateDictOptions(strict=True)
    if optimizer is None:
        msd, osd = get_state_dict(model, [], options=opts)
        return msd, {}
    return get_state_dict(model, optimizer, options=opts)


def _dcp_state(msd: dict, osd: dict, optimizer, mesh, extra: dict | None) -> dict:
    """What DCP saves or fills: the model (+ optimizer, + ``extra``), expert tensors as global
    views under expert parallelism (so any layout can read them back)."""
    if mesh is not None and mesh.expert is not None:
        _expert_view(msd, osd, mesh, lambda t: _to_global(t, mesh))
    state = {"model": msd}
    if optimizer is not None:
        state["optim"] = osd
    if extra:
        state["extra"] = extra
    return state


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, mesh=None,
         extra: dict | None = None) -> None:
    """Write a sharded checkpoint of model (+ optimizer) to directory ``path`` (all ranks call)."""
    msd, osd = _state(model, optimizer)
    dcp.save(_dcp_state(msd, osd, optimizer, mesh, extra), checkpoint_id=str(path))


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, mesh=None,
         extra: dict | None = None) -> None:
    """Fill model (+ optimizer, + the tensors of ``extra``) from ``path``, whatever layout wrote it."""
    check_metadata(path)
    msd, osd = _state(model, optimizer)
    ep = mesh is not None and mesh.expert is not None
    like_m = dict(msd)
    like_o = {k: dict(v) for k, v in osd.get("state", {}).items()}
    state = _dcp_state(msd, osd, optimizer, mesh, extra)
    dcp.load(state, checkpoint_id=str(path))
    weight_cache.invalidate()  # DCP may write parameters in place without bumping versions
    msd, osd = state["model"], state.get("optim", {})
    if ep:
        for k in [k for k in msd if is_expert(k)]:
            msd[k] = _from_global(msd[k], like_m[k])
        for k, st in osd.get("state", {}).items():
            if is_expert(k):
                for name, v in st.items():
                    if isinstance(v, DTensor) and name in like_o[k]:
                        st[name] = _from_global(v, like_o[k][name])
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=msd, optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def _global_view(groups: dict[str, dict[str, torch.Tensor]], mesh) -> dict[str, dict[str, torch.Tensor]]:
    if mesh is None or mesh.expert is None:
        return {g: dict(d) for g, d in groups.items()}
    return {g: {k: _to_global(t, mesh) if is_expert(k) else t for k, t in d.items()} for g, d in groups.items()}


def save_named(path: str | Path, groups: dict[str, dict[str, torch.Tensor]], mesh=None) -> None:
    """DCP-save groups of tensors keyed by parameter name (a model's state dict, the moments
    of an optimizer that is not a ``torch.optim.Optimizer``); all ranks call."""
    dcp.save(_global_view(groups, mesh), checkpoint_id=str(path))


def load_named(path: str | Path, groups: dict[str, dict[str, torch.Tensor]], mesh=None) -> None:
    """Fill the tensors of :func:`save_named`'s groups in place, whatever layout wrote them."""
    check_metadata(path)
    view = _global_view(groups, mesh)
    dcp.load(view, checkpoint_id=str(path))  # in place: plain tensors and DTensors' local shards
    weight_cache.invalidate()
    for g, d in groups.items():
        for k, t in d.items():
            if view[g][k] is not t:  # an expert slice, read through its global view
                t.copy_(_from_global(view[g][k], t))


def export_safetensors(path: str | Path, model: nn.Module, mesh=None) -> None:
    """One consolidated ``model.safetensors`` (our names, full tensors) written by rank 0."""
    from safetensors.torch import save_file

    msd, _ = _state(model, None)
    if mesh is not None and mesh.expert is not None:
        _expert_view(msd, {}, mesh, lambda t: _to_global(t, mesh))
    full = {}
    for k, v in msd.items():  # every rank takes part in the gathers
        full[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(full, str(path))
