"""The GPU benchmarks in one file: FP8 blockwise GEMMs, the training step, transformers.

NOT RUN ON A GPU YET: written in sessions without one. On the GPU machine (its image has
torch with CUDA, Triton and transformers; nothing to install) from the project root:

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_fp8.py --out "$OUT"

A few minutes. Four tables, each as JSON + markdown in ``--out`` (default
benchmarks/results/):

- ``gpu_gemm``: our Triton blockwise FP8 GEMM (1x128 / 128x128 E4M3 operands, FP32
  promotion every 128 of K) against bf16 ``torch.matmul`` on the same shapes: 4096^3,
  DeepSeek-V3's expert GEMMs (dim 7168, expert width 2048, 4096 tokens per expert) as
  Fprop, Dgrad and Wgrad (128x1 re-tiled operands), with the quantization's own time and
  calc_diff against the FP32 product (< 1e-3).
- ``gpu_step``: the trainer's step (``moeforge.bench.train_step``: forward, backward,
  AdamW) on the ``small`` preset at a GPU-sized batch, BF16 and FP8 interleaved: tokens/s,
  the FP8 / BF16 time ratio (issue 4's end-to-end figure), MFU against the 8192^3 bf16
  matmul rate measured in the same run, peak memory.
- ``gpu_hf``: the same step against transformers' ``DeepseekV3ForCausalLM`` (bf16 autocast,
  SDPA) on the identical config and batch, as ``bench_hf.py`` does on CPU.
- ``gpu_moe``: one MoE layer's forward + backward, our grouped dispatch against the
  per-expert loop, as ``bench_moe.py`` does on CPU (issue 9's ">= 2x" and "nearly flat in
  the number of experts" at fixed active parameters), at GPU-sized widths: on the CPU
  both are bound by the same GEMMs, on a GPU the loop pays a launch train and a host
  synchronisation per expert, which is what grouping removes.

``--device cpu --quick`` runs every code path at toy sizes on the CPU (the emulated FP8
path instead of Triton); ``tests/test_bench.py`` does, so a first GPU session does not
lose its minutes to a typo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moeforge.bench import RESULTS_DIR, interleaved, synced, train_step, write_results
from moeforge.config import load_config
from moeforge.fp8 import calc_diff
from moeforge.fp8.config import Fp8Config
from moeforge.fp8.linear import Fp8Ops
from moeforge.train.metrics import train_flops_per_token


def seconds(fn, repeat: int) -> float:
    """Mean seconds of ``fn`` (already synced) over ``repeat`` calls after two warm-ups."""
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def matmul_tflops(device: torch.device, n: int, repeat: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / seconds(synced(lambda: a @ a, device), repeat) / 1e12


# ----------------------------------------------------------------------------- GEMMs
def gemm_case(ops: Fp8Ops, device: torch.device, name: str, m: int, n: int, k: int, a_tile: str = "row",
              b_tile: str = "block", repeat: int = 20) -> dict:
    """C[m, n] = A[m, k] @ B[n, k].T. A 'col' tile means the operand is stored [k, rows]
    and quantized along k in 128x1 tiles (the Wgrad operands), as Fp8Linear does."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16)

    def quant(x, tile):
        return ops.quantize(x.t().contiguous(), tile).t() if tile == "col" else ops.quantize(x, tile)

    qa, qb = quant(a, a_tile), quant(b, b_tile)
    flops = 2 * m * n * k
    t_fp8 = seconds(synced(lambda: ops.gemm(qa, qb, torch.bfloat16), device), repeat)
    t_bf16 = seconds(synced(lambda: a @ b.t(), device), repeat)
    t_quant = seconds(synced(lambda: (quant(a, a_tile), quant(b, b_tile)), device), repeat)
    diff = calc_diff(ops.gemm(qa, qb, torch.float32), a.float() @ b.float().t())
    return {"gemm": name, "M": m, "N": n, "K": k, "fp8 TFLOP/s": flops / t_fp8 / 1e12,
            "bf16 TFLOP/s": flops / t_bf16 / 1e12, "fp8/bf16 speed": t_bf16 / t_fp8,
            "quantize ms": t_quant * 1e3, "calc_diff vs fp32": diff, "ok": diff < 1e-3}


def gemm_rows(device: torch.device, quick: bool) -> list[dict]:
    ops = Fp8Ops.for_device(Fp8Config(), device)
    d, f, t = (256, 128, 256) if quick else (7168, 2048, 4096)  # model dim, expert width, tokens per expert
    sq, rep = (256, 2) if quick else (4096, 20)
    return [gemm_case(ops, device, "square fprop", sq, sq, sq, repeat=rep),
            gemm_case(ops, device, "V3 expert up/gate fprop", t, f, d, repeat=rep),
            gemm_case(ops, device, "V3 expert down fprop", t, d, f, repeat=rep),
            gemm_case(ops, device, "V3 expert up dgrad", t, d, f, "row", "block", repeat=rep),
            gemm_case(ops, device, "V3 expert up wgrad", f, d, t, "col", "col", repeat=rep)]


# ----------------------------------------------------------------------------- training step
def step_rows(device: torch.device, quick: bool) -> tuple[list[dict], dict]:
    """BF16 and FP8 steps of one config, interleaved; MFU against the bf16 matmul rate."""
    preset, batch, seq = ("tiny", 2, 64) if quick else ("small", 32, 512)
    over = {"train.progress": False, "train.micro_batch_size": batch, "train.seq_len": seq}
    base = load_config(preset, {**over, "fp8.enabled": False})
    tokens = torch.randint(0, base.model.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    steps, peaks = {}, {}
    for name in ("bf16", "fp8"):
        cfg = load_config(preset, {**over, "fp8.enabled": name == "fp8"})
        step, _, _ = train_step(cfg, tokens, device)
        steps[name] = synced(step, device)
        resting = 0
        if device.type == "cuda":  # the other variant's model stays resident: count from here
            torch.cuda.reset_peak_memory_stats(device)
            resting = torch.cuda.memory_allocated(device)
        for _ in range(2 if quick else 3):  # warm-up: Triton compiles, cuBLAS picks kernels
            steps[name]()
        peaks[name] = ((torch.cuda.max_memory_allocated(device) - resting) / 2**20 if device.type == "cuda"
                       else float("nan"))
    t = interleaved(steps, repeat=2 if quick else 10)
    peak = matmul_tflops(device, 256 if quick else 8192, 2 if quick else 10) * 1e12
    fpt = train_flops_per_token(base.model, seq)
    rows = [{"variant": n, "step_ms": t[n] * 1e3, "tokens_per_s": batch * seq / t[n],
             "mfu_vs_bf16_matmul": batch * seq / t[n] * fpt / peak, "time_vs_bf16": t[n] / t["bf16"],
             "step_peak_mb": peaks[n]} for n in steps]
    summary = {"preset": preset, "batch": f"{batch} x {seq}", "bf16_matmul_tflops": peak / 1e12,
               "fp8_step_time_vs_bf16": t["fp8"] / t["bf16"], "mfu_bf16": rows[0]["mfu_vs_bf16_matmul"]}
    return rows, summary


def hf_rows(device: torch.device, quick: bool) -> list[dict]:
    """Ours vs transformers on the identical config and batch, bf16 (bench_hf.py's measure)."""
    from bench_hf import measure  # benchmarks/ is on sys.path when run as a script

    over = {"model.mtp_depth": 0, **({"model.n_layers": 2, "model.vocab_size": 1024} if quick else {})}
    batch, seq = (2, 64) if quick else (16, 512)
    return [measure(load_config("small", over), batch, seq, "bf16", 2 if quick else 10, device)]


def moe_rows(device: torch.device, quick: bool) -> tuple[list[dict], dict]:
    """bench_moe's grouped-vs-loop pair at every expert count, activated parameters fixed."""
    from bench_moe import fwd_bwd, make_moe, per_expert_loop  # benchmarks/ is on sys.path

    dim, inter, topk, tokens = (256, 128, 4, 1024) if quick else (2048, 512, 4, 16384)
    x = torch.randn(tokens // 512, 512, dim, device=device, dtype=torch.bfloat16)
    rows = []
    for e in ([8, 32] if quick else [8, 32, 64, 128, 256]):
        moe = make_moe(e, topk, dim, inter, groups=4).to(device)
        with torch.no_grad():  # the same layer both ways, or the timing compares nothing
            torch.testing.assert_close(moe(x).float(), per_expert_loop(moe, x).float(), atol=2e-2, rtol=2e-2)
        t = interleaved({"grouped": synced(fwd_bwd(moe, moe, x), device),
                         "loop": synced(fwd_bwd(lambda z, m=moe: per_expert_loop(m, z), moe, x), device)},
                        repeat=2 if quick else 10)
        rows.append({"experts": e, "top_k": topk, "tokens": tokens, "grouped_ms": t["grouped"] * 1e3,
                     "loop_ms": t["loop"] * 1e3, "speedup": t["loop"] / t["grouped"]})
        del moe
    for r in rows:
        r["grouped_vs_fewest"] = r["grouped_ms"] / rows[0]["grouped_ms"]
    at32 = next(r for r in rows if r["experts"] == 32)
    summary = {"grouped_speedup_vs_loop_at_32_experts": at32["speedup"], "target": ">= 2x",
               "grouped_time_ratio_most_vs_fewest_experts": rows[-1]["grouped_vs_fewest"]}
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (a smoke test of every code path)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON + markdown go")
    ap.add_argument("--skip", nargs="*", default=[], choices=("gemm", "step", "hf", "moe"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: run on the GPU machine, or pass --device cpu --quick for a smoke test")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    torch.manual_seed(0)
    if "gemm" not in args.skip:
        rows = gemm_rows(device, args.quick)
        write_results("gpu_gemm", f"FP8 blockwise GEMM vs bf16 matmul on {where}", rows, out_dir=args.out,
                      notes=["Triton kernel: fixed 128x128 output tiles, K step 128 with FP32 promotion per step; "
                             "untuned (no TMA, no warp specialisation, no persistent scheduling)."])
        for r in rows:
            print(r, flush=True)
    if "step" not in args.skip:
        rows, summary = step_rows(device, args.quick)
        write_results("gpu_step", f"Training step, BF16 vs FP8, on {where}", rows, summary=summary, out_dir=args.out,
                      notes=["The trainer's step (forward, backward, AdamW, FP32 master weights), interleaved; "
                             "MFU = model FLOP/s (MLA + activated MoE, fwd + bwd) / the bf16 matmul rate "
                             "measured in this run. step_peak_mb: the CUDA allocator's peak during the warm-up "
                             "steps above what was allocated before them (the model, its optimizer state and "
                             "the other variant stay resident)."])
        print(summary, flush=True)
    if "hf" not in args.skip:
        try:
            rows = hf_rows(device, args.quick)
        except ImportError as e:  # transformers is optional
            print(f"[gpu] transformers comparison skipped: {e}")
        else:
            write_results("gpu_hf", f"Training throughput vs transformers DeepseekV3ForCausalLM on {where}", rows,
                          out_dir=args.out, summary={"speedup_bf16": rows[0]["speedup"], "target": ">= 3x"})
            print(rows[0], flush=True)
    if "moe" not in args.skip:
        rows, summary = moe_rows(device, args.quick)
        write_results("gpu_moe", f"MoE layer: grouped dispatch vs per-expert loop on {where}", rows,
                      summary=summary, out_dir=args.out,
                      notes=["One MoE layer (1 shared expert, top-4 routing, bf16 compute, FP32 master weights), "
                             "forward + backward, each call from fresh bf16 weight casts; the loop is "
                             "bench_moe.py's (a mask, a gather, three GEMMs and an index_add per expert)."])
        print(summary, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
