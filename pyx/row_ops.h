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
/* The lanes of one block's moments while it is being summed (it may be summed in pieces: the
 * pipelined kernels interleave it with the apply of the previous group). */
typedef struct {
    double k;              /* the shift: the block's first value */
    double s[NC_LANES];    /* sum (x - k), per lane */
    double q[NC_LANES];    /* sum (x - k)^2, per lane */
} nc_mom_state;

NC_INLINE void nc_mom_init(nc_mom_state *st, double k)
{
    st->k = k;
    for (int l = 0; l < NC_LANES; l++) {
        st->s[l] = 0.0;
        st->q[l] = 0.0;
    }
}

#define NC_BLOCK_SUMS(T, SFX, ISA, ATTR, VT, LOAD, LOADD, SET1, ZERO, ADD, SUB, MUL, STORE)      \
ATTR void nc_blk_moments_part_##ISA##_##SFX(const T *x, ptrdiff_t n16, nc_mom_state *st)         \
{                                                                                               \
    /* n16: a multiple of 16; the lanes continue from *st and go back there */                 \
    const VT k4 = SET1(st->k);                                                                  \
    VT s0 = LOADD(st->s), s1 = LOADD(st->s + 4), s2 = LOADD(st->s + 8), s3 = LOADD(st->s + 12); \
    VT q0 = LOADD(st->q), q1 = LOADD(st->q + 4), q2 = LOADD(st->q + 8), q3 = LOADD(st->q + 12); \
    for (ptrdiff_t i = 0; i < n16; i += NC_LANES) {                                             \
        const VT d0 = SUB(LOAD(x + i), k4), d1 = SUB(LOAD(x + i + 4), k4);                      \
        const VT d2 = SUB(LOAD(x + i + 8), k4), d3 = SUB(LOAD(x + i + 12), k4);                 \
        s0 = ADD(s0, d0); s1 = ADD(s1, d1); s2 = ADD(s2, d2); s3 = ADD(s3, d3);                 \
        q0 = ADD(q0, MUL(d0, d0)); q1 = ADD(q1, MUL(d1, d1));                                   \
        q2 = ADD(q2, MUL(d2, d2)); q3 = ADD(q3, MUL(d3, d3));                                   \
    }                                                                                           \
    STORE(st->s, s0); STORE(st->s + 4, s1); STORE(st->s + 8, s2); STORE(st->s + 12, s3);        \
    STORE(st->q, q0); STORE(st->q + 4, q1); STORE(st->q + 8, q2); STORE(st->q + 12, q3);        \
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
NC_BLOCK_SUMS(float, f32, base, NC_INLINE, nc_v4d, nc_vload_f32, nc_vload_f64, NC_V_SET1, NC_V_ZERO,
              NC_V_ADD, NC_V_SUB, NC_V_MUL, NC_V_STORE)
NC_BLOCK_SUMS(double, f64, base, NC_INLINE, nc_v4d, nc_vload_f64, nc_vload_f64, NC_V_SET1, NC_V_ZERO,
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
NC_BLOCK_SUMS(float, f32, base, NC_INLINE, nc_s4d, nc_sload_f32, nc_sload_f64, nc_sset1, nc_sset1(0.0),
              nc_sadd, nc_ssub, nc_smul, NC_S_STORE)
NC_BLOCK_SUMS(double, f64, base, NC_INLINE, nc_s4d, nc_sload_f64, nc_sload_f64, nc_sset1, nc_sset1(0.0),
              nc_sadd, nc_ssub, nc_smul, NC_S_STORE)
#endif

#if NC_HAVE_AVX2_PATH
#define NC_AVX2 __attribute__((target("avx2"), noinline)) static
#define NC_A_LOAD_F32(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define NC_A_LOAD_F64(p) _mm256_loadu_pd(p)
NC_BLOCK_SUMS(float, f32, avx2, NC_AVX2, __m256d, NC_A_LOAD_F32, NC_A_LOAD_F64, _mm256_set1_pd, _mm256_setzero_pd(),
              _mm256_add_pd, _mm256_sub_pd, _mm256_mul_pd, _mm256_storeu_pd)
NC_BLOCK_SUMS(double, f64, avx2, NC_AVX2, __m256d, NC_A_LOAD_F64, NC_A_LOAD_F64, _mm256_set1_pd, _mm256_setzero_pd(),
              _mm256_add_pd, _mm256_sub_pd, _mm256_mul_pd, _mm256_storeu_pd)
#define NC_PICK(name, SFX, args) \
    do { if (nc_use_avx2()) name##_avx2_##SFX args; else name##_base_##SFX args; } while (0)
#else
#define NC_PICK(name, SFX, args) name##_base_##SFX args
#endif

#define NC_BLOCK_DISPATCH(T, SFX)                                                               \
NC_INLINE void nc_blk_moments_part_##SFX(const T *x, ptrdiff_t n16, nc_mom_state *st)          \
{ NC_PICK(nc_blk_moments_part, SFX, (x, n16, st)); }                                            \
/* The block's last n % 16 values (x points at them) and the result, for a block of n. */      \
NC_INLINE void nc_blk_moments_finish_##SFX(const T *x, ptrdiff_t ntail, ptrdiff_t n,            \
                                           nc_mom_state *st, double *mean, double *m2)          \
{                                                                                               \
    const double k = st->k;                                                                     \
    for (ptrdiff_t l = 0; l < ntail; l++) {                                                     \
        const double d = (double)x[l] - k;                                                      \
        st->s[l] += d;                                                                          \
        st->q[l] += d * d;                                                                      \
    }                                                                                           \
    const double S = nc_fold_lanes(st->s), Q = nc_fold_lanes(st->q);                           \
    *mean = k + S / (double)n;                                                                  \
    const double m = Q - S * (S / (double)n);                                                   \
    *m2 = m < 0.0 ? 0.0 : m; /* clamps rounding below 0; NaN passes through */                  \
}                                                                                               \
/* Mean and M2 of one block of n >= 1 values. */                                                \
NC_INLINE void nc_blk_moments_##SFX(const T *x, ptrdiff_t n, double *mean, double *m2)         \
{                                                                                               \
    nc_mom_state st;                                                                            \
    const ptrdiff_t n16 = n - n % NC_LANES;                                                     \
    nc_mom_init(&st, (double)x[0]);                                                             \
    nc_blk_moments_part_##SFX(x, n16, &st);                                                     \
    nc_blk_moments_finish_##SFX(x + n16, n - n16, n, &st, mean, m2);                            \
}                                                                                               \
NC_INLINE void nc_blk_grad_sums_##SFX(const T *x, const T *dy, ptrdiff_t n, double center,     \
                                      double *s, double *t)                                     \
{ NC_PICK(nc_blk_grad_sums, SFX, (x, dy, n, center, s, t)); }                                   \
NC_INLINE void nc_blk_grad_sums_w_##SFX(const T *x, const T *dy, const T *w, ptrdiff_t n,      \
                                        double center, double *s, double *t)                   \
{ NC_PICK(nc_blk_grad_sums_w, SFX, (x, dy, w, n, center, s, t)); }
NC_BLOCK_DISPATCH(float, f32)
NC_BLOCK_DISPATCH(double, f64)

/* What the apply of one unit needs: a group's per-channel coefficients (cols = 0: row r0 + j of
 * the unit has channel (r0 + j) % C, scale rstd * w[c], shift bias[c]) or a LayerNorm row's
 * per-column weight and bias (cols = 1: wc, bc of the array type, NULL when absent). */
typedef struct {
    int cols;
    ptrdiff_t L, r0, C;
    const double *w, *bias;
    const void *wc, *bc;
    double mean, rstd;
} nc_apply_ctx;

#define NC_QUAD 4      /* rows whose column sums the LayerNorm backward adds in one step */
#define NC_PIECE 512   /* values per piece of the pipelined forward (a multiple of NC_LANES) */
#define NC_PIPELINE_MIN 1024 /* shorter units are not pipelined: the pieces would cost more */

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
/* dx = a * dy + (b * (x - center) + c), in double, rounded once. With b = c = 0 (statistics  \
 * that are constants: eval) dx = a * dy exactly, reading no x: an infinite dy stays infinite    \
 * (0 * inf would make it NaN) and a NaN in x cannot reach dx. */                               \
NC_INLINE void nc_apply_bwd_##SFX(const T *dy, const T *x, T *dx, ptrdiff_t n, double center,  \
                                  double a, double b, double c)                                 \
{                                                                                               \
    if (b == 0.0 && c == 0.0) {                                                                 \
        for (ptrdiff_t i = 0; i < n; i++)                                                       \
            dx[i] = (T)(a * (double)dy[i]);                                                     \
        return;                                                                                 \
    }                                                                                           \
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
/* ---- entry points (compiled per instruction set: multiversion.h) ---- */                    \
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
/* Rows r0 .. r1-1 of L (x, y point at row 0), row r with coefficients [r % period]: one call  \
 * for many short rows (the channel index is counted, not divided). */                        \
NC_MULTIVERSION static void nc_apply_rows_range_##SFX(const T *x, T *y, ptrdiff_t r0, ptrdiff_t r1, \
                                                      ptrdiff_t L, ptrdiff_t period,            \
                                                      const double *center,                     \
                                                      const double *scale,                      \
                                                      const double *shift)                      \
{                                                                                               \
    ptrdiff_t p = r0 % period;                                                                  \
    for (ptrdiff_t r = r0; r < r1; r++) {                                                       \
        nc_apply_##SFX(x + r * L, y + r * L, L, center[p], scale[p], shift[p]);                 \
        if (++p == period)                                                                      \
            p = 0;                                                                              \
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
    const ptrdiff_t cf = c0 % C; /* channels counted, not divided, from row to row */          \
    ptrdiff_t ch = cf;                                                                          \
    for (ptrdiff_t j = 0; j < k; j++) {                                                         \
        nc_run_grad_sums_##SFX(x + j * L, dy + j * L, L, mean, &sdy[j], &sdyxc[j]);             \
        const double wc = w[ch];                                                                \
        s1 += wc * sdy[j];                                                                      \
        s2 += wc * sdyxc[j];                                                                    \
        if (++ch == C)                                                                          \
            ch = 0;                                                                             \
    }                                                                                           \
    double b, c;                                                                                \
    nc_bwd_coeffs(rstd, s1, s2, (double)(k * L), &b, &c);                                       \
    ch = cf;                                                                                    \
    for (ptrdiff_t j = 0; j < k; j++) {                                                         \
        const double a = rstd * w[ch];                                                          \
        nc_apply_bwd_##SFX(dy + j * L, x + j * L, dx + j * L, L, mean, a, b, c);               \
        if (++ch == C)                                                                          \
            ch = 0;                                                                             \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* Column sums of nq <= NC_QUAD consecutive rows, added to acc_w, acc_b in one step per column:  \
 * t_i = dy_i * ((x_i - mean_i) * rstd_i); acc_w += ((t0 + t1) + (t2 + t3)) (missing rows left  \
 * out of the same tree), acc_b likewise with dy_i. */                                          \
NC_INLINE void nc_col_sums_##SFX(const T *x, const T *dy, ptrdiff_t nq, ptrdiff_t S,            \
                                 ptrdiff_t L, const double *mean, const double *rstd,           \
                                 double *acc_w, double *acc_b)                                  \
{                                                                                               \
    /* rows of stride S, columns 0 .. L-1 of them */                                            \
    if (nq == NC_QUAD) {                                                                        \
        const T *x0 = x, *x1 = x + S, *x2 = x + 2 * S, *x3 = x + 3 * S;                         \
        const T *g0 = dy, *g1 = dy + S, *g2 = dy + 2 * S, *g3 = dy + 3 * S;                     \
        const double m0 = mean[0], m1 = mean[1], m2 = mean[2], m3 = mean[3];                    \
        const double s0 = rstd[0], s1 = rstd[1], s2 = rstd[2], s3 = rstd[3];                    \
        for (ptrdiff_t j = 0; j < L; j++) {                                                     \
            const double t0 = (double)g0[j] * (((double)x0[j] - m0) * s0);                      \
            const double t1 = (double)g1[j] * (((double)x1[j] - m1) * s1);                      \
            const double t2 = (double)g2[j] * (((double)x2[j] - m2) * s2);                      \
            const double t3 = (double)g3[j] * (((double)x3[j] - m3) * s3);                      \
            acc_w[j] += (t0 + t1) + (t2 + t3);                                                  \
            acc_b[j] += ((double)g0[j] + (double)g1[j]) + ((double)g2[j] + (double)g3[j]);      \
        }                                                                                       \
        return;                                                                                 \
    }                                                                                           \
    for (ptrdiff_t j = 0; j < L; j++) {                                                         \
        double tw = 0.0, tb = 0.0;                                                              \
        for (ptrdiff_t i = 0; i < nq; i++) {                                                    \
            const double g = (double)dy[i * S + j];                                             \
            const double t = g * (((double)x[i * S + j] - mean[i]) * rstd[i]);                  \
            if (i == 0) { tw = t; tb = g; } else { tw += t; tb += g; }                          \
        }                                                                                       \
        acc_w[j] += tw;                                                                         \
        acc_b[j] += tb;                                                                         \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* One LayerNorm row's backward coefficients b, c from its sums of g = w * dy. */             \
NC_INLINE void nc_layer_coeffs_##SFX(const T *xr, const T *gr, ptrdiff_t L, const T *w,        \
                                     double m, double rs, double *b, double *c)                 \
{                                                                                               \
    double s1, s2;                                                                              \
    if (w)                                                                                      \
        nc_run_grad_sums_w_##SFX(xr, gr, w, L, m, &s1, &s2);                                    \
    else                                                                                        \
        nc_run_grad_sums_##SFX(xr, gr, L, m, &s1, &s2);                                         \
    nc_bwd_coeffs(rs, s1, s2, (double)L, b, c);                                                 \
}                                                                                               \
                                                                                                \
/* dx of n values of a LayerNorm row (w: the row's weights from the same column, or NULL). */  \
NC_INLINE void nc_layer_dx_##SFX(const T *gr, const T *xr, T *dxr, ptrdiff_t n, double m,       \
                                 double rs, double b, double c, const T *w)                     \
{                                                                                               \
    if (w)                                                                                      \
        nc_apply_cols_bwd_##SFX(gr, xr, dxr, n, m, rs, b, c, w);                                \
    else                                                                                        \
        nc_apply_bwd_##SFX(gr, xr, dxr, n, m, rs, b, c);                                        \
}                                                                                               \
                                                                                                \
/* The same LayerNorm backward as three separate steps, for few long rows (parallel over rows, \
 * then over column blocks, then over pieces of rows): the same bits as nc_layer_backward with \
 * r0 = 0 and r1 = R. */                                                                       \
NC_MULTIVERSION static void nc_layer_row_coeffs_##SFX(const T *xr, const T *gr, ptrdiff_t L,    \
                                                      const T *w, double m, double rs,          \
                                                      double *b, double *c)                     \
{ nc_layer_coeffs_##SFX(xr, gr, L, w, m, rs, b, c); }                                           \
                                                                                                \
/* Column sums of rows 0 .. R-1 (stride L) over columns j0 .. j0+n-1, quads from row 0. */      \
NC_MULTIVERSION static void nc_layer_col_sums_##SFX(const T *x, const T *dy, ptrdiff_t R,       \
                                                    ptrdiff_t L, ptrdiff_t j0, ptrdiff_t n,     \
                                                    const double *mean, const double *rstd,     \
                                                    double *acc_w, double *acc_b)               \
{                                                                                               \
    for (ptrdiff_t j = 0; j < n; j++) { acc_w[j0 + j] = 0.0; acc_b[j0 + j] = 0.0; }             \
    for (ptrdiff_t q0 = 0; q0 < R; q0 += NC_QUAD) {                                             \
        const ptrdiff_t nq = R - q0 < NC_QUAD ? R - q0 : NC_QUAD;                               \
        nc_col_sums_##SFX(x + q0 * L + j0, dy + q0 * L + j0, nq, L, n, mean + q0, rstd + q0,     \
                          acc_w + j0, acc_b + j0);                                              \
    }                                                                                           \
}                                                                                               \
                                                                                                \
NC_MULTIVERSION static void nc_layer_dx_piece_##SFX(const T *gr, const T *xr, T *dxr, ptrdiff_t n, \
                                                    double m, double rs, double b, double c,    \
                                                    const T *w)                                 \
{ nc_layer_dx_##SFX(gr, xr, dxr, n, m, rs, b, c, w); }                                          \
                                                                                                \
/* LayerNorm backward, rows r0 .. r1-1 of L (x, dy, dx point at row 0): per row the sums of   \
 * g = w * dy (w NULL: g = dy) centered on the row mean, then                                  \
 * dx = a * g + b * (x - mean) + c (a = rstd, b = -rstd^3 * sum(g * (x - mean)) / L,           \
 * c = -rstd * sum(g) / L); and the column sums of these rows (NULL: not wanted):              \
 * acc_w[j] = sum dy * ((x - mean) * rstd), acc_b[j] = sum dy, added NC_QUAD rows at a time    \
 * (((t0 + t1) + (t2 + t3)) per quad, quads in order from r0), which reads and writes the      \
 * accumulators a quarter as often as row by row. Rows are done a quad at a time while in      \
 * cache: sums, column sums, then dx (dx may be dy itself). */                                 \
NC_MULTIVERSION static void nc_layer_backward_##SFX(const T *x, const T *dy, T *dx, ptrdiff_t r0, \
                                                    ptrdiff_t r1, ptrdiff_t L, const T *w,      \
                                                    const double *mean, const double *rstd,     \
                                                    double *acc_w, double *acc_b)               \
{                                                                                               \
    if (acc_w)                                                                                  \
        for (ptrdiff_t j = 0; j < L; j++) { acc_w[j] = 0.0; acc_b[j] = 0.0; }                   \
    for (ptrdiff_t q0 = r0; q0 < r1; q0 += NC_QUAD) {                                           \
        const ptrdiff_t nq = r1 - q0 < NC_QUAD ? r1 - q0 : NC_QUAD;                             \
        double b[NC_QUAD], c[NC_QUAD];                                                          \
        for (ptrdiff_t i = 0; i < nq; i++)                                                      \
            nc_layer_coeffs_##SFX(x + (q0 + i) * L, dy + (q0 + i) * L, L, w, mean[q0 + i],      \
                                  rstd[q0 + i], &b[i], &c[i]);                                  \
        if (acc_w)                                                                              \
            nc_col_sums_##SFX(x + q0 * L, dy + q0 * L, nq, L, L, mean + q0, rstd + q0, acc_w,     \
                              acc_b);                                                           \
        for (ptrdiff_t i = 0; i < nq; i++) {                                                    \
            const ptrdiff_t r = q0 + i;                                                         \
            nc_layer_dx_##SFX(dy + r * L, x + r * L, dx + r * L, L, mean[r], rstd[r], b[i], c[i], w); \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* ---- Pipelined forward: the statistics of the next unit are summed in pieces, each piece   \
 * interleaved with the apply of the same stretch of the current unit (already in cache), so  \
 * reading the next unit from memory overlaps writing the current one. A unit is a group      \
 * (InstanceNorm, GroupNorm) or a row (LayerNorm). The pieces change neither the sums (the    \
 * same lanes in the same order as nc_run_moments) nor the apply (element-wise). */          \
NC_INLINE void nc_group_apply_range_##SFX(const T *xg, T *yg, ptrdiff_t i0, ptrdiff_t len,      \
                                          const nc_apply_ctx *a)                               \
{                                                                                               \
    /* one division for the first row; then rows and channels are counted */                  \
    const ptrdiff_t j = i0 / a->L;                                                              \
    ptrdiff_t off = i0 - j * a->L, c = (a->r0 + j) % a->C;                                      \
    while (len > 0) {                                                                           \
        const ptrdiff_t seg = len < a->L - off ? len : a->L - off;                              \
        nc_apply_##SFX(xg + i0, yg + i0, seg, a->mean, a->rstd * a->w[c], a->bias[c]);          \
        i0 += seg;                                                                              \
        len -= seg;                                                                             \
        off = 0;                                                                                \
        if (++c == a->C)                                                                        \
            c = 0;                                                                              \
    }                                                                                           \
}                                                                                               \
                                                                                                \
NC_INLINE void nc_unit_apply_##SFX(const T *xu, T *yu, ptrdiff_t i0, ptrdiff_t len,             \
                                   const nc_apply_ctx *a)                                       \
{                                                                                               \
    if (!a->cols) {                                                                             \
        nc_group_apply_range_##SFX(xu, yu, i0, len, a);                                         \
    } else if (a->wc) {                                                                         \
        const T *w = (const T *)a->wc, *b = (const T *)a->bc;                                   \
        nc_apply_cols_##SFX(xu + i0, yu + i0, len, a->mean, a->rstd, w + i0, b ? b + i0 : NULL); \
    } else {                                                                                    \
        nc_apply_##SFX(xu + i0, yu + i0, len, a->mean, a->rstd, 0.0);                           \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* Apply unit xu -> yu (n values) while summing the moments of `next` (n values). */            \
NC_INLINE void nc_unit_pipeline_##SFX(const T *xu, T *yu, ptrdiff_t n, const nc_apply_ctx *a,  \
                                      const T *next, double *mean_n, double *m2_n)              \
{                                                                                               \
    double na = 0.0, mu = 0.0, q = 0.0;                                                         \
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {                                               \
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;                              \
        const ptrdiff_t n16 = len - len % NC_LANES;                                             \
        nc_mom_state st;                                                                        \
        nc_mom_init(&st, (double)next[b]);                                                      \
        for (ptrdiff_t p = 0; p < n16; p += NC_PIECE) {                                         \
            const ptrdiff_t pl = n16 - p < NC_PIECE ? n16 - p : NC_PIECE;                       \
            nc_blk_moments_part_##SFX(next + b + p, pl, &st);                                   \
            nc_unit_apply_##SFX(xu, yu, b + p, pl, a);                                          \
        }                                                                                       \
        double bm, bq;                                                                          \
        nc_blk_moments_finish_##SFX(next + b + n16, len - n16, len, &st, &bm, &bq);             \
        if (len > n16)                                                                          \
            nc_unit_apply_##SFX(xu, yu, b + n16, len - n16, a);                                 \
        nc_merge_step(&na, &mu, &q, (double)len, bm, bq);                                       \
    }                                                                                           \
    *mean_n = mu;                                                                               \
    *m2_n = q;                                                                                  \
}                                                                                               \
                                                                                                \
/* Groups g0 .. g1-1 of k rows of L (contiguous), forward: moments of each group's k*L values,  \
 * then row r = g*k + j (channel r % C) gets y = (x - mean) * (rstd * w[c]) + bias[c]. */       \
NC_MULTIVERSION static void nc_groups_forward_##SFX(const T *x, T *y, ptrdiff_t g0, ptrdiff_t g1, \
                                                    ptrdiff_t k, ptrdiff_t L, ptrdiff_t C,      \
                                                    const double *w, const double *bias,        \
                                                    double eps, double *mean, double *m2,       \
                                                    double *rstd)                               \
{                                                                                               \
    const ptrdiff_t n = k * L;                                                                  \
    if (g0 >= g1)                                                                               \
        return;                                                                                 \
    nc_run_moments_##SFX(x + g0 * n, n, &mean[g0], &m2[g0]);                                    \
    for (ptrdiff_t g = g0; g < g1; g++) {                                                       \
        rstd[g] = nc_rstd(m2[g], (double)n, eps);                                               \
        const nc_apply_ctx a = {0, L, g * k, C, w, bias, NULL, NULL, mean[g], rstd[g]};         \
        if (g + 1 < g1 && n >= NC_PIPELINE_MIN) {                                               \
            nc_unit_pipeline_##SFX(x + g * n, y + g * n, n, &a, x + (g + 1) * n,                \
                                   &mean[g + 1], &m2[g + 1]);                                   \
        } else {                                                                                \
            nc_unit_apply_##SFX(x + g * n, y + g * n, 0, n, &a);                                \
            if (g + 1 < g1)                                                                     \
                nc_run_moments_##SFX(x + (g + 1) * n, n, &mean[g + 1], &m2[g + 1]);             \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* LayerNorm rows r0 .. r1-1: per row moments, rstd, y = (x - mean) * rstd * w[j] + bias[j]   \
 * (w NULL: no affine; bias NULL: no shift). */                                               \
NC_MULTIVERSION static void nc_layers_forward_##SFX(const T *x, T *y, ptrdiff_t r0, ptrdiff_t r1, \
                                                    ptrdiff_t L, const T *w, const T *bias,     \
                                                    double eps, double *mean, double *rstd)     \
{                                                                                               \
    if (r0 >= r1)                                                                               \
        return;                                                                                 \
    double m2;                                                                                  \
    nc_run_moments_##SFX(x + r0 * L, L, &mean[r0], &m2);                                        \
    for (ptrdiff_t r = r0; r < r1; r++) {                                                       \
        rstd[r] = nc_rstd(m2, (double)L, eps);                                                  \
        const nc_apply_ctx a = {1, L, 0, 1, NULL, NULL, w, bias, mean[r], rstd[r]};             \
        if (r + 1 < r1 && L >= NC_PIPELINE_MIN) {                                               \
            nc_unit_pipeline_##SFX(x + r * L, y + r * L, L, &a, x + (r + 1) * L,                \
                                   &mean[r + 1], &m2);                                          \
        } else {                                                                                \
            nc_unit_apply_##SFX(x + r * L, y + r * L, 0, L, &a);                                \
            if (r + 1 < r1)                                                                     \
                nc_run_moments_##SFX(x + (r + 1) * L, L, &mean[r + 1], &m2);                    \
        }                                                                                       \
    }                                                                                           \
}


NC_DEFINE_ROW_OPS(float, f32)
NC_DEFINE_ROW_OPS(double, f64)

#endif
