/* Re-blocking rows grouped by expert: block i of the source has counts[i] rows, block i of
 * the destination padded[i]; it keeps the block's first min(counts[i], padded[i]) rows
 * and zero-fills the rest. Why C, and the torch reference: moeforge/model/rows_kernel.py.
 * Output rows are split over the threads; only memcpy / memset, so any dtype works (rows
 * are `row_bytes` wide). With `index` set the source rows are read through it (kept row j
 * of block b is src[index[src_off[b] + j]]): the dispatch gather and the padding in one
 * pass.
 */
#include <stdint.h>
#include <string.h>

/* the block holding destination row r: the largest b with dst_off[b] <= r */
static int64_t block_of(const int64_t *dst_off, int64_t nblocks, int64_t r) {
    int64_t lo = 0, hi = nblocks - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (dst_off[mid] <= r)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

void mf_repad_rows(const char *src, char *dst, const int64_t *counts, const int64_t *padded,
                   const int64_t *src_off, const int64_t *dst_off, const int64_t *index, int64_t nblocks,
                   int64_t total, int64_t row_bytes, int nthreads) {
    int64_t chunk = (64 << 10) / row_bytes; /* ~64 KiB of output per task */
    if (chunk < 1)
        chunk = 1;
    int64_t ntasks = (total + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < ntasks; t++) {
        int64_t r = t * chunk, r1 = r + chunk < total ? r + chunk : total;
        for (int64_t b = block_of(dst_off, nblocks, r); r < r1; b++) {
            int64_t end = dst_off[b] + padded[b];
            if (end > r1)
                end = r1;
            int64_t kept = dst_off[b] + (counts[b] < padded[b] ? counts[b] : padded[b]);
            int64_t copy_end = kept < end ? kept : end;
            if (copy_end > r && !index)
                memcpy(dst + r * row_bytes, src + (src_off[b] + r - dst_off[b]) * row_bytes,
                       (size_t)((copy_end - r) * row_bytes));
            for (int64_t i = r; index && i < copy_end; i++)
                memcpy(dst + i * row_bytes, src + index[src_off[b] + i - dst_off[b]] * row_bytes, (size_t)row_bytes);
            int64_t zero_from = kept > r ? kept : r;
            if (end > zero_from)
                memset(dst + zero_from * row_bytes, 0, (size_t)((end - zero_from) * row_bytes));
            r = end > r ? end : r; /* empty blocks: move on to the next */
        }
    }
}
