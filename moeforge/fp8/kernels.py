"""Triton kernels for CUDA: blockwise E4M3 quantization and the blockwise-scaled FP8 GEMM.

Imported lazily (only when a CUDA tensor meets ``fp8.backend`` auto/triton), so the package
works without triton. Same conventions and signatures as the CPU path in ``quant.py`` and
``gemm.py``; tests compare them under ``TRITON_INTERPRET=1`` on small shapes.

Choices:

- Quantization: one kernel for ``1 x BC`` tiles (each program takes ``ROWS`` rows of one
  column tile, one amax per row) and one for ``BR x BC`` blocks (one amax per program).
  The 128x1 Wgrad re-tiling is the row kernel run on the transposed *view*: strides do the
  transpose, and the output lands directly in the ``[C, T]`` layout Wgrad consumes.
- GEMM ``C = A @ B.T``: each program owns a ``BM x BN`` output tile and walks K in steps of
  exactly one scale tile (128). Every step's ``tl.dot`` on E4M3 operands is multiplied by
  ``s_a[:, None] * s_b[None, :]`` and added to an FP32 register accumulator, which *is*
  the promotion to FP32 every N_C = 128 (the tensor core's limited accumulator never sees
  more than one K block). A and B may each carry 1x128 or 128x128 scales (``A_BR`` /
  ``B_BR`` rows per scale), which covers Fprop, Dgrad and Wgrad with one kernel.
- Not tuned: fixed BM = BN = 128, no TMA, no warp specialisation. It is correct and uses
  the FP8 tensor cores; DeepGEMM-class speed is future work (see ``benchmarks/gpu_fp8.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeforge.fp8.quant import DEFAULT_EPS, E4M3, E4M3_MAX, Fp8Tensor


@triton.jit
def _round_e4m3(v):
    """Round fp32 ``v`` (already within +-448) to the nearest E4M3 value, ties to even, in
    fp32. The cast that follows is then exact. Why not let the cast round: Triton's CPU
    interpreter gets the carry into the next binade wrong (124.3 -> 64 instead of 128), and
    doing it here makes GPU, interpreter and the torch path agree bit for bit."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6) - 3  # 3 mantissa bits; subnormals share the 2^-9 step
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return ((v / ulp + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2^23: fp32 adds round to even


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, R, C, sxr, sxc, sqr, sqc, ssr, ssc, eps,
                       ROWS: tl.constexpr, BC: tl.constexpr, POW2: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), eps) / 448.0
    if POW2:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    q = _round_e4m3(tl.minimum(tl.maximum(x / s[:, None], -448.0), 448.0))
    tl.store(q_ptr + rows[:, None] * sqr + cols[None, :] * sqc, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * ssr + tl.program_id(1) * ssc, s, mask=rows < R)


@triton.jit
def _quant_block_kernel(x_ptr, q_ptr, s_ptr, R, C, sxe, sxr, sxc, sqe, sqr, sqc, sse, ssr, ssc, eps,
                        BR: tl.constexpr, BC: tl.constexpr, POW2: tl.constexpr):
    e = tl.program_id(2)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + e * sxe + rows[:, None] * sxr + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), eps) / 448.0
    if POW2:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    q = _round_e4m3(tl.minimum(tl.maximum(x / s, -448.0), 448.0))
    tl.store(q_ptr + e * sqe + rows[:, None] * sqr + cols[None, :] * sqc, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + e * sse + tl.program_id(0) * ssr + tl.program_id(1) * ssc, s)


def quantize(x: torch.Tensor, block: tuple[int, int] = (1, 128), *, eps: float = DEFAULT_EPS,
             power_of_2: bool = False, rows_per_program: int = 32) -> Fp8Tensor:
    """Triton twin of :func:`moeforge.fp8.quant.quantize` for 2-D (or, with square blocks,
    3-D batched) tensors."""
    br, bc = block
    if br != 1 and bc == 1:  # 128x1: the row kernel on the transposed view
        return quantize(x.transpose(-2, -1), (1, br), eps=eps, power_of_2=power_of_2,
                        rows_per_program=rows_per_program).t()
    r, c = x.shape[-2:]
    if br == 1:
        if x.dim() != 2:
            x = x.reshape(-1, c)
            r = x.shape[0]
        q = torch.empty(r, c, dtype=E4M3, device=x.device)
        s = torch.empty(r, triton.cdiv(c, bc), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(r, rows_per_program), triton.cdiv(c, bc))
        _quant_rows_kernel[grid](x, q, s, r, c, *x.stride(), *q.stride(), *s.stride(), eps,
                                 ROWS=rows_per_program, BC=bc, POW2=power_of_2)
        return Fp8Tensor(q, s, block)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    q = torch.empty(x3.shape, dtype=E4M3, device=x.device)
    s = torch.empty(x3.shape[0], triton.cdiv(r, br), triton.cdiv(c, bc), dtype=torch.float32, device=x.device)
    grid = (s.shape[1], s.shape[2], x3.shape[0])
    _quant_block_kernel[grid](x3, q, s, r, c, *x3.stride(), *q.stride(), *s.stride(), eps,
                              BR=br, BC=bc, POW2=power_of_2)
    if x.dim() == 2:
        q, s = q[0], s[0]
    return Fp8Tensor(q, s, block)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K,
                 sam, sak, sbn, sbk, scm, scn, ssam, ssak, ssbn, ssbk,
                 A_BR: tl.constexpr, B_BR: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        k = kb * BK + rk
        a = tl.load(a_ptr + rm[:, None] * sam + k[None, :] * sak, mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * sbk + rn[None, :] * sbn, mask=(k[:, None] < K) & (rn[None, :] < N), other=0.0)
        sa = tl.load(sa_ptr + (rm // A_BR) * ssam + kb * ssak, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + (rn // B_BR) * ssbn + kb * ssbk, mask=rn < N, other=0.0)
        # promotion: this K block's product leaves the tensor core and is scaled into FP32
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty), mask=mask)


def blockwise_gemm(a: Fp8Tensor, b: Fp8Tensor, *, out_dtype: torch.dtype = torch.float32,
                   block_m: int = 128, block_n: int = 128) -> torch.Tensor:
    """``A @ B.T`` on E4M3 operands tiled 128 wide along K (1x128 or 128x128 scales)."""
    (m, k), n = a.shape, b.shape[0]
    bk = a.block[1]
    if b.shape[1] != k or b.block[1] != bk:
        raise ValueError(f"blockwise GEMM operands disagree along K: {a.shape}/{a.block} vs {b.shape}/{b.block}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.data.device)
    if m == 0 or n == 0:
        return c
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gemm_kernel[grid](a.data, b.data, c, a.scale, b.scale, m, n, k,
                       *a.data.stride(), *b.data.stride(), *c.stride(), *a.scale.stride(), *b.scale.stride(),
                       A_BR=a.block[0], B_BR=b.block[0], BM=block_m, BN=block_n, BK=bk)
    return c


__all__ = ["E4M3_MAX", "blockwise_gemm", "quantize"]
