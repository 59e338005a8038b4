/* The arithmetic of normcore's reduce and apply kernels, on contiguous runs of one row or group
 * (included by pyx/blocks.pxd; the .pyx files cut the work into pieces and run them in parallel).
 *
 * Sums. A block is at most NC_BLOCK contiguous elements. Its sums are accumulated in double in
 * NC_LANES = 16 fixed lanes (element i of the block goes to lane i % 16), which are added in a
 * fixed tree at the end: the result depends neither on the vector width the compiler uses nor
 * on the number of threads (threads only ever take whole blocks). Sixteen independent lanes
 * also hide the latency of the additions, which a single accumulator would be bound by.
 *   moments: shifted by the block's first element k, S = sum(x - k), Q = sum((x - k)^2);
 *   mean = k + S/n, M2 = Q - S^2/n. Since k is an element of the block,
 *   (mean - k)^2 <= (n - 1) * var, so the cancellation in M2 costs at most a factor n
 *   (<= NC_BLOCK) of float64 rounding: ~5e-13 relative in the worst case, ~1e-16 typically.
 *   Blocks of a run are merged in order with Chan's formula (nc_merge_step), never
 *   E[x^2] - E[x]^2.
 *   gradient sums: sum(dy) and sum(dy * (x - center)), per block, block sums added in order.
 *
 * Apply. Forward in the array type, centered: y = ((x - hi) - lo) * scale + shift with the
 * float64 center split into two parts of the array type (a constant row maps exactly to its
 * shift). Backward in double, rounded once: dx = a * dy + (b * (x - center) + c).
 *
 * The fused kernels (nc_group_*, nc_layer_*) run the sums and the apply of one group or row
 * while it sits in cache: one read of x from memory instead of two. Their pieces are the same
 * inline functions the separate passes use, so fused and separate give the same bits.
 */
#ifndef NORMCORE_ROW_OPS_H
#define NORMCORE_ROW_OPS_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "multiversion.h"

#define NC_BLOCK 4096
#define NC_LANES 16

#if defined(__GNUC__) || defined(__clang__)
#define NC_INLINE static inline __attribute__((always_inline))
#define NC_VECTOR_EXT 1
typedef double nc_v4d __attribute__((vector_size(32)));
typedef float nc_v4f __attribute__((vector_size(16)));
#pragma GCC diagnostic ignored "-Wpsabi" /* nc_v4d never crosses a call: always inlined */
#else
#define NC_INLINE static inline
#define NC_VECTOR_EXT 0
#endif

/* AVX2 block sums, picked at run time (x86-64 with GCC or clang). NORMCORE_DISABLE_AVX2=1 in
 * the environment keeps the baseline version: the tests use it to show both give the same bits. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define NC_HAVE_AVX2_PATH 1
#include <immintrin.h>
#include <stdlib.h>
static int nc_avx2_state = -1;
static inline int nc_use_avx2(void)
{
    int v = __atomic_load_n(&nc_avx2_state, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *off = getenv("NORMCORE_DISABLE_AVX2");
        __builtin_cpu_init();
        v = (off && off[0] && off[0] != '0') ? 0 : (__builtin_cpu_supports("avx2") ? 1 : 0);
        __atomic_store_n(&nc_avx2_state, v, __ATOMIC_RELAXED);
    }
    return v;
}
#else
#define NC_HAVE_AVX2_PATH 0
#endif

/* lanes[0..15] -> one sum, in a fixed tree. */
NC_INLINE double nc_fold_lanes(double *v)
{
    for (int w = NC_LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++)
            v[l] += v[l + w];
    return v[0];
}

/* One step of Chan's merge, in order: (na, mu, q) absorbs a block of nb values. */
NC_INLINE void nc_merge_step(double *na, double *mu, double *q, double nb, double mean_b, double m2_b)
{
    if (*na == 0.0) {
        *na = nb;
        *mu = mean_b;
        *q = m2_b;
        return;
    }
    const double n = *na + nb;
    const double delta = mean_b - *mu;
    *mu = *mu + delta * (nb / n);
    *q = *q + m2_b + delta * delta * (*na * nb / n);
    *na = n;
}

/* 1 / sqrt(var + eps) on the biased variance, var clamped at 0 (NaN passes through). */
NC_INLINE double nc_rstd(double m2, double count, double eps)
{
    double var = m2 / count;
    if (var < 0.0)
        var = 0.0;
    return 1.0 / sqrt(var + eps);
}

/* Backward coefficients of a group of M values with its own statistics:
 * b = -rstd^3 * sum(g * (x - mean)) / M, c = -rstd * sum(g) / M  (g = gamma * dy). */
NC_INLINE void nc_bwd_coeffs(double rstd, double s1, double s2, double M, double *b, double *c)
{
    *b = -(rstd * rstd * rstd) * s2 / M;
    *c = -rstd * s1 / M;
}

/* ---- Block sums: 16 lanes as 4 vectors of 4 doubles ----------------------------------------
 * NC_BLOCK_SUMS(T, SFX, ISA, ATTR, VT, LOAD, SET1, ZERO, ADD, SUB, MUL, STORE) defines
 * nc_blk_{moments,grad_sums,grad_sums_w}_ISA_SFX with the vector type VT and its operations:
 * accumulator j holds lanes 4j .. 4j+3 (elements i + 4j .. i + 4j + 3 of each step of 16); the
 * tail (n % 16 elements) goes to lanes 0 .. in order; the lanes are folded in a fixed tree. The
 * baseline and AVX2 versions therefore do the same operations on the same values. */
#define NC_BLOCK_SUMS(T, SFX, ISA, ATTR, VT, LOAD, SET1, ZERO, ADD, SUB, MUL, STORE)             \
ATTR void nc_blk_moments_##ISA##_##SFX(const T *x, ptrdiff_t n, double *mean, double *m2)      \
{                                                                                               \
    const double k = (double)x[0];                                                              \
    const VT k4 = SET1(k);                                                                      \
    VT s0 = ZERO, s1 = ZERO, s2 = ZERO, s3 = ZERO, q0 = ZERO, q1 = ZERO, q2 = ZERO, q3 = ZERO;  \
    ptrdiff_t i = 0;                                                                            \
    for (; i + NC_LANES <= n; i += NC_LANES) {                                                  \
        const VT d0 = SUB(LOAD(x + i), k4), d1 = SUB(LOAD(x + i + 4), k4);                      \
        const VT d2 = SUB(LOAD(x + i + 8), k4), d3 = SUB(LOAD(x + i + 12), k4);                 \
        s0 = ADD(s0, d0); s1 = ADD(s1, d1); s2 = ADD(s2, d2); s3 = ADD(s3, d3);                 \
        q0 = ADD(q0, MUL(d0, d0)); q1 = ADD(q1, MUL(d1, d1));                                   \
        q2 = ADD(q2, MUL(d2, d2)); q3 = ADD(q3, MUL(d3, d3));                                   \
    }                                                                                           \
    double s[NC_LANES], q[NC_LANES];                                                            \
    STORE(s, s0); STORE(s + 4, s1); STORE(s + 8, s2); STORE(s + 12, s3);                        \
    STORE(q, q0); STORE(q + 4, q1); STORE(q + 8, q2); STORE(q + 12, q3);                        \
    for (int l = 0; i + l < n; l++) {                                                           \
        const double d = (double)x[i + l] - k;                                                  \
        s[l] += d;                                                                              \
        q[l] += d * d;                                                                          \
    }                                                                                           \
    const double S = nc_fold_lanes(s), Q = nc_fold_lanes(q);                                   \
    *mean = k + S / (double)n;                                                                  \
    const double m = Q - S * (S / (double)n);                                                   \
    *m2 = m < 0.0 ? 0.0 : m; /* clamps rounding below 0; NaN passes through */                  \
}                                                                                               \
                                                                                                \
ATTR void nc_blk_grad_sums_##ISA##_##SFX(const T *x, const T *dy, ptrdiff_t n, double center,  \
                                         double *sum_dy, double *sum_dy_xc)                    \
{                                                                                               \
    const VT c4 = SET1(center);                                                                 \
    VT s0 = ZERO, s1 = ZERO, s2 = ZERO, s3 = ZERO, t0 = ZERO, t1 = ZERO, t2 = ZERO, t3 = ZERO;  \
    ptrdiff_t i = 0;                                                                            \
    for (; i + NC_LANES <= n; i += NC_LANES) {                                                  \
        const VT g0 = LOAD(dy + i), g1 = LOAD(dy + i + 4);                                      \
        const VT g2 = LOAD(dy + i + 8), g3 = LOAD(dy + i + 12);                                 \
        s0 = ADD(s0, g0); s1 = ADD(s1, g1); s2 = ADD(s2, g2); s3 = ADD(s3, g3);                 \
        t0 = ADD(t0, MUL(g0, SUB(LOAD(x + i), c4)));                                            \
        t1 = ADD(t1, MUL(g1, SUB(LOAD(x + i + 4), c4)));                                        \
        t2 = ADD(t2, MUL(g2, SUB(LOAD(x + i + 8), c4)));                                        \
        t3 = ADD(t3, MUL(g3, SUB(LOAD(x + i + 12), c4)));                                       \
    }                                                                                           \
    double s[NC_LANES], t[NC_LANES];                                                            \
    STORE(s, s0); STORE(s + 4, s1); STORE(s + 8, s2); STORE(s + 12, s3);                        \
    STORE(t, t0); STORE(t + 4, t1); STORE(t + 8, t2); STORE(t + 12, t3);                        \
    for (int l = 0; i + l < n; l++) {                                                           \
        const double g = (double)dy[i + l];                                                     \
        s[l] += g;                                                                              \
        t[l] += g * ((double)x[i + l] - center);                                                \
    }                                                                                           \
    *sum_dy = nc_fold_lanes(s);                                                                 \
    *sum_dy_xc = nc_fold_lanes(t);                                                              \
}                                                                                               \
                                                                                                \
ATTR void nc_blk_grad_sums_w_##ISA##_##SFX(const T *x, const T *dy, const T *w, ptrdiff_t n,   \
                                           double center, double *sum_wdy, double *sum_wdy_xc) \
{                                                                                               \
    const VT c4 = SET1(center);                                                                 \
    VT s0 = ZERO, s1 = ZERO, s2 = ZERO, s3 = ZERO, t0 = ZERO, t1 = ZERO, t2 = ZERO, t3 = ZERO;  \
    ptrdiff_t i = 0;                                                                            \
    for (; i + NC_LANES <= n; i += NC_LANES) {                                                  \
        const VT g0 = MUL(LOAD(w + i), LOAD(dy + i));                                           \
        const VT g1 = MUL(LOAD(w + i + 4), LOAD(dy + i + 4));                                   \
        const VT g2 = MUL(LOAD(w + i + 8), LOAD(dy + i + 8));                                   \
        const VT g3 = MUL(LOAD(w + i + 12), LOAD(dy + i + 12));                                 \
        s0 = ADD(s0, g0); s1 = ADD(s1, g1); s2 = ADD(s2, g2); s3 = ADD(s3, g3);                 \
        t0 = ADD(t0, MUL(g0, SUB(LOAD(x + i), c4)));                                            \
        t1 = ADD(t1, MUL(g1, SUB(LOAD(x + i + 4), c4)));                                        \
        t2 = ADD(t2, MUL(g2, SUB(LOAD(x + i + 8), c4)));                                        \
        t3 = ADD(t3, MUL(g3, SUB(LOAD(x + i + 12), c4)));                                       \
    }                                                                                           \
    double s[NC_LANES], t[NC_LANES];                                                            \
    STORE(s, s0); STORE(s + 4, s1); STORE(s + 8, s2); STORE(s + 12, s3);                        \
    STORE(t, t0); STORE(t + 4, t1); STORE(t + 8, t2); STORE(t + 12, t3);                        \
    for (int l = 0; i + l < n; l++) {                                                           \
        const double g = (double)w[i + l] * (double)dy[i + l];                                  \
        s[l] += g;                                                                              \
        t[l] += g * ((double)x[i + l] - center);                                                \
    }                                                                                           \
    *sum_wdy = nc_fold_lanes(s);                                                                \
    *sum_wdy_xc = nc_fold_lanes(t);                                                             \
}

#if NC_VECTOR_EXT
/* Baseline: GCC / clang vector extensions (two SSE2 operations per vector on x86-64). */
NC_INLINE nc_v4d nc_vload_f32(const float *p)
{
    nc_v4f v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, nc_v4d);
}
NC_INLINE nc_v4d nc_vload_f64(const double *p)
{
    nc_v4d v;
    memcpy(&v, p, sizeof v);
    return v;
}
#define NC_V_SET1(a) ((nc_v4d){(a), (a), (a), (a)})
#define NC_V_ZERO ((nc_v4d){0.0, 0.0, 0.0, 0.0})
#define NC_V_ADD(a, b) ((a) + (b))
#define NC_V_SUB(a, b) ((a) - (b))
#define NC_V_MUL(a, b) ((a) * (b))
#define NC_V_STORE(p, v) memcpy((p), &(v), sizeof(nc_v4d))
NC_BLOCK_SUMS(float, f32, base, NC_INLINE, nc_v4d, nc_vload_f32, NC_V_SET1, NC_V_ZERO,
              NC_V_ADD, NC_V_SUB, NC_V_MUL, NC_V_STORE)
NC_BLOCK_SUMS(double, f64, base, NC_INLINE, nc_v4d, nc_vload_f64, NC_V_SET1, NC_V_ZERO,
              NC_V_ADD, NC_V_SUB, NC_V_MUL, NC_V_STORE)
#else
/* Baseline without vector extensions: 4 doubles as a struct, the same operations lane by lane. */
typedef struct { double v[4]; } nc_s4d;
NC_INLINE nc_s4d nc_sload_f32(const float *p) { nc_s4d r = {{p[0], p[1], p[2], p[3]}}; return r; }
NC_INLINE nc_s4d nc_sload_f64(const double *p) { nc_s4d r = {{p[0], p[1], p[2], p[3]}}; return r; }
NC_INLINE nc_s4d nc_sset1(double a) { nc_s4d r = {{a, a, a, a}}; return r; }
NC_INLINE nc_s4d nc_sadd(nc_s4d a, nc_s4d b) { for (int l = 0; l < 4; l++) a.v[l] += b.v[l]; return a; }
NC_INLINE nc_s4d nc_ssub(nc_s4d a, nc_s4d b) { for (int l = 0; l < 4; l++) a.v[l] -= b.v[l]; return a; }
NC_INLINE nc_s4d nc_smul(nc_s4d a, nc_s4d b) { for (int l = 0; l < 4; l++) a.v[l] *= b.v[l]; return a; }
#define NC_S_STORE(p, x) memcpy((p), (x).v, sizeof(double) * 4)
NC_BLOCK_SUMS(float, f32, base, NC_INLINE, nc_s4d, nc_sload_f32, nc_sset1, nc_sset1(0.0),
              nc_sadd, nc_ssub, nc_smul, NC_S_STORE)
NC_BLOCK_SUMS(double, f64, base, NC_INLINE, nc_s4d, nc_sload_f64, nc_sset1, nc_sset1(0.0),
              nc_sadd, nc_ssub, nc_smul, NC_S_STORE)
#endif

#if NC_HAVE_AVX2_PATH
#define NC_AVX2 __attribute__((target("avx2"), noinline)) static
#define NC_A_LOAD_F32(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define NC_A_LOAD_F64(p) _mm256_loadu_pd(p)
NC_BLOCK_SUMS(float, f32, avx2, NC_AVX2, __m256d, NC_A_LOAD_F32, _mm256_set1_pd, _mm256_setzero_pd(),
              _mm256_add_pd, _mm256_sub_pd, _mm256_mul_pd, _mm256_storeu_pd)
NC_BLOCK_SUMS(double, f64, avx2, NC_AVX2, __m256d, NC_A_LOAD_F64, _mm256_set1_pd, _mm256_setzero_pd(),
              _mm256_add_pd, _mm256_sub_pd, _mm256_mul_pd, _mm256_storeu_pd)
#define NC_PICK(name, SFX, args) \
    do { if (nc_use_avx2()) name##_avx2_##SFX args; else name##_base_##SFX args; } while (0)
#else
#define NC_PICK(name, SFX, args) name##_base_##SFX args
#endif

#define NC_BLOCK_DISPATCH(T, SFX)                                                               \
NC_INLINE void nc_blk_moments_##SFX(const T *x, ptrdiff_t n, double *mean, double *m2)         \
{ NC_PICK(nc_blk_moments, SFX, (x, n, mean, m2)); }                                             \
NC_INLINE void nc_blk_grad_sums_##SFX(const T *x, const T *dy, ptrdiff_t n, double center,     \
                                      double *s, double *t)                                     \
{ NC_PICK(nc_blk_grad_sums, SFX, (x, dy, n, center, s, t)); }                                   \
NC_INLINE void nc_blk_grad_sums_w_##SFX(const T *x, const T *dy, const T *w, ptrdiff_t n,      \
                                        double center, double *s, double *t)                   \
{ NC_PICK(nc_blk_grad_sums_w, SFX, (x, dy, w, n, center, s, t)); }
NC_BLOCK_DISPATCH(float, f32)
NC_BLOCK_DISPATCH(double, f64)

/* ---- Runs, applies and the kernels' entry points ------------------------------------------ */
#define NC_DEFINE_ROW_OPS(T, SFX)                                                              \
                                                                                                \
/* (mean, M2) of a run of n >= 1 values: blocks of NC_BLOCK merged in order. */                 \
NC_INLINE void nc_run_moments_##SFX(const T *x, ptrdiff_t n, double *mean, double *m2)         \
{                                                                                               \
    double na = 0.0, mu = 0.0, q = 0.0;                                                         \
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {                                               \
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;                              \
        double bm, bq;                                                                          \
        nc_blk_moments_##SFX(x + b, len, &bm, &bq);                                             \
        nc_merge_step(&na, &mu, &q, (double)len, bm, bq);                                       \
    }                                                                                           \
    *mean = mu;                                                                                 \
    *m2 = q;                                                                                    \
}                                                                                               \
                                                                                                \
/* Gradient sums of a run: block sums added in order. */                                        \
NC_INLINE void nc_run_grad_sums_##SFX(const T *x, const T *dy, ptrdiff_t n, double center,     \
                                      double *sum_dy, double *sum_dy_xc)                       \
{                                                                                               \
    double s = 0.0, t = 0.0;                                                                    \
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {                                               \
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;                              \
        double bs, bt;                                                                          \
        nc_blk_grad_sums_##SFX(x + b, dy + b, len, center, &bs, &bt);                           \
        if (b == 0) { s = bs; t = bt; } else { s += bs; t += bt; }                              \
    }                                                                                           \
    *sum_dy = s;                                                                                \
    *sum_dy_xc = t;                                                                             \
}                                                                                               \
                                                                                                \
NC_INLINE void nc_run_grad_sums_w_##SFX(const T *x, const T *dy, const T *w, ptrdiff_t n,      \
                                        double center, double *sum_wdy, double *sum_wdy_xc)    \
{                                                                                               \
    double s = 0.0, t = 0.0;                                                                    \
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {                                               \
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;                              \
        double bs, bt;                                                                          \
        nc_blk_grad_sums_w_##SFX(x + b, dy + b, w + b, len, center, &bs, &bt);                  \
        if (b == 0) { s = bs; t = bt; } else { s += bs; t += bt; }                              \
    }                                                                                           \
    *sum_wdy = s;                                                                               \
    *sum_wdy_xc = t;                                                                            \
}                                                                                               \
                                                                                                \
/* y = ((x - hi) - lo) * scale + shift in T, center = hi + lo. */                               \
NC_INLINE void nc_apply_##SFX(const T *x, T *y, ptrdiff_t n, double center, double scale,      \
                              double shift)                                                     \
{                                                                                               \
    const T hi = (T)center, lo = (T)(center - (double)hi);                                      \
    const T s = (T)scale, b = (T)shift;                                                         \
    for (ptrdiff_t i = 0; i < n; i++)                                                           \
        y[i] = ((x[i] - hi) - lo) * s + b;                                                      \
}                                                                                               \
                                                                                                \
/* dx = a * dy + (b * (x - center) + c), in double, rounded once. */                            \
NC_INLINE void nc_apply_bwd_##SFX(const T *dy, const T *x, T *dx, ptrdiff_t n, double center,  \
                                  double a, double b, double c)                                 \
{                                                                                               \
    for (ptrdiff_t i = 0; i < n; i++)                                                           \
        dx[i] = (T)(a * (double)dy[i] + (b * ((double)x[i] - center) + c));                     \
}                                                                                               \
                                                                                                \
/* y[j] = (((x[j] - hi) - lo) * scale) * w[j] + bias[j]   (bias NULL: no shift). */              \
NC_INLINE void nc_apply_cols_##SFX(const T *x, T *y, ptrdiff_t n, double center, double scale,  \
                                   const T *w, const T *bias)                                   \
{                                                                                               \
    const T hi = (T)center, lo = (T)(center - (double)hi);                                      \
    const T s = (T)scale;                                                                       \
    if (bias) {                                                                                 \
        for (ptrdiff_t j = 0; j < n; j++)                                                       \
            y[j] = (((x[j] - hi) - lo) * s) * w[j] + bias[j];                                   \
    } else {                                                                                    \
        for (ptrdiff_t j = 0; j < n; j++)                                                       \
            y[j] = (((x[j] - hi) - lo) * s) * w[j];                                             \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* dx[j] = a * (w[j] * dy[j]) + (b * (x[j] - center) + c), in double, rounded once. */           \
NC_INLINE void nc_apply_cols_bwd_##SFX(const T *dy, const T *x, T *dx, ptrdiff_t n,             \
                                       double center, double a, double b, double c,             \
                                       const T *w)                                              \
{                                                                                               \
    for (ptrdiff_t j = 0; j < n; j++)                                                           \
        dx[j] = (T)(a * ((double)w[j] * (double)dy[j]) + (b * ((double)x[j] - center) + c));    \
}                                                                                               \
                                                                                                \
/* ---- entry points (compiled for AVX2 and the baseline) ---- */                               \
                                                                                                \
NC_MULTIVERSION static void nc_block_moments_##SFX(const T *x, ptrdiff_t n, double *mean,       \
                                                   double *m2)                                  \
{ nc_blk_moments_##SFX(x, n, mean, m2); }                                                       \
                                                                                                \
NC_MULTIVERSION static void nc_block_grad_sums_##SFX(const T *x, const T *dy, ptrdiff_t n,      \
                                                     double center, double *s, double *t)      \
{ nc_blk_grad_sums_##SFX(x, dy, n, center, s, t); }                                             \
                                                                                                \
NC_MULTIVERSION static void nc_block_grad_sums_weighted_##SFX(const T *x, const T *dy,          \
                                                              const T *w, ptrdiff_t n,          \
                                                              double center, double *s,         \
                                                              double *t)                        \
{ nc_blk_grad_sums_w_##SFX(x, dy, w, n, center, s, t); }                                        \
                                                                                                \
NC_MULTIVERSION static void nc_apply_rows_##SFX(const T *x, T *y, ptrdiff_t n, double center,   \
                                                double scale, double shift)                     \
{ nc_apply_##SFX(x, y, n, center, scale, shift); }                                              \
                                                                                                \
NC_MULTIVERSION static void nc_apply_rows_bwd_##SFX(const T *dy, const T *x, T *dx,             \
                                                    ptrdiff_t n, double center, double a,       \
                                                    double b, double c)                         \
{ nc_apply_bwd_##SFX(dy, x, dx, n, center, a, b, c); }                                          \
                                                                                                \
/* One group of k rows of L (contiguous), forward: moments of its k*L values, then each row   \
 * r = c0 .. c0+k-1 (channel c = r % C) gets y = (x - mean) * (rstd * w[c]) + bias[c]. */      \
NC_MULTIVERSION static void nc_group_forward_##SFX(const T *x, T *y, ptrdiff_t k, ptrdiff_t L,  \
                                                   ptrdiff_t c0, ptrdiff_t C, const double *w,  \
                                                   const double *bias, double eps,              \
                                                   double *mean, double *m2, double *rstd)      \
{                                                                                               \
    nc_run_moments_##SFX(x, k * L, mean, m2);                                                   \
    *rstd = nc_rstd(*m2, (double)(k * L), eps);                                                 \
    for (ptrdiff_t j = 0; j < k; j++) {                                                         \
        const ptrdiff_t c = (c0 + j) % C;                                                       \
        nc_apply_##SFX(x + j * L, y + j * L, L, *mean, *rstd * w[c], bias[c]);                 \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* One group, backward with the group's own statistics: per-row sums centered on its mean,  \
 * then dx = a * dy + b * (x - mean) + c with a = rstd * w[c],                                 \
 * b = -rstd^3 * sum(w * dy * (x - mean)) / M, c = -rstd * sum(w * dy) / M (M = k * L).       \
 * sdy[j], sdyxc[j]: the rows' sums (for the parameter gradients). */                          \
NC_MULTIVERSION static void nc_group_backward_##SFX(const T *x, const T *dy, T *dx, ptrdiff_t k, \
                                                    ptrdiff_t L, ptrdiff_t c0, ptrdiff_t C,     \
                                                    const double *w, double mean, double rstd,  \
                                                    double *sdy, double *sdyxc)                 \
{                                                                                               \
    double s1 = 0.0, s2 = 0.0;                                                                  \
    for (ptrdiff_t j = 0; j < k; j++) {                                                         \
        nc_run_grad_sums_##SFX(x + j * L, dy + j * L, L, mean, &sdy[j], &sdyxc[j]);             \
        const double wc = w[(c0 + j) % C];                                                      \
        s1 += wc * sdy[j];                                                                      \
        s2 += wc * sdyxc[j];                                                                    \
    }                                                                                           \
    double b, c;                                                                                \
    nc_bwd_coeffs(rstd, s1, s2, (double)(k * L), &b, &c);                                       \
    for (ptrdiff_t j = 0; j < k; j++) {                                                         \
        const double a = rstd * w[(c0 + j) % C];                                                \
        nc_apply_bwd_##SFX(dy + j * L, x + j * L, dx + j * L, L, mean, a, b, c);               \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* LayerNorm, one row of L: moments, rstd, y = (x - mean) * rstd * w[j] + bias[j]            \
 * (w NULL: no affine; bias NULL: no shift). */                                                 \
NC_MULTIVERSION static void nc_layer_forward_##SFX(const T *x, T *y, ptrdiff_t L, const T *w,   \
                                                   const T *bias, double eps, double *mean,     \
                                                   double *rstd)                                \
{                                                                                               \
    double m2;                                                                                  \
    nc_run_moments_##SFX(x, L, mean, &m2);                                                      \
    *rstd = nc_rstd(m2, (double)L, eps);                                                        \
    if (w)                                                                                      \
        nc_apply_cols_##SFX(x, y, L, *mean, *rstd, w, bias);                                    \
    else                                                                                        \
        nc_apply_##SFX(x, y, L, *mean, *rstd, 0.0);                                             \
}                                                                                               \
                                                                                                \
/* LayerNorm backward, rows r0 .. r1-1 of L (x, dy, dx point at row 0): per row the sums of   \
 * g = w * dy (w NULL: g = dy) centered on the row mean, then                                  \
 * dx = a * g + b * (x - mean) + c (a = rstd, b = -rstd^3 * sum(g * (x - mean)) / L,           \
 * c = -rstd * sum(g) / L); and the column sums of these rows, in row order:                   \
 * acc_w[j] = sum dy * ((x - mean) * rstd), acc_b[j] = sum dy (NULL: not wanted). */           \
NC_MULTIVERSION static void nc_layer_backward_##SFX(const T *x, const T *dy, T *dx, ptrdiff_t r0, \
                                                    ptrdiff_t r1, ptrdiff_t L, const T *w,      \
                                                    const double *mean, const double *rstd,     \
                                                    double *acc_w, double *acc_b)               \
{                                                                                               \
    if (acc_w)                                                                                  \
        for (ptrdiff_t j = 0; j < L; j++) { acc_w[j] = 0.0; acc_b[j] = 0.0; }                   \
    for (ptrdiff_t r = r0; r < r1; r++) {                                                       \
        const T *xr = x + r * L, *gr = dy + r * L;                                              \
        T *dxr = dx + r * L;                                                                    \
        const double m = mean[r], rs = rstd[r];                                                 \
        double s1, s2;                                                                          \
        if (w)                                                                                  \
            nc_run_grad_sums_w_##SFX(xr, gr, w, L, m, &s1, &s2);                                \
        else                                                                                    \
            nc_run_grad_sums_##SFX(xr, gr, L, m, &s1, &s2);                                     \
        double b, c;                                                                            \
        nc_bwd_coeffs(rs, s1, s2, (double)L, &b, &c);                                           \
        if (acc_w) /* before dx is written: dx may be dy itself */                              \
            for (ptrdiff_t j = 0; j < L; j++) {                                                 \
                acc_w[j] += (double)gr[j] * (((double)xr[j] - m) * rs);                         \
                acc_b[j] += (double)gr[j];                                                      \
            }                                                                                   \
        if (w)                                                                                  \
            nc_apply_cols_bwd_##SFX(gr, xr, dxr, L, m, rs, b, c, w);                            \
        else                                                                                    \
            nc_apply_bwd_##SFX(gr, xr, dxr, L, m, rs, b, c);                                    \
    }                                                                                           \
}

NC_DEFINE_ROW_OPS(float, f32)
NC_DEFINE_ROW_OPS(double, f64)

#endif
