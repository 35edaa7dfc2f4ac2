"""Cost of FP8 training GEMMs on CPU: Fp8Linear vs a BF16 Linear, time and memory saved for backward.

Side by side in one run, timed in alternation (moeforge.bench.interleaved), forward +
backward of one projection with FP32 master weights and bf16 activations:

- ``bf16``: ``moeforge.model.layers.Linear`` (casts the FP32 weight to bf16, one AMX GEMM);
- ``fp8``: ``Fp8Linear`` (online 1x128 / 128x128 / 128x1 quantization, dequantize, AMX GEMM).

Bytes saved for backward are counted with ``torch.autograd.graph.saved_tensors_hooks``,
one count per storage, leaving out Parameters (they live anyway). Targets from issue 4:
time ratio <= 1.3, bytes ratio <= 0.6. The same is done for the routed experts' grouped
GEMM (``grouped_linear`` vs ``Fp8GroupedLinear``).

    .venv/bin/python benchmarks/bench_fp8_cost.py [--repeat 5]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from moeforge.bench import interleaved, write_results
from moeforge.fp8 import Fp8Config, Fp8GroupedLinear, Fp8Linear
from moeforge.model.layers import Linear
from moeforge.model.moe import grouped_linear

CFG = Fp8Config(enabled=True)


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` builds its graph (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def dense_case(tokens: int, d_in: int, d_out: int, repeat: int) -> dict:
    base = Linear(d_in, d_out)
    f8 = Fp8Linear.from_linear(base, CFG)
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, d_out, dtype=torch.bfloat16)
    fns = {name: (lambda m=m: m(x).backward(dy)) for name, m in (("bf16", base), ("fp8", f8))}
    t = interleaved(fns, repeat=repeat)
    b16, b8 = saved_bytes(lambda: base(x)), saved_bytes(lambda: f8(x))
    return {"gemm": f"dense {tokens}x{d_in}->{d_out}", "bf16 ms": t["bf16"] * 1e3, "fp8 ms": t["fp8"] * 1e3,
            "time fp8/bf16": t["fp8"] / t["bf16"], "saved bf16 MB": b16 / 2**20, "saved fp8 MB": b8 / 2**20,
            "bytes fp8/bf16": b8 / b16}


def grouped_case(tokens: int, dim: int, inter: int, experts: int, repeat: int) -> dict:
    w = nn.Parameter(torch.randn(experts, inter, dim) * 0.02)
    counts = [tokens // experts] * experts
    counts[0] += tokens - sum(counts)
    x = torch.randn(tokens, dim, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, inter, dtype=torch.bfloat16)
    f8 = Fp8GroupedLinear(CFG)
    fns = {"bf16": lambda: grouped_linear(x, w, counts).backward(dy), "fp8": lambda: f8(x, w, counts).backward(dy)}
    t = interleaved(fns, repeat=repeat)
    b16, b8 = saved_bytes(lambda: grouped_linear(x, w, counts)), saved_bytes(lambda: f8(x, w, counts))
    return {"gemm": f"grouped {experts}x [{tokens // experts}x{dim}->{inter}]", "bf16 ms": t["bf16"] * 1e3,
            "fp8 ms": t["fp8"] * 1e3, "time fp8/bf16": t["fp8"] / t["bf16"], "saved bf16 MB": b16 / 2**20,
            "saved fp8 MB": b8 / 2**20, "bytes fp8/bf16": b8 / b16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [dense_case(2048, 1024, 1024, args.repeat), dense_case(2048, 1024, 4096, args.repeat),
            dense_case(4096, 2048, 2048, args.repeat), grouped_case(4096, 1024, 512, 8, args.repeat)]
    for r in rows:
        print({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    write_results("fp8_cost", "Fp8Linear vs BF16 Linear on CPU: forward+backward time and bytes saved for backward",
                  rows, notes=[
                      "FP32 master weights, bf16 activations; both sides run the same AMX bf16 GEMMs, FP8 adds "
                      "online quantization (amax, divide, clamp, cast) and dequantization around each of the three "
                      "GEMMs: on CPU FP8 is a memory format, not a speed-up (the speed-up needs FP8 tensor cores).",
                      "Saved bytes: FP8 keeps x (1 B/elt + one fp32 scale per 128) and the FP8 weight copy; "
                      "BF16 keeps x (2 B/elt) and the bf16 weight copy. Parameters are not counted."])


if __name__ == "__main__":
    main()
