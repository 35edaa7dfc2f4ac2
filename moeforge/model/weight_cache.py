"""A parameter's low-precision forms (its bf16 cast, its FP8 blocks), made once per step.

Every GEMM with an FP32 master weight needs the weight in the compute dtype (bf16 on the
CPU's bf16 matrix units) or, under FP8, quantized in 128x128 blocks: once for the forward GEMM
and once more for the backward Dgrad. Casting it on each use cost the ``small`` preset
two full passes over every weight per step (the expert stacks alone ~0.1 s of a 2.5 s
step); keeping the forward's cast as a saved tensor for backward counted weight-sized
bytes as activation memory. Here the form is made on first use and kept, attached to the
parameter, until the weights change: one pass per optimizer step, reused by the forward,
the backward, recomputed forwards (activation checkpointing, the MLA up-projections) and
gradient-accumulation micro-batches.

Choices:

- Validity: a form is reused while the cache *epoch* and the parameter's version counter
  are unchanged. moeforge's ``AdamW.step`` and (through torch's global post-step hook)
  every ``torch.optim`` optimizer bump the epoch: torch's fused AdamW updates parameters
  without bumping their version counters. ``load_state_dict`` and other in-place writes
  bump the version. A write through ``param.data`` is invisible to both: call
  :func:`invalidate` after one (moeforge's checkpoint loaders do).
- Only plain ``nn.Parameter`` objects (not DTensors, which keep their own graph), only
  where no gradient flows through the form (inside autograd Functions, which save the
  master and ask again in backward, or under no_grad: elsewhere the cast must stay in the
  graph and is made on the spot), never while ``torch.compile`` traces (inductor fuses the casts itself), never in inference
  mode (an inference tensor can never be saved for backward later). Everything else gets
  the form made on the spot, exactly as before.
- Stored in a weak-keyed table by parameter identity, not as an attribute: deep copies of
  a model (reference policies) get their own forms, and a dropped model frees its forms.
- Memory: one persistent copy per parameter and form: 2 bytes per parameter for bf16
  (what Megatron-style bf16 parameters cost too), E4M3 plus scales plus the dequantized
  bf16 GEMM operand under CPU-emulated FP8. Callers never save a form for backward; they
  save the master and ask again, so activation accounting is unchanged.
- Values are bit-identical to making the form on each use (the same function runs once).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

_FORMS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> {key: (epoch, versions, value)}
_EPOCH = 0
enabled = True  # module switch: False makes every form on each use (A/B, tests)


def invalidate() -> None:
    """The weights changed (an optimizer step, a load through ``.data``): forms are stale."""
    global _EPOCH
    _EPOCH += 1


def cacheable(w: torch.Tensor) -> bool:
    """A plain parameter, used where no gradient flows through the form (inside an autograd
    Function, or under no_grad), outside inference mode and compilation."""
    return (enabled and type(w) is nn.Parameter and not (torch.is_grad_enabled() and w.requires_grad)
            and not torch.is_inference_mode_enabled() and not torch.compiler.is_compiling())


def cached(w: torch.Tensor, key: Hashable, make: Callable[[torch.Tensor], Any],
           deps: tuple[torch.Tensor, ...] = ()) -> Any:
    """``make(w)``, remembered for parameter ``w`` under ``key`` until the weights change.
    ``deps``: other parameters the form is made from too (the routed experts' stacked
    [W1; W3]); it is also remade when any of them changes."""
    if not cacheable(w) or not all(cacheable(d) for d in deps):
        return make(w)
    forms = _FORMS.get(w)
    if forms is None:
        forms = _FORMS[w] = {}
    key = (key, *map(id, deps)) if deps else key
    versions = (w._version, *(d._version for d in deps))
    hit = forms.get(key)
    if hit is not None and hit[0] == _EPOCH and hit[1] == versions:
        return hit[2]
    forms.pop(key, None)  # the stale form goes before the new one is made: peak memory
    with torch.no_grad():
        value = make(w.detach())
    forms[key] = (_EPOCH, versions, value)
    return value


def cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)`` (a detached copy for parameters), made once per optimizer step."""
    if w.dtype == dtype:
        return w
    return cached(w, ("cast", dtype), lambda t: t.to(dtype))


def cached_bytes() -> int:
    """Bytes held by all live forms (benchmarks report it next to the activations)."""
    total = 0
    for forms in list(_FORMS.values()):
        for _, _, value in forms.values():
            for t in _tensors(value):
                total += t.numel() * t.element_size()
    return total


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for t in getattr(value, "__dict__", {}).values() if isinstance(t, torch.Tensor)]


register_optimizer_step_post_hook(lambda opt, args, kwargs: invalidate())
