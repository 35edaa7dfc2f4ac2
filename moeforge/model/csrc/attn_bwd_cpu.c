/* Causal attention backward on CPU: the softmax part between the GEMMs, in one pass.
 *
 * Why: torch's CPU flash-attention backward ran at ~60 GFLOP/s on the small preset's
 * shapes (64 heads of 256 x 256, head dim 96), ~11% of a bf16 step. At these lengths the
 * probabilities fit in memory, so attention_kernel.py computes the backward as five
 * batched GEMMs on the AMX/MKL units and leaves this kernel only the elementwise work in
 * between, which eager torch spread over ~8 passes over [heads, S, S] FP32 tensors:
 *
 *   p[i, j]  = exp(s[i, j] * scale - lse[i])        for j <= i, else 0
 *   ds[i, j] = p[i, j] * (dp[i, j] - dsum[i]) * scale
 *
 * with s = q k^T and dp = do v^T in FP32, lse the forward's log-sum-exp and dsum[i] =
 * <do_i, o_i>. Without a dsum (NULL) the row computes it as sum_j p[i, j] dp[i, j], the
 * same number (o_i = sum_j p[i, j] v_j, so <do_i, o_i> = sum_j p[i, j] <do_i, v_j>) without
 * the forward's output, which then need not be kept for backward; the row's p waits in a
 * buffer between the two sweeps. Both outputs are rounded once to bf16 (the operands of
 * the dV, dQ and dK GEMMs). exp is exp_nonpos (mf_bits.h): arguments are <= 0 up to
 * rounding. Rows above the diagonal are written as zeros without computing anything.
 */
#include <stdint.h>

#include "mf_bits.h"

/* s, dp [N, S, S] FP32 contiguous; lse [N, S], dsum [N, S] or NULL FP32; p, ds [N, S, S]
 * bf16 out. Query i sees keys j <= i (causal self-attention). S <= MF_ATTN_MAX_S. */
#define MF_ATTN_MAX_S 512

void mf_attn_probs_bwd(const float *s, const float *dp, const float *lse, const float *dsum, int64_t N, int64_t S,
                       float scale, uint16_t *p, uint16_t *ds, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < N * S; r++) {
        const int64_t end = r % S + 1, o = r * S;
        const float l = lse[r];
        float pb[MF_ATTN_MAX_S], d = 0.0f;
#pragma omp simd reduction(+ : d)
        for (int64_t j = 0; j < end; j++) {
            pb[j] = exp_nonpos(s[o + j] * scale - l);
            d += pb[j] * dp[o + j];
        }
        if (dsum)
            d = dsum[r];
#pragma omp simd
        for (int64_t j = 0; j < end; j++) {
            p[o + j] = bf16_round(pb[j]);
            ds[o + j] = bf16_round(pb[j] * (dp[o + j] - d) * scale);
        }
        for (int64_t j = end; j < S; j++) { p[o + j] = 0; ds[o + j] = 0; }
    }
}
