/* Blockwise E4M3 quantize / dequantize for the CPU emulation of FP8 training.
 *
 * Why C: in eager PyTorch each quantization is five to eight passes over the tensor
 * (copy to FP32, |x|, tile amax, divide, cast, and on the way back decode, multiply,
 * cast), each ~1 ns per element on this CPU, which together cost as much as the bf16
 * GEMM they feed. Here one pass reads a tile (kept in L1/L2), takes its amax, divides,
 * rounds to E4M3 and, when asked, writes the dequantized operand for the GEMM as well.
 *
 * Bit-for-bit the same numbers as moeforge/fp8/quant.py's torch path (tests compare):
 * - s = max(amax, eps) / 448 in FP32, optionally rounded up to a power of two (exactly,
 *   from the bits);
 * - q = E4M3(x / s): one FP32 division (not a multiply by 1/s), then round to nearest
 *   even, saturating to +-448; NaN stays NaN (0x7F | sign), as c10's cast;
 * - dequantized = value(q) * s rounded once to FP32, then to bf16 round-to-nearest-even.
 * Compiled without -ffast-math and with -ffp-contract=off so no FMA changes a rounding.
 *
 * Layout: x is [B, R, C] row-major; tiles are br x bc over (R, C) (1x128, 128x1 and
 * 128x128 in practice, any sizes work, partial tiles at the edges); scales are
 * [B, ceil(R/br), ceil(C/bc)]. Work is split over bands of br rows across OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *x; int xtype; /* 0 fp32, 1 bf16, 2 E4M3 with scales xscale per xbr x xbc tile */
    const float *xscale; int64_t xbr, xbc;
    int64_t B, R, C, br, bc;
    float eps; int pow2;
    uint8_t *q; float *scale; void *dq; int dqtype; /* -1 none, 0 fp32, 1 bf16 */
    int64_t item0, item1; /* range of (b, band) items for this thread */
} qjob;


#include "mf_bits.h"

/* Selects are written as bit masks or integer min/max: GCC vectorizes those loops for
 * AVX2 as well as AVX-512, but not ones with ?: on floats (AVX-512's mask registers hide
 * that; with AVX2 such a loop stays scalar, measured ~2x slower quantization) or a table
 * lookup. */

#define F32_448 0x43E00000u /* the bits of 448.0f, E4M3's largest finite value */

/* min(|y|, limit) as FP32 bits, for a finite positive limit: for non-negative floats the
 * bit patterns order like the values, so this is an integer min. A NaN y gives the limit
 * (callers handle NaN from y's own bits). */
static inline uint32_t sat_abs_bits(float y, uint32_t limit) {
    uint32_t ab = bits_of_f32(y) & 0x7FFFFFFFu;
    return ab < limit ? ab : limit;
}

/* E4M3 (fn) -> FP32, exact. */
static inline float e4m3_value(uint8_t q) {
    uint32_t mag = q & 0x7Fu;
    uint32_t nrm = (mag << 20) + (120u << 23);                 /* exponent bias 7 -> 127 */
    uint32_t sub = bits_of_f32((float)mag * (1.0f / 512.0f));  /* exponent field 0: m * 2^-9 */
    uint32_t is_nrm = -(uint32_t)((mag >> 3) != 0);
    uint32_t r = (nrm & is_nrm) | (sub & ~is_nrm);
    uint32_t is_nan = -(uint32_t)(mag == 0x7Fu);
    r = (r & ~is_nan) | (0x7FC00000u & is_nan);
    return f32_of_bits(r | ((uint32_t)(q & 0x80u) << 24));
}

/* max |a[i]| over a[0:n] (0 if empty), as an integer max over the bits with the sign
 * cleared: for non-negative floats the bit patterns order like the values, NaNs above
 * inf, so a NaN anywhere yields a NaN (as torch's amax), and an integer max reduction
 * vectorizes without -ffast-math (a float one does not). Needs -fno-strict-aliasing. */
static inline uint32_t max_abs_bits(const float *restrict a, int64_t n) {
    const uint32_t *restrict u = (const uint32_t *)a;
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) { uint32_t v = u[i] & 0x7FFFFFFFu; m = v > m ? v : m; }
    return m;
}

static inline uint16_t bf16_rne(float f) { /* round to nearest even; NaN -> 0x7FC0 */
    uint32_t u = bits_of_f32(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t is_nan = -(uint32_t)(f != f);
    return (uint16_t)((r & ~is_nan) | (0x7FC0u & is_nan));
}

/* FP32 -> E4M3 (fn), round to nearest even, saturating at 448 (c10's arithmetic). */
static inline uint8_t e4m3(float y) {
    uint32_t sign = (bits_of_f32(y) >> 24) & 0x80;
    uint32_t ab = sat_abs_bits(y, F32_448);
    uint32_t is_nan = -(uint32_t)((bits_of_f32(y) & 0x7FFFFFFFu) > 0x7F800000u);
    /* subnormal range (< 2^-6): adding 2^14 leaves exactly the multiples of 2^-9 */
    uint32_t sub = bits_of_f32(f32_of_bits(ab) + 16384.0f) - (141u << 23);
    uint32_t nrm = (ab + ((uint32_t)(7 - 127) << 23) + 0x7FFFF + ((ab >> 20) & 1)) >> 20;
    uint32_t is_sub = -(uint32_t)(ab < (121u << 23));
    uint32_t r = (sub & is_sub) | (nrm & ~is_sub);
    r = (r & ~is_nan) | (0x7Fu & is_nan);
    return (uint8_t)(r | sign);
}

/* The FP32 value of e4m3(y), computed without going through the 8-bit code (same
 * rounding as e4m3(): the kept bits of a normal, or the multiple of 2^-9 of a subnormal) */
static inline float e4m3_round(float y) {
    uint32_t sign = bits_of_f32(y) & 0x80000000u;
    uint32_t is_nan = -(uint32_t)((bits_of_f32(y) & 0x7FFFFFFFu) > 0x7F800000u);
    uint32_t ab = sat_abs_bits(y, F32_448);
    uint32_t sub = bits_of_f32((f32_of_bits(ab) + 16384.0f) - 16384.0f);
    uint32_t nrm = (ab + 0x7FFFFu + ((ab >> 20) & 1u)) & 0xFFF00000u;
    uint32_t is_sub = -(uint32_t)(ab < (121u << 23));
    uint32_t r = (sub & is_sub) | (nrm & ~is_sub);
    r = (r & ~is_nan) | (0x7FC00000u & is_nan);
    return f32_of_bits(r | sign);
}

static inline float make_scale(float amax, float eps, int pow2) {
    float s = (amax > eps ? amax : eps) / 448.0f;
    if (amax != amax) s = amax;
    if (pow2 && s == s && s < INFINITY) {
        uint32_t b = bits_of_f32(s);
        if (b & 0x7FFFFF) s = f32_of_bits(((b >> 23) + 1) << 23); /* next power of two up */
    }
    return s;
}

/* row r of matrix b of x as FP32 into out[0:C]. An E4M3 x (the Wgrad re-tiling) is
 * dequantized exactly as mf_dequantize does to FP32, value(q) * s, so re-tiling in one
 * pass gives the bits of dequantize-then-quantize without the FP32 tensor in between. */
static inline void load_row(const qjob *j, int64_t b, int64_t r, float *restrict out) {
    const int64_t C = j->C, o = (b * j->R + r) * C;
    if (j->xtype == 0) { memcpy(out, (const float *)j->x + o, sizeof(float) * (size_t)C); return; }
    if (j->xtype == 1) {
        const uint16_t *restrict xr = (const uint16_t *)j->x + o;
        for (int64_t c = 0; c < C; c++) out[c] = f32_of_bits((uint32_t)xr[c] << 16);
        return;
    }
    const uint8_t *restrict qr = (const uint8_t *)j->x + o;
    const int64_t nbr = (j->R + j->xbr - 1) / j->xbr, nbc = (C + j->xbc - 1) / j->xbc;
    const float *sr = j->xscale + (b * nbr + r / j->xbr) * nbc;
    for (int64_t t = 0; t < nbc; t++) {
        const int64_t c0 = t * j->xbc, c1 = c0 + j->xbc < C ? c0 + j->xbc : C;
        const float st = sr[t];
        for (int64_t c = c0; c < c1; c++) out[c] = e4m3_value(qr[c]) * st;
    }
}

/* q = E4M3(xf / s) for one row (s per column), and the dequantized row if asked. The
 * general path: any input, NaN and inf included. */
static inline void quant_row(const float *restrict xf, const float *restrict s, int64_t C,
                             uint8_t *restrict q, void *dq, int dqtype) {
    if (dqtype == 0) { /* one loop each, rounding y once more in FP32 rather than decoding q */
        float *restrict d = (float *)dq;
        for (int64_t c = 0; c < C; c++) { float y = xf[c] / s[c]; q[c] = e4m3(y); d[c] = e4m3_round(y) * s[c]; }
    } else if (dqtype == 1) {
        uint16_t *restrict d = (uint16_t *)dq;
        for (int64_t c = 0; c < C; c++) { float y = xf[c] / s[c]; q[c] = e4m3(y); d[c] = bf16_rne(e4m3_round(y) * s[c]); }
    } else {
        for (int64_t c = 0; c < C; c++) q[c] = e4m3(xf[c] / s[c]);
    }
}

/* Whether a row's scales allow quant_row_fast: every s in [2^-60, 2^60] (so the row's
 * amaxes, hence all its values, are finite, 1/s is normal and the division's residuals
 * below stay normal); NaN fails both comparisons. */
static inline int fast_scales(const float *restrict s, int64_t n) {
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= (s[i] >= 0x1p-60f) & (s[i] <= 0x1p60f);
    return ok;
}

/* The same bits as quant_row for a finite row whose scales pass fast_scales, writing the
 * dequantized row too in 0.73-0.90x the time (interleaved A/B, one thread; for the codes
 * alone it is no faster, so those keep quant_row):
 * - y = RN(x / s) without a division per element: y0 = x * (1/s) is
 *   within 1.5 ulp of x/s; one FMA correction makes it faithful, a second one (Markstein)
 *   correctly rounded, as both residuals x - y*s are exact FMAs that stay normal;
 * - E4M3 code and its FP32 value from one rounding: normal magnitudes keep 3 mantissa
 *   bits (round to nearest even on the bits), subnormal ones (< 2^-6) are multiples of
 *   2^-9, which adding 2^14 leaves exactly (the code is then the bits above 2^14's);
 * - no NaN/inf handling (none can occur: |y| <= 448 up to one rounding); the sign comes
 *   from x, since s > 0 (y's sign is lost for x = -0 by the corrections). */
static inline uint8_t e4m3_fast(float x, float r, float sc, float *value) {
    float y = x * r;
    y = __builtin_fmaf(__builtin_fmaf(-y, sc, x), r, y);
    y = __builtin_fmaf(__builtin_fmaf(-y, sc, x), r, y);
    const uint32_t ab = sat_abs_bits(y, F32_448), sgn = bits_of_f32(x) & 0x80000000u;
    const float t = f32_of_bits(ab) + 16384.0f;
    const uint32_t is_sub = -(uint32_t)(ab < (121u << 23));
    const uint32_t rn = (ab + 0x7FFFFu + ((ab >> 20) & 1u)) & 0xFFF00000u;
    const uint32_t code = (((rn >> 20) - (120u << 3)) & ~is_sub) | ((bits_of_f32(t) - (141u << 23)) & is_sub);
    *value = f32_of_bits((rn & ~is_sub) | (bits_of_f32(t - 16384.0f) & is_sub) | sgn);
    return (uint8_t)(code | (sgn >> 24));
}

static inline void quant_row_fast(const float *restrict xf, const float *restrict s, const float *restrict inv,
                                  int64_t C, uint8_t *restrict q, void *dq, int dqtype) {
    float v;
    if (dqtype == 0) {
        float *restrict d = (float *)dq;
        for (int64_t c = 0; c < C; c++) { q[c] = e4m3_fast(xf[c], inv[c], s[c], &v); d[c] = v * s[c]; }
    } else if (dqtype == 1) {
        uint16_t *restrict d = (uint16_t *)dq;
        for (int64_t c = 0; c < C; c++) {
            q[c] = e4m3_fast(xf[c], inv[c], s[c], &v);
            const uint32_t b = bits_of_f32(v * s[c]); /* finite: bf16 round to nearest even on the bits */
            d[c] = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
        }
    } else {
        for (int64_t c = 0; c < C; c++) q[c] = e4m3_fast(xf[c], inv[c], s[c], &v);
    }
}

static inline void *dq_at(const qjob *j, int64_t o) {
    if (j->dqtype < 0) return NULL;
    return (char *)j->dq + o * (j->dqtype == 0 ? 4 : 2);
}

/* Spread a row of tile scales srow[0:nbc] over the columns: s[c] and inv[c] = 1 / s[c]
 * (one division per tile). Returns whether quant_row_fast may run with them. */
static inline int spread_scales(const float *srow, int64_t nbc, int64_t bc, int64_t C, float *restrict s,
                                float *restrict inv) {
    for (int64_t t = 0; t < nbc; t++) {
        const int64_t c0 = t * bc, c1 = c0 + bc < C ? c0 + bc : C;
        const float st = srow[t], it = 1.0f / st;
        for (int64_t c = c0; c < c1; c++) { s[c] = st; inv[c] = it; }
    }
    return fast_scales(srow, nbc);
}

static inline void quant_any(int fast, const float *restrict xf, const float *restrict s, const float *restrict inv,
                             int64_t C, uint8_t *restrict q, void *dq, int dqtype) {
    if (fast && dqtype >= 0) quant_row_fast(xf, s, inv, C, q, dq, dqtype); /* codes only: no faster */
    else quant_row(xf, s, C, q, dq, dqtype);
}

#define BAND_BYTES (4 << 20) /* 128 rows of up to 8192 FP32 columns: within L2 for the usual widths */

static void quant_items(const qjob *j) {
    const int64_t R = j->R, C = j->C, br = j->br, bc = j->bc;
    const int64_t nbr = (R + br - 1) / br, nbc = (C + bc - 1) / bc;
    float *xf = malloc(sizeof(float) * (size_t)C);     /* the current row in FP32 */
    float *colmax = malloc(sizeof(float) * (size_t)C); /* per column: amax over the band */
    float *s = malloc(sizeof(float) * (size_t)C);      /* per column: its tile's scale */
    float *inv = malloc(sizeof(float) * (size_t)C);    /* per column: 1 / its tile's scale */
    /* a band of rows in FP32 (br > 1 only; up to BAND_BYTES, else rows are converted twice) */
    float *rows = br > 1 && br * C * 4 <= BAND_BYTES ? malloc(sizeof(float) * (size_t)(br * C)) : NULL;
    for (int64_t it = j->item0; it < j->item1; it++) {
        const int64_t b = it / nbr, band = it % nbr;
        const int64_t r0 = band * br, r1 = r0 + br < R ? r0 + br : R;
        const int64_t base = b * R * C;
        float *srow = j->scale + (b * nbr + band) * nbc;
        if (br == 1) { /* 1 x bc tiles: one row, read once into xf */
            load_row(j, b, r0, xf);
            for (int64_t t = 0; t < nbc; t++) {
                const int64_t c0 = t * bc, c1 = c0 + bc < C ? c0 + bc : C;
                srow[t] = make_scale(f32_of_bits(max_abs_bits(xf + c0, c1 - c0)), j->eps, j->pow2);
            }
            const int fast = spread_scales(srow, nbc, bc, C, s, inv);
            quant_any(fast, xf, s, inv, C, j->q + base + r0 * C, dq_at(j, base + r0 * C), j->dqtype);
            continue;
        }
        /* br x bc tiles: amax per column over the band's rows (as bits), then per tile. The
         * band's rows are converted to FP32 once, into `rows` (the quantizing pass reads
         * them from there: for an E4M3 input that conversion is a decode and a multiply) */
        uint32_t *restrict cm = (uint32_t *)colmax;
        for (int64_t c = 0; c < C; c++) cm[c] = 0;
        for (int64_t r = r0; r < r1; r++) {
            float *row = rows ? rows + (r - r0) * C : xf;
            load_row(j, b, r, row);
            const uint32_t *restrict u = (const uint32_t *)row;
            for (int64_t c = 0; c < C; c++) { uint32_t v = u[c] & 0x7FFFFFFFu; cm[c] = v > cm[c] ? v : cm[c]; }
        }
        for (int64_t t = 0; t < nbc; t++) {
            const int64_t c0 = t * bc, c1 = c0 + bc < C ? c0 + bc : C;
            srow[t] = make_scale(f32_of_bits(max_abs_bits(colmax + c0, c1 - c0)), j->eps, j->pow2);
        }
        const int fast = spread_scales(srow, nbc, bc, C, s, inv);
        for (int64_t r = r0; r < r1; r++) {
            const float *row = rows ? rows + (r - r0) * C : xf;
            if (!rows) load_row(j, b, r, xf);
            quant_any(fast, row, s, inv, C, j->q + base + r * C, dq_at(j, base + r * C), j->dqtype);
        }
    }
    free(xf);
    free(colmax);
    free(s);
    free(inv);
    free(rows);
}

typedef struct {
    const uint8_t *q; const float *scale;
    int64_t B, R, C, br, bc;
    void *out; int outtype;
    int64_t item0, item1; /* range of (b, row) items */
} djob;

static void dequant_items(const djob *j) {
    const int64_t R = j->R, C = j->C, nbr = (R + j->br - 1) / j->br, nbc = (C + j->bc - 1) / j->bc;
    float *s = malloc(sizeof(float) * (size_t)C);
    int64_t last = -1;
    for (int64_t it = j->item0; it < j->item1; it++) {
        const int64_t b = it / R, r = it % R, band = b * nbr + r / j->br;
        if (band != last) { /* per column: its tile's scale (no division per element) */
            for (int64_t t = 0; t < nbc; t++) {
                const int64_t c0 = t * j->bc, c1 = c0 + j->bc < C ? c0 + j->bc : C;
                const float st = j->scale[band * nbc + t];
                for (int64_t c = c0; c < c1; c++) s[c] = st;
            }
            last = band;
        }
        const uint8_t *qr = j->q + it * C;
        if (j->outtype == 0) {
            float *d = (float *)j->out + it * C;
            for (int64_t c = 0; c < C; c++) d[c] = e4m3_value(qr[c]) * s[c];
        } else {
            uint16_t *d = (uint16_t *)j->out + it * C;
            for (int64_t c = 0; c < C; c++) d[c] = bf16_rne(e4m3_value(qr[c]) * s[c]);
        }
    }
    free(s);
}

#define MAX_THREADS 64

/* Work split: contiguous item ranges over OpenMP threads. The library links libgomp.so.1,
 * which is the very runtime torch's CPU wheel loads, so these are torch's own (already
 * spinning) worker threads: pthreads of our own would compete with them for the cores. */
int mf_quantize(const void *x, int xtype, const float *xscale, int64_t xbr, int64_t xbc, int64_t B, int64_t R,
                int64_t C, int64_t br, int64_t bc, float eps, int pow2, uint8_t *q, float *scale, void *dq,
                int dqtype, int nthreads) {
    const int64_t items = B * ((R + br - 1) / br);
    if (items == 0 || C == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((int64_t)nthreads > items) nthreads = (int)items;
    if (B * R * C < (1 << 16)) nthreads = 1; /* too little work to share */
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
        qjob j = {x, xtype, xscale, xbr, xbc, B, R, C, br, bc, eps, pow2, q, scale, dq, dqtype,
                  items * t / nthreads, items * (t + 1) / nthreads};
        quant_items(&j);
    }
    return 0;
}

int mf_dequantize(const uint8_t *q, const float *scale, int64_t B, int64_t R, int64_t C, int64_t br,
                  int64_t bc, void *out, int outtype, int nthreads) {
    const int64_t items = B * R;
    if (items == 0 || C == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((int64_t)nthreads > items) nthreads = (int)items;
    if (B * R * C < (1 << 16)) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) {
        djob j = {q, scale, B, R, C, br, bc, out, outtype, items * t / nthreads, items * (t + 1) / nthreads};
        dequant_items(&j);
    }
    return 0;
}
