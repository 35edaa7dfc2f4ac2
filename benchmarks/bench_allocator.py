"""The caching CPU allocator (moeforge/runtime.py) against torch's own, side by side.

glibc maps every block of 32 MiB or more fresh and unmaps it when freed, so a step that
allocates such tensors pays the kernel's page faults (zeroing each 4 KiB page on first
touch) for all of them, every step. The caching allocator keeps freed large blocks for
the next tensor of about their size. Cases: the MoE layer of ``bench_moe``'s scaling rows
(dim 512, expert width 256, top-4, 4096 tokens; fwd + bwd) at 64 and 256 experts, where
the experts' bf16 casts and gradients exceed 32 MiB, and the trainer's ``small`` step
(fwd + bwd + AdamW) at its preset micro-batch (8 x 256) and at 16 x 512 tokens.

Both variants run in this one process, alternating: "torch" sets the cache's limit to 0
(each large block goes back to the system when its tensor dies, as with torch's default
allocator: the same ``alloc_cpu`` / ``free_cpu`` underneath), "cache" to the default.
Each timed call is preceded by an untimed one of the same variant, so the cache variant
is measured warm, as every step after a training run's first is. Reported per call: the
median time, minor page faults and system CPU time (``getrusage``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from moeforge import runtime
from moeforge.bench import train_step, write_results
from moeforge.config import load_config
from moeforge.runtime import CACHE_LIMIT_MB


def _usage() -> tuple[float, int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_minflt, r.ru_stime


def ab(fn, repeat: int) -> dict[str, dict[str, float]]:
    """Median wall seconds, page faults and system seconds per call of ``fn`` under each allocator."""
    samples: dict[str, list[tuple[float, int, float]]] = {"torch": [], "cache": []}
    for _ in range(repeat):
        for name, limit in (("torch", 0), ("cache", CACHE_LIMIT_MB)):
            runtime.set_cpu_cache_limit(limit)
            fn()  # untimed: the cache variant starts warm
            t0, f0, s0 = _usage()
            fn()
            t1, f1, s1 = _usage()
            samples[name].append((t1 - t0, f1 - f0, s1 - s0))
    runtime.set_cpu_cache_limit(CACHE_LIMIT_MB)
    return {name: {"s": statistics.median(x[0] for x in v), "faults": statistics.median(x[1] for x in v),
                   "sys_s": statistics.median(x[2] for x in v)} for name, v in samples.items()}


def moe_case(n_experts: int, quick: bool):
    from bench_moe import fwd_bwd, make_moe  # benchmarks/ is on the path when run as a script

    dim, inter, tokens = (256, 128, 1024) if quick else (512, 256, 4096)
    moe = make_moe(n_experts, 4, dim, inter, groups=4)
    x = torch.randn(tokens // 512, 512, dim).to(torch.bfloat16)
    return fwd_bwd(moe, moe, x), f"{tokens} tokens, dim {dim}, width {inter}"


def step_case(batch: int, seq: int, quick: bool):
    preset = "tiny" if quick else "small"
    cfg = load_config(preset, {"train.progress": False})
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    step, _, _ = train_step(cfg, tokens)
    return step, f"{preset}, {batch} x {seq} tokens"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not runtime.install_cpu_cache():
        raise SystemExit("the caching CPU allocator is not available here (no C++ compiler?)")
    repeat = 2 if args.quick else 3
    cases = ([("MoE layer, 64 experts", lambda: moe_case(64, True)), ("step", lambda: step_case(2, 64, True))]
             if args.quick else
             [("MoE layer, 64 experts", lambda: moe_case(64, False)), ("MoE layer, 256 experts", lambda: moe_case(256, False)),
              ("small step", lambda: step_case(8, 256, False)), ("small step", lambda: step_case(16, 512, False))])
    rows = []
    for name, make in cases:
        fn, shape = make()
        r = ab(fn, repeat)
        rows.append({"case": name, "shape": shape, "torch_ms": r["torch"]["s"] * 1e3, "cache_ms": r["cache"]["s"] * 1e3,
                     "speedup": r["torch"]["s"] / r["cache"]["s"], "torch_faults": r["torch"]["faults"],
                     "cache_faults": r["cache"]["faults"], "torch_sys_ms": r["torch"]["sys_s"] * 1e3,
                     "cache_sys_ms": r["cache"]["sys_s"] * 1e3})
        print(f"{name} ({shape}): torch {rows[-1]['torch_ms']:.0f} ms, cache {rows[-1]['cache_ms']:.0f} ms "
              f"({rows[-1]['speedup']:.2f}x); faults {r['torch']['faults']:.0f} -> {r['cache']['faults']:.0f}")
        del fn
    runtime.empty_cpu_cache()
    notes = ["torch: every large block back to the system when freed (the cache's limit at 0: torch's default "
             "behaviour); cache: freed blocks of 32 MiB or more kept for reuse (limit "
             f"{CACHE_LIMIT_MB} MiB). Alternating in one process, each timed call after an untimed one of its variant.",
             "Smaller blocks are served by glibc's heap in both variants (its mmap and trim thresholds raised "
             "by moeforge.runtime.tune_allocator)."]
    summary = {f"speedup {r['case']} ({r['shape']})": r["speedup"] for r in rows}
    write_results("allocator", "Caching CPU allocator vs torch's own: large blocks reused", rows, notes, summary)


if __name__ == "__main__":
    main()
