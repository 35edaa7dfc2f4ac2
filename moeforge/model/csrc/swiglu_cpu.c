/* The routed experts' SwiGLU elementwise work in one pass each way (bf16 rows).
 *
 * Why C: in moeforge/model/expert_ffn.py the backward around the down projection's Dgrad
 * g = dout W2 ran about ten torch passes over [rows, inter] tensors (silu(a), h = silu(a) b,
 * two FP32 upcasts and a product for the routing weight's gradient, g * gate, dh * b,
 * silu_backward, dh * silu(a)): ~10% of a small-preset step. Here each row is read once.
 *
 * Layout: a and b are the two halves of one row of ab = x [W1; W3]^T ([N, 2D], the fused
 * gate/up GEMM's output), and da, db the two halves of dab, which feeds the fused Dgrad and
 * Wgrad GEMMs as it is.
 *
 * Forward:  h = silu(a) * b
 * Backward, per row n with routing weight t = gate[n] (given as bf16, as the torch path
 * rounds it) and s = sigmoid(a):
 *   h      = silu(a) * b                      (recomputed, V3 TR 3.3.2; for W2's Wgrad)
 *   dgate  = sum_i g_i h_i                    (FP32; <dout, W2 h> = <dout W2, h>)
 *   dh     = g * t
 *   da     = dh * b * s * (1 + a (1 - s))     (d silu(a) / da = s (1 + a (1 - s)))
 *   db     = dh * silu(a)
 * All math in FP32 from the bf16 inputs, each output rounded once (the torch path rounds
 * silu(a), h and dh to bf16 on the way, so results agree to bf16 rounding, not bit for
 * bit; tests compare both with an FP64 reference). sigmoid uses exp of -|a| only, so it
 * never overflows: s = 1 / (1 + e) for a >= 0, e / (1 + e) otherwise, e = exp(-|a|).
 */
#include <math.h>
#include <stdint.h>

#include "mf_bits.h"

static inline float sigmoid(float a) {
    float e = exp_nonpos(-fabsf(a));
    float r = 1.0f / (1.0f + e);
    const uint32_t neg = -(uint32_t)(a < 0.0f); /* a mask, not ?: on floats: vectorizes for AVX2 too */
    return f32_of_bits((bits_of_f32(r) & ~neg) | (bits_of_f32(e * r) & neg));
}

/* ab [N, 2D], h [N, D] contiguous bf16. */
void mf_swiglu_fwd(const uint16_t *ab, uint16_t *h, int64_t N, int64_t D, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *ar = ab + 2 * n * D, *br = ar + D;
        uint16_t *hr = h + n * D;
#pragma omp simd
        for (int64_t i = 0; i < D; i++) {
            float av = bf16_value(ar[i]);
            hr[i] = bf16_round(av * sigmoid(av) * bf16_value(br[i]));
        }
    }
}

/* ab [N, 2D], g [N, D] contiguous bf16; gate [N] bf16; h [N, D] and dab [N, 2D] bf16 out;
 * dgate [N] FP32 out, or NULL when not needed. */
void mf_swiglu_bwd(const uint16_t *ab, const uint16_t *g, const uint16_t *gate, uint16_t *h, float *dgate,
                   uint16_t *dab, int64_t N, int64_t D, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        size_t o = (size_t)n * (size_t)D;
        const uint16_t *a = ab + 2 * o, *b = a + D;
        uint16_t *da = dab + 2 * o, *db = da + D;
        float t = bf16_value(gate[n]), dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; i++) {
            float av = bf16_value(a[i]), bv = bf16_value(b[i]), gv = bf16_value(g[o + i]);
            float s = sigmoid(av), silu = av * s;
            uint16_t hb = bf16_round(silu * bv);
            h[o + i] = hb;
            dot += gv * bf16_value(hb);
            float dh = gv * t;
            da[i] = bf16_round(dh * bv * s * (1.0f + av * (1.0f - s)));
            db[i] = bf16_round(dh * silu);
        }
        if (dgate != NULL) dgate[n] = dot;
    }
}
