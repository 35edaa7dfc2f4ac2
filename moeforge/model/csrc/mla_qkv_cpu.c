/* MLA's per-head q, k, v for attention, built in one pass (bf16), and its backward.
 *
 * Why: the up-projections give q_lin [B, S, H, nope + rope] and kv_lin [B, S, H, nope + v]
 * and the rope key k_pe [B, S, rope] (shared by all heads). Attention wants [B, H, S, D]
 * with the rope part rotated, the key's rope part broadcast over heads and V zero-padded
 * to D (CPU's fused SDPA wants equal head dims). In torch that is the rotary embedding
 * (about nine elementwise passes in FP32), two concatenations, a pad and the transposes'
 * copies, forward and again in the recomputing backward, plus their backward: ~5% of a
 * small-preset bf16 step. Here each output row is written once from its inputs.
 *
 * Rotation of pair (x0, x1) = (x[2i], x[2i+1]) at position s, angle a = theta_i * s:
 *   (x0 cos a - x1 sin a, x0 sin a + x1 cos a), in FP32 from bf16, rounded once to bf16:
 * the same operations in the same order as moeforge.model.layers.Rotary (compiled with
 * -ffp-contract=off), so the forward is bit-identical to the torch path. Backward applies
 * the inverse rotation (g0 cos + g1 sin, -g0 sin + g1 cos) to the output gradient; the
 * rope key's gradient sums its heads' gradients in FP32 first.
 */
#include <stdint.h>

#include "mf_bits.h"

typedef struct {
    int64_t B, S, H, nope, rope, vdim, D, Dv, ld_kpe;
} mla_shape;

/* pair (x0, x1) rotated by the angle with cosine c and sine s, each result rounded once */
static inline void rotate(float x0, float x1, float c, float s, uint16_t *out) {
    out[0] = bf16_round(x0 * c - x1 * s);
    out[1] = bf16_round(x0 * s + x1 * c);
}

/* the inverse rotation (the transpose), for gradients */
static inline void unrotate(float g0, float g1, float c, float s, uint16_t *out) {
    out[0] = bf16_round(g0 * c + g1 * s);
    out[1] = bf16_round(g1 * c - g0 * s);
}

/* q_lin [B,S,H,nope+rope], kv_lin [B,S,H,nope+vdim] contiguous; kpe rows of length rope
 * with row stride ld_kpe; cos, sin [S, rope/2] FP32; q, k [B,H,S,D], v [B,H,S,Dv] out. */
void mf_mla_qkv_fwd(const uint16_t *q_lin, const uint16_t *kv_lin, const uint16_t *kpe, const float *cos,
                    const float *sin, const mla_shape *sh, uint16_t *q, uint16_t *k, uint16_t *v, int nthreads) {
    const int64_t S = sh->S, H = sh->H, nope = sh->nope, rope = sh->rope, vdim = sh->vdim, half = rope / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bs = 0; bs < sh->B * S; bs++) {
        const float *c = cos + (bs % S) * half, *sn = sin + (bs % S) * half;
        uint16_t krot[512];  /* the rotated rope key, shared by the heads (rope <= 512 checked in Python) */
        const uint16_t *kp = kpe + bs * sh->ld_kpe;
        for (int64_t i = 0; i < half; i++)
            rotate(bf16_value(kp[2 * i]), bf16_value(kp[2 * i + 1]), c[i], sn[i], krot + 2 * i);
        for (int64_t h = 0; h < H; h++) {
            const uint16_t *qi = q_lin + (bs * H + h) * (nope + rope);
            const uint16_t *kvi = kv_lin + (bs * H + h) * (nope + vdim);
            const int64_t o = ((bs / S) * H + h) * S + bs % S; /* row (b, h, s) of the outputs */
            uint16_t *qo = q + o * sh->D, *ko = k + o * sh->D, *vo = v + o * sh->Dv;
            for (int64_t j = 0; j < nope; j++) { qo[j] = qi[j]; ko[j] = kvi[j]; }
            for (int64_t i = 0; i < half; i++)
                rotate(bf16_value(qi[nope + 2 * i]), bf16_value(qi[nope + 2 * i + 1]), c[i], sn[i], qo + nope + 2 * i);
            for (int64_t j = 0; j < rope; j++) ko[nope + j] = krot[j];
            for (int64_t j = 0; j < vdim; j++) vo[j] = kvi[nope + j];
            for (int64_t j = vdim; j < sh->Dv; j++) vo[j] = 0;
        }
    }
}

/* dq, dk [B,H,S,D], dv [B,H,S,Dv] bf16 -> dq_lin [B,S,H,nope+rope], dkv_lin [B,S,H,nope+vdim],
 * dkpe [B,S,rope] (contiguous) bf16. */
void mf_mla_qkv_bwd(const uint16_t *dq, const uint16_t *dk, const uint16_t *dv, const float *cos, const float *sin,
                    const mla_shape *sh, uint16_t *dq_lin, uint16_t *dkv_lin, uint16_t *dkpe, int nthreads) {
    const int64_t S = sh->S, H = sh->H, nope = sh->nope, rope = sh->rope, vdim = sh->vdim;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bs = 0; bs < sh->B * S; bs++) {
        const float *c = cos + (bs % S) * (rope / 2), *sn = sin + (bs % S) * (rope / 2);
        float ksum[512]; /* the rope key's gradient summed over heads */
        for (int64_t j = 0; j < rope; j++) ksum[j] = 0.0f;
        for (int64_t h = 0; h < H; h++) {
            const int64_t o = ((bs / S) * H + h) * S + bs % S;
            const uint16_t *gq = dq + o * sh->D, *gk = dk + o * sh->D, *gv = dv + o * sh->Dv;
            uint16_t *qo = dq_lin + (bs * H + h) * (nope + rope);
            uint16_t *kvo = dkv_lin + (bs * H + h) * (nope + vdim);
            for (int64_t j = 0; j < nope; j++) { qo[j] = gq[j]; kvo[j] = gk[j]; }
            for (int64_t i = 0; i < rope / 2; i++)
                unrotate(bf16_value(gq[nope + 2 * i]), bf16_value(gq[nope + 2 * i + 1]), c[i], sn[i], qo + nope + 2 * i);
            for (int64_t j = 0; j < rope; j++) ksum[j] += bf16_value(gk[nope + j]);
            for (int64_t j = 0; j < vdim; j++) kvo[nope + j] = gv[j];
        }
        for (int64_t i = 0; i < rope / 2; i++)
            unrotate(ksum[2 * i], ksum[2 * i + 1], c[i], sn[i], dkpe + bs * rope + 2 * i);
    }
}
