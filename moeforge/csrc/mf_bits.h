/* Bit-level float helpers and a vectorizable exp, shared by moeforge's C kernels
 * (moeforge/native.py builds every kernel with this directory on the include path and
 * this file in the build key). */
#ifndef MF_BITS_H
#define MF_BITS_H
#include <stdint.h>
#include <string.h>

static inline float f32_of_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t bits_of_f32(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline float bf16_value(uint16_t h) { return f32_of_bits((uint32_t)h << 16); }

/* FP32 -> bf16, round to nearest even (torch's rounding); NaN stays a quiet NaN. Branch-free. */
static inline uint16_t bf16_round(float f) {
    uint32_t b = bits_of_f32(f);
    uint32_t is_nan = -(uint32_t)((b & 0x7FFFFFFFu) > 0x7F800000u);
    uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return (uint16_t)((r & ~is_nan) | (((b >> 16) | 0x40u) & is_nan));
}

/* exp(x) for x <= 0 (arguments are z - max): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2].
 * Below -87.3 the result is flushed to 0 (softmax weights under 1e-38). Branch-free, with
 * its selects written as bit masks: GCC keeps a loop with ?: on floats scalar for AVX2
 * (AVX-512's mask registers hide that). */
static inline float exp_nonpos(float x) {
    const uint32_t under = -(uint32_t)(x < -87.3f);
    float xc = f32_of_bits((bits_of_f32(x) & ~under) | (bits_of_f32(-87.3f) & under));
    float n = __builtin_rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float two_n = f32_of_bits((uint32_t)((int32_t)n + 127) << 23);
    return f32_of_bits(bits_of_f32(p * two_n) & ~under);
}
#endif
