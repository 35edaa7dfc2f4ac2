"""Checkpoints: one directory per step, written atomically, verified on load, last K kept.

Layout of ``<run>/checkpoints/step_000100/``::

    model.safetensors      parameters and persistent buffers (the routers' balancing bias)
    optimizer.safetensors  AdamW moments, keyed ``<param>.exp_avg`` / ``<param>.exp_avg_sq``
    state.json             step, tokens, optimizer step count, stage (data-loader) position,
                           RNG states, the resolved config, sha256 of the two files above
    COMPLETE               sha256 of state.json: written last, so its presence means done

Choices:
- Nothing is unpickled: tensors are safetensors, everything else JSON (RNG byte states
  as base64). A checkpoint from a stranger cannot run code.
- Atomic: everything goes into ``.tmp-step_XXXXXX`` (files fsync'ed), then one rename;
  a crash mid-write leaves only a temporary directory, which the next save removes.
- :func:`latest` walks step directories newest first and returns the first that
  verifies (marker present, checksums match); each one skipped is reported in one line,
  so a checkpoint truncated on disk falls back to the previous good one.
- Resuming under a different model config is refused with the first differing field;
  training fields that change what a checkpoint means for the data (sequence length,
  micro-batch size, moment dtype) are checked too. Changing ``train.steps`` is allowed.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moeforge.data.shards import sha256_file
from moeforge.errors import UserError

MARKER = "COMPLETE"
FILES = ("model.safetensors", "optimizer.safetensors")
STEP_DIR = re.compile(r"^step_(\d{6,})$")
# fields that must match between the checkpoint and the resuming config
# (the micro-batch is compared as the global one, micro_batch_size * data-parallel ranks,
# so a dp2 run with 2 sequences per rank resumes in one process with 4, exactly)
RESUME_FIELDS = ("train.seq_len", "train.moment_dtype")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- RNG states
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG a step can touch, as JSON-safe data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ----------------------------------------------------------------------------- save
def save(root: Path, step: int, model_tensors: dict[str, torch.Tensor], optim_tensors: dict[str, torch.Tensor],
         state: dict[str, Any], keep_last: int) -> Path:
    """Write ``root/step_XXXXXX`` (the two safetensors files) atomically; prune to ``keep_last``."""
    def write(tmp: Path) -> None:
        for fname, tensors in zip(FILES, (model_tensors, optim_tensors)):
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / fname))

    return write_step(root, step, write, state, keep_last)


def write_step(root: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any],
               keep_last: int) -> Path:
    """``write_files(tmp)`` fills a fresh temporary directory; then state.json (with the
    sha256 of every file written) and the COMPLETE marker, all synced, and one rename.

    A failed write (disk full, permissions) removes its temporary directory and raises a
    one-line UserError; the checkpoints already on disk are never touched before the rename.
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_files(tmp)
        _seal(tmp, dict(state, step=step))
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or e
        raise UserError(f"checkpoint {final} could not be written ({why}); earlier checkpoints in {root} are "
                        "intact: free space or fix permissions, then --resume") from None
    if final.exists():  # re-saving a step (e.g. after resume): move the old one aside first
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(root)
    prune(root, keep_last)
    return final


def _seal(tmp: Path, state: dict[str, Any]) -> None:
    """state.json with every file's checksum, everything synced, the COMPLETE marker last."""
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    state = dict(state, files={f: sha256_file(tmp / f) for f in files})
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in (*files, "state.json"):
        _fsync(tmp / f)
    (tmp / MARKER).write_text(sha256_file(tmp / "state.json") + "\n")
    _fsync(tmp / MARKER)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step directory under root, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def prune(root: Path, keep_last: int) -> None:
    for _, p in step_dirs(root)[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):  # leftovers of a crash mid-write
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- verify / load
def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint directory; return its state. UserError names the file and the problem."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    marker = path / MARKER
    if not marker.is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {MARKER} marker: the write was interrupted)")
    state_file = path / "state.json"
    if not state_file.is_file() or sha256_file(state_file) != marker.read_text().strip():
        raise UserError(f"checkpoint {state_file} is missing or corrupt (checksum mismatch)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {state_file} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k, {}), dict) for k in ("files", "config")):
        raise UserError(f"checkpoint {state_file} is not a moeforge checkpoint state (a JSON object whose "
                        "'files' and 'config' are tables)")
    for fname, digest in state.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise UserError(f"checkpoint file {f} is corrupt (sha256 mismatch; truncated or modified on disk)")
    return state


def latest(root: Path) -> Path | None:
    """Newest checkpoint under ``root`` that verifies; skipped ones get a one-line warning."""
    for _, p in step_dirs(root):
        try:
            verify(p)
            return p
        except UserError as e:
            print(f"warning: skipping {e}; trying the previous checkpoint", file=sys.stderr)
    return None


def resolve(resume: str | Path, default_root: Path) -> Path:
    """``"latest"`` -> newest valid under default_root; a checkpoints dir -> newest in it; else the path."""
    if str(resume) == "latest":
        found = latest(default_root)
        if found is None:
            raise UserError(f"--resume: no valid checkpoint in {default_root}")
        return found
    p = Path(resume)
    if p.is_dir() and not STEP_DIR.match(p.name) and not (p / MARKER).exists():
        sub = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = latest(sub)
        if found is None:
            raise UserError(f"--resume: no valid checkpoint in {sub}")
        return found
    verify(p)
    return p


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix.count(".") < 1:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume under a config that changes the model or the data layout."""
    old, new = _flat(saved), _flat(current)
    keys = [k for k in new if k.startswith("model.")] + list(RESUME_FIELDS)
    for k in keys:
        if old.get(k) != new.get(k):
            raise UserError(f"checkpoint {path} was trained with {k}={old.get(k)!r} but this config has "
                            f"{k}={new.get(k)!r}")
    (b0, dp0), (b1, dp1) = (_batch(c) for c in (old, new))
    if b0 * dp0 != b1 * dp1:
        raise UserError(f"checkpoint {path} was trained with train.micro_batch_size={b0} on {dp0} data-parallel "
                        f"rank(s) but this run has {b1} on {dp1}: the global micro-batch must stay {b0 * dp0}")


def _batch(flat: dict[str, Any]) -> tuple[int, int]:
    """(micro-batch per rank, data-parallel ranks) of a flattened config."""
    return flat.get("train.micro_batch_size", 0), flat.get("parallel.dp_replicate", 1) * flat.get("parallel.dp_shard", 1)


def load_tensors(path: Path, fname: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / fname))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint file {path / fname} cannot be read ({e})") from None
