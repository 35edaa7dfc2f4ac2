/* RMSNorm forward and backward over bf16 rows, one pass each.
 *
 * Why C: the torch path (moeforge/model/recompute.py) runs six elementwise passes in the
 * forward (upcast, square, mean, rsqrt, two products, downcast) and about twelve in the
 * backward, each a full read and write of a [tokens, dim] tensor; on the small preset the
 * norms (with their rebuilds in backward) took ~8% of a training step. Here a row is read
 * once, kept in FP32 registers/L1, and written once.
 *
 * Forward, per row of x (D values, bf16) with FP32 weight w:
 *   r = 1 / sqrt(sum(x^2) / D + eps);   y = bf16(x * r * w)   (products in that order, as torch)
 * Backward, with dy (bf16) and the saved r:
 *   u = dy * w;  c = sum(u * x) * r^3 / D;  dx = bf16(u * r - x * c)
 *   dw += dy * (x * r)        summed over rows: per-thread FP32 partials, added in thread order
 * Sums are FP32 with `omp simd` reductions, so results differ from torch's in the last
 * bits (tests compare both with an FP64 reference); for a fixed thread count they are
 * deterministic. x rows may be strided (a latent sliced out of a wider projection).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "mf_bits.h"

/* x [N, D] rows x_stride apart, w [D], y [N, D] contiguous, rstd [N]. */
void mf_rmsnorm_fwd(const uint16_t *x, int64_t x_stride, const float *w, uint16_t *y, float *rstd,
                    int64_t N, int64_t D, float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *xr = x + n * x_stride;
        uint16_t *yr = y + n * D;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < D; i++) {
            float v = bf16_value(xr[i]);
            ss += v * v;
        }
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        rstd[n] = r;
#pragma omp simd
        for (int64_t i = 0; i < D; i++) yr[i] = bf16_round(bf16_value(xr[i]) * r * w[i]);
    }
}

/* dy [N, D] contiguous; dx [N, D] contiguous out; dw [D] out (overwritten), or NULL.
 * Returns 0, or -1 when the per-thread partials could not be allocated. */
int mf_rmsnorm_bwd(const uint16_t *x, int64_t x_stride, const float *w, const uint16_t *dy, const float *rstd,
                   uint16_t *dx, float *dw, int64_t N, int64_t D, int nthreads) {
    float *part = NULL;
    if (dw != NULL) {
        part = (float *)calloc((size_t)nthreads * (size_t)D, sizeof(float));
        if (part == NULL) return -1;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num();
        float *acc = part == NULL ? NULL : part + (size_t)t * (size_t)D;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint16_t *xr = x + n * x_stride, *gr = dy + n * D;
            uint16_t *dr = dx + n * D;
            float r = rstd[n], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < D; i++) dot += bf16_value(gr[i]) * w[i] * bf16_value(xr[i]);
            float c = dot * r * r * r / (float)D;
#pragma omp simd
            for (int64_t i = 0; i < D; i++) {
                float xv = bf16_value(xr[i]), g = bf16_value(gr[i]);
                dr[i] = bf16_round(g * w[i] * r - xv * c);
            }
            if (acc != NULL) {
#pragma omp simd
                for (int64_t i = 0; i < D; i++) acc[i] += bf16_value(gr[i]) * (bf16_value(xr[i]) * r);
            }
        }
    }
    if (dw != NULL) {
        for (int64_t i = 0; i < D; i++) dw[i] = 0.0f;
        for (int t = 0; t < nthreads; t++)
            for (int64_t i = 0; i < D; i++) dw[i] += part[(size_t)t * (size_t)D + i];
        free(part);
    }
    return 0;
}
