"""One training step of the real model: utilisation, torch.compile, FP8 and memory.

For a preset (``small`` by default, ``tiny`` with --quick) this times the trainer's own
step (``build_model`` as the trainer builds it, ``lm_loss``, backward, moeforge's AdamW)
side by side, interleaved, in several variants of this CPU's compute dtype D (what
``train.dtype = "auto"`` picks: bf16 on a bf16-capable CPU, fp32 on an AVX2-class one):

  D             FP32 master weights, D compute (the default recipe here)
  fp32          FP32 everything (when D is bf16)
  fp8           D + fine-grained FP8 Linears (emulated blockwise GEMMs in D on CPU)
  D+compile     torch.compile of the model (CPU inductor)
  D+ckpt        activation checkpointing per block

It reports tokens/s, model FLOP/s (counted analytically for MLA and the activated MoE
parameters, forward + backward, ``train.metrics.train_flops_per_token``) divided by the
D GEMM peak measured in the same run (MFU), and the bytes saved for backward per step
(activation memory, measured with saved-tensor hooks; parameters excluded) and the peak
memory of a step: each variant runs alone in a fresh process (``--peak-of``); after a
first step (which creates the optimizer state) the kernel's peak-RSS mark is reset and
the rise of the resident set during the second step is reported: activations,
gradients and every temporary (RSS because the CPU allocator keeps no statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from moeforge.bench import (FP8_STORAGE_VARIANTS, class_suffix, interleaved, machine_peak_flops, train_step,
                            write_results)
from moeforge.config import load_config
from moeforge.model import weight_cache
from moeforge.precision import DTYPES, machine_choice
from moeforge.train.metrics import train_flops_per_token

BASE = machine_choice("cpu").name  # D: "bf16" on a bf16-capable CPU, else "fp32"
_D = {"train.dtype": BASE, "fp8.cpu_gemm_dtype": BASE}
VARIANTS = {
    BASE: _D,
    **({"fp32": {"train.dtype": "fp32"}} if BASE != "fp32" else {}),
    "fp8": {**_D, "fp8.enabled": True},
    f"{BASE}+compile": {**_D, "train.compile": True},
    f"{BASE}+ckpt": {**_D, "train.activation_checkpointing": True},
    "fp8+ckpt": {**_D, "fp8.enabled": True, "train.activation_checkpointing": True},
    # FP8 with both opt-in storage switches (the residual stream and MLA latents in E4M3, the
    # MLPs' SwiGLU output rebuilt): does the smaller saved set lower the step's peak too?
    "fp8lean": {**FP8_STORAGE_VARIANTS["fp8lean"], **_D},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_of(preset: str, name: str) -> None:
    """Child process: build the variant, run a step, then print how far the resident set
    rises above its level between steps during a second one (the kernel's VmHWM, reset)."""
    import ctypes

    from moeforge.runtime import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    # the opposite of the trainer's tune_allocator: every block of 64 KiB or more is its own
    # mapping, returned to the kernel when freed, so the resident set follows live memory
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt(M_MMAP_THRESHOLD, 1 << 16)
    mallopt(M_TRIM_THRESHOLD, 0)
    cfg = load_config(preset, {"fp8.enabled": False, "train.progress": False, **VARIANTS[name]})
    b, s = cfg.train.micro_batch_size, cfg.train.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    step, _, _ = train_step(cfg, tokens)
    step()  # first step: lazily created optimizer state, oneDNN kernels
    before = _rss_mb()
    with open("/proc/self/clear_refs", "w") as f:  # reset the kernel's peak-RSS mark (VmHWM) to now
        f.write("5")
    step()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
    print(json.dumps({"peak_step_mb": peak - before, "weight_forms_mb": weight_cache.cached_bytes() / 2**20}))


def measure_peak(preset: str, name: str) -> dict[str, float]:
    # without the caching allocator too: its freed blocks stay resident, so the resident set
    # would not follow live memory (see peak_of)
    out = subprocess.run([sys.executable, __file__, "--preset", preset, "--peak-of", name],
                         capture_output=True, text=True, check=True, env={**os.environ, "MOEFORGE_CPU_CACHE": "0"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def saved_bytes(loss_fn, model) -> int:
    """Bytes autograd keeps for backward, each storage once, the FP32 master weights excluded."""
    seen = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return total


PROBE, PROBE_N, PROBE_REPEAT = "gemm peak probe", 2048, 3
# warm-up steps per variant (full, --quick): the trainer's steady state. The C heap keeps
# growing for the first ~10 steps of a process (freed blocks do not fit the next step's
# requests until enough have accumulated); while it grows, new pages fault in, measured
# at 30-100k minor faults and ~0.1-0.3 s of system time per small-preset step, none after.
WARMUP = {False: 4, True: 2}
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm")


def gemm_share(step) -> float:
    """Fraction of one step's operator time (torch.profiler, self time) spent in GEMMs.
    MFU / this share is the utilisation the step would reach if everything that is not a
    GEMM took no time: the ceiling that faster non-GEMM code can approach."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def peak_probe(threads: int):
    """The square GEMM in D the peak is defined by, timed in the same alternation as the
    steps: the host's speed drifts by tens of percent within minutes, and a peak measured
    once, before or after, made MFU move with it."""
    a = torch.randn(PROBE_N, PROBE_N, dtype=DTYPES[BASE])

    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(PROBE_REPEAT):
                a @ a
        finally:
            torch.set_num_threads(n)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--name", default=None, help="results file stem (default step_PRESET; use another one for a "
                                                   "run of some variants that should not replace the full table)")
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # internal: one variant's peak memory
    args = ap.parse_args()
    preset = args.preset or ("tiny" if args.quick else "small")
    if args.peak_of:
        return peak_of(preset, args.peak_of)
    base = load_config(preset, {"fp8.enabled": False, "train.progress": False})
    b, s = base.train.micro_batch_size, base.train.seq_len
    tokens = torch.randint(0, base.model.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    peaks = {name: measure_peak(preset, name) for name in args.variants}  # before this process grows
    steps, losses, mems = {}, {}, {}
    for name in args.variants:
        cfg = load_config(preset, {"fp8.enabled": False, "train.progress": False, **VARIANTS[name]})
        steps[name], loss_fn, model = train_step(cfg, tokens)
        mems[name] = saved_bytes(loss_fn, model)
        for _ in range(WARMUP[args.quick]):  # compile, oneDNN kernels, the C heap (see WARMUP)
            steps[name]()
    shares = {name: gemm_share(steps[name]) for name in args.variants if "compile" not in name}
    _, peak_threads = machine_peak_flops(DTYPES[BASE])  # which thread count reaches the peak
    samples: dict[str, list[float]] = {}
    t = interleaved({**steps, PROBE: peak_probe(peak_threads)}, repeat=3 if args.quick else 5, samples=samples)
    peak = 2 * PROBE_N**3 * PROBE_REPEAT / t.pop(PROBE)
    # the fastest probe of the run: under co-tenant load the probe slowed 2.8-3.7x where the
    # step slowed 1.6x, so the median-based MFU overstated utilisation; against the best
    # rate seen it cannot be flattered by a slow probe
    best_peak = 2 * PROBE_N**3 * PROBE_REPEAT / min(samples[PROBE])
    fpt = train_flops_per_token(base.model, s)
    rows = []
    for name in args.variants:
        tok_s = b * s / t[name]
        rows.append({"variant": name, "step_s": t[name], "tokens_per_s": tok_s, "model_tflops": tok_s * fpt / 1e12,
                     f"mfu_vs_{BASE}_peak": tok_s * fpt / peak, "saved_for_backward_mb": mems[name] / 2**20,
                     "peak_step_mb": peaks[name]["peak_step_mb"], "weight_forms_mb": peaks[name]["weight_forms_mb"],
                     f"time_vs_{BASE}": t[name] / t[BASE] if BASE in t else float("nan"),
                     "gemm_share": shares.get(name, float("nan"))})
    summary = {"preset": preset, "compute_dtype": BASE, f"{BASE}_gemm_peak_gflops": peak / 1e9,
               "peak_threads": peak_threads, "best_probe_gflops": best_peak / 1e9, "flops_per_token": fpt,
               **{f"mfu_{r['variant']}": r[f"mfu_vs_{BASE}_peak"] for r in rows}}
    if BASE in t:
        summary[f"mfu_{BASE}_vs_best_probe"] = b * s / t[BASE] * fpt / best_peak
    if BASE in shares:
        summary[f"mfu_{BASE}_if_only_gemms_took_time"] = summary[f"mfu_{BASE}"] / shares[BASE]
    for name in (v for v in ("fp8", "fp8lean") if v in mems and BASE in mems):
        summary[f"{name}_saved_bytes_vs_{BASE}"] = mems[name] / mems[BASE]
        summary[f"{name}_peak_step_vs_{BASE}"] = peaks[name]["peak_step_mb"] / peaks[BASE]["peak_step_mb"]
        summary[f"{name}_time_vs_{BASE}"] = t[name] / t[BASE]
    notes = [f"{preset} preset, micro-batch {b} x {s} tokens, forward + backward + AdamW step on CPU, "
             f"{torch.get_num_threads()} threads; MFU = model FLOP/s / the {BASE} GEMM rate (2048^3) at the best "
             f"of 1..{torch.get_num_threads()} threads ({peak_threads}; on hosts whose two vCPUs are hyperthreads "
             f"of one core, one thread is faster), that GEMM timed in alternation with the steps.",
             "saved_for_backward counts tensors autograd keeps between forward and backward (activations).",
             f"best_probe_gflops: the fastest of the run's probes; mfu_{BASE}_vs_best_probe divides by it (a "
             "host under load slows the probe more than the step, which inflates the median-based MFU).",
             "gemm_share: the fraction of one step's operator self time (torch.profiler) spent in GEMM ops; MFU / "
             "gemm_share is the utilisation if all other work took no time, i.e. the ceiling for speeding up "
             "the non-GEMM part (the GEMMs themselves run below the square-GEMM peak at the model's shapes).",
             "peak_step_mb: how far the resident set rises during a training step above its level between steps "
             "(each variant alone in a fresh process, the second step, peak-RSS mark reset, allocations of 64 KiB "
             "and more unmapped when freed): activations, gradients and temporaries.",
             "weight_forms_mb: the weights' compute-dtype casts / FP8 quantizations kept between steps "
             "(model/weight_cache.py: made once per optimizer step instead of twice per step; persistent, so not "
             "in peak_step_mb)."]
    write_results(args.name or f"step_{preset}{class_suffix()}", f"Training step on the {preset} preset: MFU, compile, FP8, memory",
                  rows, notes, summary)
    for r in rows:
        print(f"{r['variant']:>13}: {r['tokens_per_s']:8.0f} tok/s  MFU {100 * r[f'mfu_vs_{BASE}_peak']:5.1f}%  "
              f"x{r[f'time_vs_{BASE}']:.2f} vs {BASE}  saved {r['saved_for_backward_mb']:.0f} MB")


if __name__ == "__main__":
    main()
