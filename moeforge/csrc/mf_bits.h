/* Bit-level float helpers shared by moeforge's C kernels (moeforge/native.py builds every
 * kernel with this directory on the include path and this file in the build key). */
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
#endif
