"""FP8 GEMM numerics: blockwise (1x128 x 128x128) vs per-tensor scaling against the exact product.

Metric: DeepGEMM's ``calc_diff = 1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64 against the
float64 product of the unquantized operands; DeepGEMM's bar for FP8 is < 1e-3.

Cases (M = N = 512, K = 2048 unless noted): Gaussian operands; "a few channels 100x (and
1e3, 1e4) larger" in the activations; and the same with the matching weight columns
scaled down by the same factor, so every channel matters to the output (the situation of
massive activations in real models) -- that is where a single per-tensor scale runs out
of E4M3's range. Each GEMM is the exact-per-block reference; the fast paths are shown
equal to it in tests/test_fp8_gemm.py.

    .venv/bin/python benchmarks/bench_fp8_numerics.py
"""

from __future__ import annotations

import torch

from moeforge.bench import write_results
from moeforge.fp8 import blockwise_gemm_reference, calc_diff, quantize

OUTLIER_CHANNELS = [5, 77, 600, 900, 1500, 2000]


def case(factor: float, compensate: bool, m: int = 512, n: int = 512, k: int = 2048) -> dict:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a[:, OUTLIER_CHANNELS] *= factor
    if compensate:
        b[:, OUTLIER_CHANNELS] /= factor
    exact = a.double() @ b.double().t()
    blockwise = blockwise_gemm_reference(quantize(a, (1, 128)), quantize(b, (128, 128)))
    per_tensor = quantize(a, (m, k)).dequantize() @ quantize(b, (n, k)).dequantize().t()
    cb, ct = calc_diff(blockwise, exact), calc_diff(per_tensor, exact)
    name = "random" if factor == 1 else f"{len(OUTLIER_CHANNELS)} channels x{factor:g}"
    return {"case": name + (", weight cols /factor" if compensate else ""),
            "calc_diff blockwise": cb, "calc_diff per-tensor": ct, "per-tensor / blockwise": ct / cb,
            "blockwise < 1e-3": cb < 1e-3}


def main() -> None:
    rows = [case(1, False)]
    for factor in (1e2, 1e3, 1e4):
        rows.append(case(factor, False))
    for factor in (1e2, 1e3, 1e4, 1e5):
        rows.append(case(factor, True))
    for r in rows:
        print({k: (f"{v:.3e}" if isinstance(v, float) else v) for k, v in r.items()})
    write_results("fp8_numerics", "Blockwise vs per-tensor FP8 GEMM (calc_diff vs exact product, M=N=512, K=2048)",
                  rows, notes=[
                      "E4M3 is a float format: a 100x outlier costs per-tensor scaling only ~1.7x in calc_diff, "
                      "because the small values stay inside E4M3's 2^-9..448 range; once the spread exceeds that "
                      "range (1e4-1e5 with weights compensating) per-tensor collapses (24x worse at 1e5) while blockwise "
                      "degrades far less: only the 1x128 tiles that hold an outlier channel lose their small values.",
                      "per-tensor = the same quantizer with one tile covering the whole tensor."])


if __name__ == "__main__":
    main()
