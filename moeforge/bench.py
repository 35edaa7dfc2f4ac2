"""Benchmark helpers and `moeforge bench`: timing, peak GEMM rate, JSON + markdown results.

Choices:
- Every claim is a ratio measured side by side in one process: this machine is shared
  and noisy, so absolute seconds mean little. Candidates are timed *interleaved*
  (A, B, A, B, ...) and the median of each is reported, so a burst of load from
  elsewhere hits both sides.
- Results go to ``benchmarks/results/<name>.json`` (machine-readable, with the torch
  version and thread count) and ``<name>.md`` (a table for people).
- Importing this module applies :func:`moeforge.runtime.tune_allocator`, as the CLI does,
  so scripts in ``benchmarks/`` time the same process settings as training.
- The benchmark scripts live in ``benchmarks/`` at the project root; ``moeforge bench``
  runs them by name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from moeforge.runtime import tune_allocator

tune_allocator()  # benchmarks measure what the trainer runs with (the CLI does the same)

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"

# The FP8 storage variants the memory and cost benchmarks compare, as config overrides:
# BF16; FP8 as by default (V3's recipe, but for an E4M3 copy of the MLPs' SwiGLU output);
# fp8n = with fp8.cache_norm_inputs (the residual stream at the norms and MLA's latents in
# E4M3 too, beyond V3); fp8lean = that and fp8.recompute_swiglu_output (the copy dropped).
# All in bf16 whatever the CPU: what they compare is what bf16 training saves.
_BF16 = {"train.dtype": "bf16", "fp8.cpu_gemm_dtype": "bf16"}
FP8_STORAGE_VARIANTS = {
    "bf16": {**_BF16, "fp8.enabled": False},
    "fp8": {**_BF16, "fp8.enabled": True},
    "fp8n": {**_BF16, "fp8.enabled": True, "fp8.cache_norm_inputs": True},
    "fp8lean": {**_BF16, "fp8.enabled": True, "fp8.cache_norm_inputs": True, "fp8.recompute_swiglu_output": True},
}


def interleaved(fns: dict[str, Callable[[], object]], repeat: int = 5, warmup: int = 1,
                samples: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (every sample into
    ``samples`` when given)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if samples is not None:
        samples.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak_flops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeat: int = 5) -> float:
    """Measured FLOP/s of a square GEMM: the practical ceiling for utilisation figures."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = interleaved({"mm": lambda: a @ b}, repeat=repeat, warmup=2)["mm"]
    return 2 * n**3 / t


def machine_peak_flops(dtype: torch.dtype = torch.bfloat16) -> tuple[float, int]:
    """The best square-GEMM rate over 1..N threads (N = torch's current count) and the
    thread count that reached it. Why not just N: on some hosts of this project the two
    vCPUs were hyperthreads sharing one AMX unit, and a bf16 GEMM ran ~1.3x *faster* on
    one thread (~945 vs ~720 GFLOP/s), so the N-thread figure would flatter utilisation.
    The host is shared and erratic: session 4 measured 777-1992 GFLOP/s at two threads and
    865 at one within a day, so MFU figures carry that uncertainty; ratios measured side by
    side do not."""
    n = torch.get_num_threads()
    best = (0.0, n)
    try:
        for t in range(1, n + 1):
            torch.set_num_threads(t)
            best = max(best, (matmul_peak_flops(dtype), t))
    finally:
        torch.set_num_threads(n)
    return best


def synced(fn: Callable[[], object], device: torch.device | str) -> Callable[[], None]:
    """``fn`` followed by a synchronisation of ``device`` when it is a GPU, so that timing
    it (``interleaved``) measures the work, not its launch."""
    device = torch.device(device)

    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def train_step(cfg, tokens: torch.Tensor, device: torch.device | str = "cpu"):
    """The trainer's step for ``cfg`` on one batch: ``build_model`` as the trainer builds
    it, ``lm_loss``, backward, moeforge's AdamW. Returns (step, loss_fn, model); ``step``
    frees the gradients after the update, so several variants can share one process."""
    from moeforge.train.losses import lm_loss
    from moeforge.train.optim import AdamW
    from moeforge.train.pretrain import build_model

    model = build_model(cfg, torch.device(device))
    opt = AdamW.from_config(model, cfg.train)
    tokens = tokens.to(device)

    def loss():
        return lm_loss(model(tokens[:, :-1], labels=tokens[:, 1:]), tokens[:, 1:], cfg.model)["loss"]

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad()

    return step, loss, model


def cpu_name() -> str:
    """The CPU's model name and its matrix/bf16 features, e.g. ``AMD EPYC (avx512_bf16)``.

    Part of every result: this project's hosts change between sessions (Intel with AMX,
    AMD without), and a ratio that holds on one can miss on the other, because AMX speeds
    up the bf16 GEMMs ~4x but not the vector code around them."""
    from moeforge.native import cpu_id

    lines = cpu_id().splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    feats = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name} ({', '.join(feats) or 'no bf16 matrix instructions'})"


def cpu_class() -> str:
    """The CPU class results belong to: "bf16-capable" (a bf16 GEMM at least as fast as fp32:
    AVX512-BF16, AMX) or "AVX2 class" (no fast bf16 GEMM; the compute dtype is fp32), as
    ``moeforge.precision`` decides it; the ISA cap is named when one is set."""
    from moeforge.precision import ISA_SWITCHES, machine_choice

    name = "bf16-capable" if machine_choice("cpu").name == "bf16" else "AVX2 class"
    cap = " ".join(f"{k}={os.environ[k]}" for k in ISA_SWITCHES if os.environ.get(k))
    return f"{name} ({cap})" if cap else name


def class_suffix() -> str:
    """Result file suffix of this CPU class: "" for bf16-capable CPUs, "_avx2" otherwise, so
    that each class keeps its own results."""
    return "" if cpu_class().startswith("bf16") else "_avx2"


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_class": cpu_class(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(name: str, title: str, rows: list[dict], notes: list[str] | None = None,
                  summary: dict | None = None, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Save rows (a list of flat dicts) as JSON and a markdown table (a column per key any
    row has; blank where a row lacks it)."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "title": title, "environment": environment(), "summary": summary or {},
               "rows": rows, "notes": notes or []}
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2) + "\n")
    env = payload["environment"]
    lines = [f"# {title}", "", f"torch {torch.__version__}, {env['threads']} threads, {env['cpu']}, "
             f"CPU class: {env['cpu_class']}, {env['time']}", ""]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, first seen first
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    if summary:
        lines += ["", "**Summary**", ""] + [f"- {k}: {_fmt(v)}" for k, v in summary.items()]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def cli(argv: list[str]) -> int:
    from moeforge.errors import UserError

    parser = argparse.ArgumentParser(prog="moeforge bench", description="run benchmarks (ratios measured side by side)")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(available())}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    names = args.names or available()
    for name in names:
        if not (BENCH_DIR / f"bench_{name}.py").is_file():
            raise UserError(f"no benchmark named {name!r} (have: {', '.join(available())})")
    failed = []
    for name in names:
        path = BENCH_DIR / f"bench_{name}.py"
        print(f"== {name}", flush=True)
        old = sys.argv
        sys.argv = [str(path)] + (["--quick"] if args.quick else [])
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as e:  # a script's sys.exit(main()) or argparse error: report it, run the others
            if e.code not in (None, 0):
                failed.append(name)
        finally:
            sys.argv = old
    if failed:
        print(f"[moeforge bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
