/* Fused softmax cross-entropy over rows of logits, gradient written in place.
 *
 * Why C: the torch version of moeforge/model/head_loss.py runs about eight passes over
 * each [rows, vocab] chunk (upcast, max, exp-sum, gather, subtract, exp, scatter, scale,
 * downcast), which on the small preset cost more than the head GEMMs themselves. Here a
 * row is read once into an FP32 buffer that stays in L1/L2, and written back once.
 *
 * Per row t (V logits z, label y, scale = 1/denom or 0 for ignored rows):
 *   m = max z;  e_i = exp(z_i - m);  s = sum e_i;  lse = m + log s
 *   loss[t] = lse - z_y (0 when ignored)
 *   grad    = (e_i / s - [i == y]) * scale      written over z, in z's dtype
 * The exponential is our own vectorizable FP32 exp (mf_bits.h: 2^n times a degree-7
 * polynomial, relative error ~2e-7) because libm's expf does not vectorize without -ffast-math;
 * reductions use `omp simd` so GCC may reorder them. Results therefore differ from the
 * torch path in the last bits; the tests compare both with an FP64 reference.
 * Logits are fp32 (xtype 0) or bf16 (xtype 1); bf16 is written back round-to-nearest-even.
 * Rows are split over OpenMP threads; each thread has one FP32 row buffer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mf_bits.h"

static void row(void *z, int xtype, int64_t V, int64_t label, float scale, int need_grad,
                float *buf, float *loss) {
    if (xtype == 1) {
        const uint16_t *h = (const uint16_t *)z;
        for (int64_t i = 0; i < V; i++) buf[i] = bf16_value(h[i]);
    } else {
        memcpy(buf, z, (size_t)V * sizeof(float));
    }
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < V; i++) m = buf[i] > m ? buf[i] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < V; i++) {
        float e = exp_nonpos(buf[i] - m);
        buf[i] = e;
        s += e;
    }
    int valid = label >= 0 && label < V;
    float lse = m + logf(s);
    if (valid) {
        float zy = xtype == 1 ? bf16_value(((const uint16_t *)z)[label]) : ((const float *)z)[label];
        *loss = lse - zy;
    } else {
        *loss = 0.0f;
    }
    if (!need_grad) return;
    float k = valid ? scale / s : 0.0f;
    if (valid) buf[label] -= s;  /* (e_y - s) * k = (p_y - 1) * scale */
    if (xtype == 1) {
        uint16_t *h = (uint16_t *)z;
        for (int64_t i = 0; i < V; i++) h[i] = bf16_round(buf[i] * k);
    } else {
        float *f = (float *)z;
        for (int64_t i = 0; i < V; i++) f[i] = buf[i] * k;
    }
}

/* logits [T, V] row-major (modified in place when need_grad), labels [T] int64 (any value
 * outside [0, V) is ignored), loss [T] out. Returns 0, or -1 when out of memory. */
int mf_softmax_xent(void *logits, int xtype, int64_t T, int64_t V, const int64_t *labels, float scale,
                    int need_grad, float *loss, int nthreads) {
    int failed = 0;
    size_t esize = xtype == 1 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc((size_t)V * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (buf == NULL) {  /* every thread must reach the worksharing loop */
#pragma omp atomic write
                failed = 1;
                continue;
            }
            row((char *)logits + (size_t)t * (size_t)V * esize, xtype, V, labels[t], scale, need_grad, buf, &loss[t]);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
