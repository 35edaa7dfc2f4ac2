"""Where a training step's activation memory goes: bytes kept for backward, by module, BF16 vs FP8.

For the ``tiny`` and ``small`` presets, one forward of the trainer's loss path is run under
``saved_tensors_hooks``; every saved tensor (each storage once, parameters excluded) is
charged to the innermost module running when it was saved (forward pre/post hooks keep
the module stack). Tensors that custom autograd Functions hold as plain ``ctx``
attributes instead of saved tensors (the fused head loss keeps its two gradients that way)
are found by walking the autograd graph from the loss and listed as their own row.

Why: the FP8 saved-bytes ratio (``fp8_cost``, ``step_*``) is one number; this table says
which activations make it up, i.e. what is left to shrink and in which precision it is kept.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch import nn

from moeforge.bench import write_results
from moeforge.config import load_config
from moeforge.train.losses import lm_loss
from moeforge.train.pretrain import build_model

MB = 2**20


def _ctx_held(loss: torch.Tensor) -> dict[int, int]:
    """Storages held as tensor attributes of custom-Function nodes reachable from ``loss``."""
    held, seen, todo = {}, set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for v in getattr(node, "__dict__", {}).values():
            if isinstance(v, torch.Tensor):
                held[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        todo.extend(fn for fn, _ in node.next_functions)
    return held


def breakdown(preset: str, fp8: bool, micro_batch: int) -> tuple[dict[str, float], float]:
    """MB kept for backward per module class (plus the ctx-held row) and the total."""
    cfg = load_config(preset, {"fp8.enabled": fp8, "train.micro_batch_size": micro_batch})
    model = build_model(cfg, torch.device("cpu"))
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.train.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    stack: list[str] = []

    def enter(mod, args) -> None:
        stack.append(type(mod).__name__)

    def leave(mod, args, out) -> None:  # returns None: the output is left alone
        stack.pop()

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            st = t.untyped_storage()
            seen.setdefault(st.data_ptr(), (st.nbytes(), stack[-1] if stack else "loss", t.dtype))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm_loss(model(tokens[:, :-1], labels=tokens[:, 1:]), tokens[:, 1:], cfg.model)["loss"]
    finally:
        for h in hooks:
            h.remove()
    by, dtypes = collections.Counter(), collections.Counter()
    for nbytes, where, dtype in seen.values():
        by[where] += nbytes / MB
        dtypes[str(dtype).removeprefix("torch.")] += nbytes / MB
    held = {p: n for p, n in _ctx_held(loss).items() if p not in seen}
    by["(held on ctx: head-loss gradients)"] += sum(held.values()) / MB
    return dict(by), sum(by.values()), dict(dtypes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["tiny", "small"])
    args = ap.parse_args()
    rows, summary = [], {}
    for preset in args.presets:
        mb = 16 if preset == "tiny" else 8
        (b16, t16, d16), (b8, t8, d8) = breakdown(preset, False, mb), breakdown(preset, True, mb)
        for where in sorted(set(b16) | set(b8), key=lambda k: -(b16.get(k, 0) + b8.get(k, 0))):
            rows.append({"preset": preset, "saved by": where, "bf16 MB": round(b16.get(where, 0.0), 2),
                         "fp8 MB": round(b8.get(where, 0.0), 2)})
        for dtype in sorted(set(d16) | set(d8), key=lambda k: -(d16.get(k, 0) + d8.get(k, 0))):
            rows.append({"preset": preset, "saved by": f"(all saved {dtype} tensors)",
                         "bf16 MB": round(d16.get(dtype, 0.0), 2), "fp8 MB": round(d8.get(dtype, 0.0), 2)})
        rows.append({"preset": preset, "saved by": "total", "bf16 MB": round(t16, 1), "fp8 MB": round(t8, 1)})
        summary[f"{preset} fp8/bf16"] = t8 / t16
        saved16, saved8 = sum(d16.values()), sum(d8.values())
        summary[f"{preset} fp8/bf16, saved tensors only (no held gradients)"] = saved8 / saved16
        print(f"{preset}: bf16 {t16:.1f} MB, fp8 {t8:.1f} MB, ratio {t8 / t16:.3f}", flush=True)
    write_results("activations", "Activation memory of one training step, by the module that keeps it", rows,
                  summary=summary, notes=[
                      "One forward of the trainer's loss path per preset and precision (tiny: 16x128 tokens, small: "
                      "8x256); each storage counted once, at the innermost module running when it was saved; "
                      "parameters excluded. Fp8Linear/Linear rows are GEMM inputs (E4M3 + scales under FP8; "
                      "bf16 wo keeps the attention output), MLA keeps its latents and log-sum-exp (q/k/v are "
                      "recomputed; the C attention backward needs no output), RMSNorm its input (the residual "
                      "stream), GroupedExperts the SwiGLU inputs (unpadded; the SwiGLU output is recomputed, the "
                      "routing weight's gradient needs no output rows, and the experts' input rows are gathered "
                      "from the FFN norm's output, which is rebuilt), MLP its SwiGLU inputs (in bf16 the down "
                      "projection rebuilds the SwiGLU output from them; under FP8 it keeps its E4M3 copy), MoE the router's scores and dispatch "
                      "indices. Norm outputs (and bf16 SwiGLU outputs) are kept by nobody: their consumers "
                      "rebuild them.",
                      "The '(all saved ... tensors)' rows split the same saved bytes by dtype: under FP8 the "
                      "bf16 that remains is what V3 also keeps in high precision (the residual stream at the "
                      "norms, the MLA latents, the MTP projection's input).",
                      "The head-loss row is memory the fused loss holds between forward and backward (its "
                      "precomputed gradients), which saved-tensor counts elsewhere in these benchmarks miss."])


if __name__ == "__main__":
    main()
