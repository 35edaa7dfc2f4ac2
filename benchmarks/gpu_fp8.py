"""FP8 blockwise GEMM on one CUDA GPU (H200/H100): TFLOP/s of our Triton kernel vs bf16 matmul.

NOT RUN YET: written in a session without a GPU. Run it on the GPU machine with

    pip install triton   # if the CUDA torch build lacks it
    python benchmarks/gpu_fp8.py

Shapes: 4096^3, and DeepSeek-V3 expert GEMMs (dim 7168, moe_inter 2048) with 4096 tokens
per expert: up/gate ``[4096, 7168] x [2048, 7168]^T`` and down ``[4096, 2048] x [7168, 2048]^T``,
plus a Dgrad-shaped and a Wgrad-shaped call (128x1 re-tiled operands). For each it times
``kernels.blockwise_gemm`` on pre-quantized operands, the quantization itself, and bf16
``torch.matmul`` on the same shapes, checks calc_diff against the bf16 product (< 1e-3),
and writes benchmarks/results/fp8_gpu.{json,md}.
"""

from __future__ import annotations

import torch

from moeforge.bench import write_results
from moeforge.fp8 import calc_diff
from moeforge.fp8 import kernels


def cuda_time(fn, repeat: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1e3


def case(name: str, m: int, n: int, k: int, a_block=(1, 128), b_block=(128, 128)) -> dict:
    """C[m, n] = A[m, k] @ B[n, k].T; a 128x1 block means the operand is stored [k, m] and
    re-tiled along k (Wgrad), as in Fp8Linear."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

    def quant(x, block):
        if block == (128, 1):  # quantize the [k, rows] storage along k, view as [rows, k]
            return kernels.quantize(x.t().contiguous(), (128, 1)).t()
        return kernels.quantize(x, block)

    qa, qb = quant(a, a_block), quant(b, b_block)
    flops = 2 * m * n * k
    t_fp8 = cuda_time(lambda: kernels.blockwise_gemm(qa, qb, out_dtype=torch.bfloat16))
    t_bf16 = cuda_time(lambda: a @ b.t())
    t_quant = cuda_time(lambda: (quant(a, a_block), quant(b, b_block)))
    diff = calc_diff(kernels.blockwise_gemm(qa, qb, out_dtype=torch.float32), (a.float() @ b.float().t()))
    return {"gemm": name, "M": m, "N": n, "K": k, "fp8 TFLOP/s": flops / t_fp8 / 1e12,
            "bf16 TFLOP/s": flops / t_bf16 / 1e12, "fp8/bf16 speed": t_bf16 / t_fp8,
            "quantize ms": t_quant * 1e3, "calc_diff vs bf16": diff, "ok": diff < 1e-3}


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    rows = [
        case("square fprop", 4096, 4096, 4096),
        case("V3 expert up/gate fprop", 4096, 2048, 7168),
        case("V3 expert down fprop", 4096, 7168, 2048),
        case("V3 expert up dgrad", 4096, 7168, 2048, (1, 128), (128, 128)),
        case("V3 expert up wgrad", 2048, 7168, 4096, (128, 1), (128, 1)),
    ]
    for r in rows:
        print(r, flush=True)
    write_results("fp8_gpu", f"FP8 blockwise GEMM (Triton) vs bf16 matmul on {torch.cuda.get_device_name()}", rows,
                  notes=["Triton kernel: fixed 128x128 output tiles, K step 128 with FP32 promotion per step; "
                         "untuned (no TMA, no warp specialisation, no persistent scheduling)."])


if __name__ == "__main__":
    main()
