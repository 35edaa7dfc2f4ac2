"""Where a training step's activation memory goes: bytes kept for backward, by module, BF16 vs FP8.

For the ``tiny`` and ``small`` presets, one forward of the trainer's loss path is run under
``saved_tensors_hooks``; every saved tensor (each storage once, parameters excluded) is
charged to the innermost module running when it was saved (forward pre/post hooks keep
the module stack). Tensors that custom autograd Functions hold as plain ``ctx``
attributes instead of saved tensors (the fused head loss keeps its two gradients that way)
are found by walking the autograd graph from the loss and listed as their own row.

Why: the FP8 saved-bytes ratio (``fp8_cost``, ``step_*``) is one number; this table says
which activations make it up, i.e. what is left to shrink and in which precision it is kept.
A block at DeepSeek-V3's widths (``v3_layer_bytes``) is measured the same way, per token,
to show what the ratio is where V3's proportions hold rather than the presets'.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch import nn

from moeforge.bench import FP8_STORAGE_VARIANTS, write_results
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


def breakdown(preset: str, over: dict, micro_batch: int) -> tuple[dict[str, float], float, dict[str, float]]:
    """MB kept for backward per module class (plus the ctx-held row), the total, MB by dtype."""
    cfg = load_config(preset, {**over, "train.micro_batch_size": micro_batch})
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


# One MoE block at DeepSeek-V3's widths (dim 7168, 128 heads, q/kv latents 1536/512, expert
# width 2048, 8 routed experts per token + 1 shared). Saved bytes per token and layer do not
# depend on how many experts exist, only on how many a token uses, so 8 experts with all 8
# active stand in for 8 of 256 (~2.4 GB of FP32 weights instead of 45 GB); the router's FP32
# scores are the one exception (8 instead of 256 per token: 1 KB per token less).
V3_LAYER = {"model.n_layers": 1, "model.n_dense_layers": 0, "model.mtp_depth": 0, "model.vocab_size": 512,
            "model.n_routed_experts": 8, "model.n_expert_groups": 1, "model.n_limited_groups": 1,
            "train.seq_len": 256, "parallel.pp": 1, "parallel.ep": 1, "parallel.dp_shard": 1,
            "parallel.pp_schedule": "1f1b", "parallel.pp_microbatches": 1}


def v3_layer_bytes(over: dict) -> tuple[float, dict[str, float]]:
    """Bytes per token kept for backward inside the one block of :data:`V3_LAYER`, by dtype."""
    cfg = load_config("deepseek-v3-671b", {**V3_LAYER, **over, "train.micro_batch_size": 1})
    model = build_model(cfg, torch.device("cpu"))
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 257), generator=torch.Generator().manual_seed(0))
    block, depth = model.layers[0], [0]
    hooks = [block.register_forward_pre_hook(lambda m, a: depth.__setitem__(0, 1)),
             block.register_forward_hook(lambda m, a, o: depth.__setitem__(0, 0))]
    seen: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor):
        if depth[0] and not isinstance(t, nn.Parameter):
            seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), t.dtype))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_loss(model(tokens[:, :-1], labels=tokens[:, 1:]), tokens[:, 1:], cfg.model)
    finally:
        for h in hooks:
            h.remove()
    dtypes = collections.Counter()
    for nbytes, dtype in seen.values():
        dtypes[str(dtype).removeprefix("torch.")] += nbytes / 256
    return sum(dtypes.values()), dict(dtypes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["tiny", "small"])
    ap.add_argument("--no-v3-layer", action="store_true", help="skip the block at V3's widths (~5 GB, ~20 s)")
    ap.add_argument("--quick", action="store_true", help="tiny only, no V3-width block")
    args = ap.parse_args()
    if args.quick:
        args.presets, args.no_v3_layer = ["tiny"], True
    rows, summary = [], {}
    names = [f"{k} MB" for k in FP8_STORAGE_VARIANTS]
    v3 = "V3 widths, one MoE block"

    def add(preset: str, where: str, values: list[float], scale: float = 1.0) -> None:
        rows.append({"preset": preset, "saved by": where, **{n: round(v / scale, 2) for n, v in zip(names, values)}})

    def ratios(label: str, totals: list[float], unit: str, scale: float) -> None:
        for k, t in list(zip(FP8_STORAGE_VARIANTS, totals))[1:]:
            summary[f"{label} {k}/bf16"] = t / totals[0]
        print(f"{label}: " + ", ".join(f"{k} {t / scale:.1f} {unit} ({t / totals[0]:.3f})"
                                      for k, t in zip(FP8_STORAGE_VARIANTS, totals)), flush=True)

    if not args.no_v3_layer:
        got = [v3_layer_bytes(over) for over in FP8_STORAGE_VARIANTS.values()]
        dts = [d for _, d in got]
        for dtype in sorted(set().union(*dts), key=lambda k: -sum(d.get(k, 0) for d in dts)):
            add(v3, f"(all saved {dtype} tensors, KB/token)", [d.get(dtype, 0.0) for d in dts], 1024)
        add(v3, "total, KB per token", [t for t, _ in got], 1024)
        ratios(v3, [t for t, _ in got], "KB/token", 1024)
    for preset in args.presets:
        mb = 16 if preset == "tiny" else 8
        got = [breakdown(preset, over, mb) for over in FP8_STORAGE_VARIANTS.values()]
        bys, dts = [b for b, _, _ in got], [d for _, _, d in got]
        for where in sorted(set().union(*bys), key=lambda k: -sum(b.get(k, 0) for b in bys)):
            add(preset, where, [b.get(where, 0.0) for b in bys])
        for dtype in sorted(set().union(*dts), key=lambda k: -sum(d.get(k, 0) for d in dts)):
            add(preset, f"(all saved {dtype} tensors)", [d.get(dtype, 0.0) for d in dts])
        add(preset, "total", [t for _, t, _ in got])
        ratios(preset, [t for _, t, _ in got], "MB", 1)
        ratios(f"{preset}, saved tensors only (no held gradients)", [sum(d.values()) for d in dts], "MB", 1)
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
                      "rebuild them (MTP's projection too, which reads two norm outputs side by side: since "
                      "session 14; 4 MB of a small step before).",
                      "The '(all saved ... tensors)' rows split the same saved bytes by dtype: under FP8 the "
                      "bf16 that remains is what V3 also keeps in high precision (the residual stream at the "
                      "norms, the MLA latents).",
                      "'fp8n': FP8 with fp8.cache_norm_inputs (off by default; beyond V3): the "
                      "norms on the residual stream save their input in E4M3 with 1x128 scales and run backward "
                      "on its dequantized value, and MLA rounds its two latents to E4M3 in forward and keeps "
                      "them so (the rope key stays bf16). What stays bf16 then: the rope key and router state. "
                      "'fp8lean': fp8n and fp8.recompute_swiglu_output (off by default): the dense and "
                      "shared MLPs' down projection rebuilds the SwiGLU output from its E4M3 inputs, as V3 does, "
                      "instead of keeping an E4M3 copy of it (the routed experts always rebuild it).",
                      "The head-loss row is memory the fused loss holds between forward and backward (its "
                      "precomputed gradients), which saved-tensor counts elsewhere in these benchmarks miss.",
                      "'V3 widths, one MoE block' (its rows in KB per token, not MB): the tensors saved inside one "
                      "MoE transformer block built at DeepSeek-V3's published widths (configs/deepseek-v3-671b.toml; "
                      "8 routed experts, all 8 used per token, standing in for 8 of 256: bytes per token depend on "
                      "the experts used, not on how many exist, except the router's FP32 scores, 1 KB per token "
                      "more at 256), one sequence of 256 tokens, the same recomputation as the presets. It shows "
                      "what ratio V3's own recipe reaches against BF16 when both recompute the same things."])


if __name__ == "__main__":
    main()
