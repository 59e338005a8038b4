/* Per-block float64 sums behind normcore's reduce kernels (included by pyx/blocks.pxd).
 *
 * A block is at most BLOCK contiguous elements of one row. Each function makes one pass and
 * accumulates in double. `omp simd reduction` lets the compiler keep one partial sum per
 * vector lane; the lanes and their final order are fixed when the extension is compiled, so a
 * given build gives bitwise-identical sums whatever the number of threads (threads only ever
 * take whole blocks). Without OpenMP SIMD support the pragma is ignored and the loop is scalar.
 *
 * moments: shifted by the block's first element k, S = sum(x - k), Q = sum((x - k)^2);
 *   mean = k + S/n, M2 = Q - S^2/n. Since k is an element of the block,
 *   (mean - k)^2 <= (n - 1) * var, so the cancellation in M2 costs at most a factor n
 *   (<= BLOCK) of float64 rounding: ~5e-13 relative in the worst case, ~1e-16 typically.
 *   Blocks are then merged with Chan's formula (blocks.pxd), never E[x^2] - E[x]^2.
 */
#ifndef NORMCORE_BLOCK_SUMS_H
#define NORMCORE_BLOCK_SUMS_H

#include <stddef.h>

#define NC_PRAGMA(x) _Pragma(#x)

#define NC_DEFINE_BLOCK_SUMS(T, SUFFIX)                                                        \
static inline void nc_block_moments_##SUFFIX(const T *x, ptrdiff_t n,                         \
                                             double *mean, double *m2)                         \
{                                                                                               \
    const double k = (double)x[0];                                                              \
    double s = 0.0, q = 0.0;                                                                    \
    NC_PRAGMA(omp simd reduction(+:s, q))                                                       \
    for (ptrdiff_t i = 0; i < n; i++) {                                                         \
        const double d = (double)x[i] - k;                                                      \
        s += d;                                                                                 \
        q += d * d;                                                                             \
    }                                                                                           \
    *mean = k + s / (double)n;                                                                  \
    q -= s * (s / (double)n);                                                                   \
    *m2 = q < 0.0 ? 0.0 : q; /* clamps rounding below 0; NaN passes through */                   \
}                                                                                               \
                                                                                                \
static inline void nc_block_grad_sums_##SUFFIX(const T *x, const T *dy, ptrdiff_t n,           \
                                               double center, double *sum_dy,                  \
                                               double *sum_dy_xc)                              \
{                                                                                               \
    double s = 0.0, t = 0.0;                                                                    \
    NC_PRAGMA(omp simd reduction(+:s, t))                                                       \
    for (ptrdiff_t i = 0; i < n; i++) {                                                         \
        const double g = (double)dy[i];                                                         \
        s += g;                                                                                 \
        t += g * ((double)x[i] - center);                                                       \
    }                                                                                           \
    *sum_dy = s;                                                                                \
    *sum_dy_xc = t;                                                                             \
}                                                                                               \
                                                                                                \
static inline void nc_block_grad_sums_weighted_##SUFFIX(const T *x, const T *dy, const T *w,   \
                                                        ptrdiff_t n, double center,            \
                                                        double *sum_wdy, double *sum_wdy_xc)   \
{                                                                                               \
    double s = 0.0, t = 0.0;                                                                    \
    NC_PRAGMA(omp simd reduction(+:s, t))                                                       \
    for (ptrdiff_t i = 0; i < n; i++) {                                                         \
        const double g = (double)w[i] * (double)dy[i];                                          \
        s += g;                                                                                 \
        t += g * ((double)x[i] - center);                                                       \
    }                                                                                           \
    *sum_wdy = s;                                                                               \
    *sum_wdy_xc = t;                                                                            \
}

NC_DEFINE_BLOCK_SUMS(float, f32)
NC_DEFINE_BLOCK_SUMS(double, f64)

#endif
