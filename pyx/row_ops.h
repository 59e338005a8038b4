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

#include "dispatch.h"

#define NC_BLOCK 4096
#define NC_LANES 16

#if defined(__GNUC__) || defined(__clang__)
#define NC_INLINE static inline __attribute__((always_inline))
#define NC_NOINLINE static __attribute__((noinline))
#define NC_VECTOR_EXT 1
#pragma GCC diagnostic ignored "-Wpsabi" /* a quad never crosses a call: always inlined */
#else
#define NC_INLINE static inline
#define NC_NOINLINE static
#define NC_VECTOR_EXT 0
#endif

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

/* ---- Four float64 lanes (a quad) and their operations ------------------------------------
 * GCC / clang vector extensions (one AVX operation or two SSE2 ones, by the instruction set the
 * template is compiled for), else a struct of four doubles: the same operations lane by lane. */
#if NC_VECTOR_EXT
typedef double nc_quad __attribute__((vector_size(32)));
NC_INLINE nc_quad nc_quad_make(double a, double b, double c, double d) { return (nc_quad){a, b, c, d}; }
NC_INLINE nc_quad nc_quad_set1(double a) { return (nc_quad){a, a, a, a}; }
NC_INLINE nc_quad nc_quad_add(nc_quad a, nc_quad b) { return a + b; }
NC_INLINE nc_quad nc_quad_sub(nc_quad a, nc_quad b) { return a - b; }
NC_INLINE nc_quad nc_quad_mul(nc_quad a, nc_quad b) { return a * b; }
NC_INLINE void nc_quad_store(double *p, nc_quad v) { memcpy(p, &v, sizeof v); }
#else
typedef struct { double v[4]; } nc_quad;
NC_INLINE nc_quad nc_quad_make(double a, double b, double c, double d) { nc_quad r = {{a, b, c, d}}; return r; }
NC_INLINE nc_quad nc_quad_set1(double a) { return nc_quad_make(a, a, a, a); }
NC_INLINE nc_quad nc_quad_add(nc_quad a, nc_quad b) { for (int l = 0; l < 4; l++) a.v[l] += b.v[l]; return a; }
NC_INLINE nc_quad nc_quad_sub(nc_quad a, nc_quad b) { for (int l = 0; l < 4; l++) a.v[l] -= b.v[l]; return a; }
NC_INLINE nc_quad nc_quad_mul(nc_quad a, nc_quad b) { for (int l = 0; l < 4; l++) a.v[l] *= b.v[l]; return a; }
NC_INLINE void nc_quad_store(double *p, nc_quad v) { memcpy(p, v.v, sizeof v.v); }
#endif
/* Loaded element by element: GCC then emits one vcvtps2pd ymm for AVX2 (a memcpy and
 * __builtin_convertvector become two halves and an insert there). */
NC_INLINE nc_quad nc_quad_load_f32(const float *p) { return nc_quad_make(p[0], p[1], p[2], p[3]); }
NC_INLINE nc_quad nc_quad_load_f64(const double *p) { return nc_quad_make(p[0], p[1], p[2], p[3]); }

/* The 16 lanes of a block's sums as four quads (lanes 4i .. 4i+3 in quad i). */
typedef struct {
    nc_quad a0, a1, a2, a3; /* sum of the first value of each pair: x - k, or g */
    nc_quad b0, b1, b2, b3; /* sum of the second: (x - k)^2, or g * (x - center) */
} nc_lanes;

NC_INLINE void nc_lanes_zero(nc_lanes *L)
{
    const nc_quad z = nc_quad_set1(0.0);
    L->a0 = L->a1 = L->a2 = L->a3 = z;
    L->b0 = L->b1 = L->b2 = L->b3 = z;
}

/* One step of 16 values of a moments block: a += d, b += d * d, d = x - k. */
NC_INLINE void nc_lanes_moments(nc_lanes *L, nc_quad d0, nc_quad d1, nc_quad d2, nc_quad d3)
{
    L->a0 = nc_quad_add(L->a0, d0); L->a1 = nc_quad_add(L->a1, d1);
    L->a2 = nc_quad_add(L->a2, d2); L->a3 = nc_quad_add(L->a3, d3);
    L->b0 = nc_quad_add(L->b0, nc_quad_mul(d0, d0)); L->b1 = nc_quad_add(L->b1, nc_quad_mul(d1, d1));
    L->b2 = nc_quad_add(L->b2, nc_quad_mul(d2, d2)); L->b3 = nc_quad_add(L->b3, nc_quad_mul(d3, d3));
}

/* One step of 16 values of a gradient block: a += g, b += g * e, e = x - center. */
NC_INLINE void nc_lanes_grad(nc_lanes *L, nc_quad g0, nc_quad g1, nc_quad g2, nc_quad g3,
                             nc_quad e0, nc_quad e1, nc_quad e2, nc_quad e3)
{
    L->a0 = nc_quad_add(L->a0, g0); L->a1 = nc_quad_add(L->a1, g1);
    L->a2 = nc_quad_add(L->a2, g2); L->a3 = nc_quad_add(L->a3, g3);
    L->b0 = nc_quad_add(L->b0, nc_quad_mul(g0, e0)); L->b1 = nc_quad_add(L->b1, nc_quad_mul(g1, e1));
    L->b2 = nc_quad_add(L->b2, nc_quad_mul(g2, e2)); L->b3 = nc_quad_add(L->b3, nc_quad_mul(g3, e3));
}

/* 16 lanes (four quads, lane l in quad l / 4) -> one sum, in a fixed tree: lane l + 8 into l
 * (q0 + q2, q1 + q3), then l + 4 (their sum f), then l + 2, then l + 1; in registers, and the
 * same additions whatever the instruction set. */
NC_INLINE double nc_fold_quads(nc_quad q0, nc_quad q1, nc_quad q2, nc_quad q3)
{
    double f[4];
    nc_quad_store(f, nc_quad_add(nc_quad_add(q0, q2), nc_quad_add(q1, q3)));
    return (f[0] + f[2]) + (f[1] + f[3]);
}

/* The folded sums of the lanes, in the fixed tree. */
NC_INLINE void nc_lanes_fold(const nc_lanes *L, double *a, double *b)
{
    *a = nc_fold_quads(L->a0, L->a1, L->a2, L->a3);
    *b = nc_fold_quads(L->b0, L->b1, L->b2, L->b3);
}

/* The lanes plus a block's last ntail < 16 terms (ta[l], tb[l] into lane l), folded: the
 * other lanes get -0.0, which adds exactly nothing (x + -0.0 is x for every x, -0.0 and NaN
 * included), so the bits are those of adding the tail to its lanes alone. */
NC_INLINE void nc_lanes_fold_tail(const nc_lanes *L, const double *ta, const double *tb, ptrdiff_t ntail,
                                  double *a, double *b)
{
    if (ntail == 0) {
        nc_lanes_fold(L, a, b);
        return;
    }
    double pa[NC_LANES], pb[NC_LANES];
    for (int l = 0; l < NC_LANES; l++) {
        pa[l] = l < ntail ? ta[l] : -0.0;
        pb[l] = l < ntail ? tb[l] : -0.0;
    }
    *a = nc_fold_quads(nc_quad_add(L->a0, nc_quad_load_f64(pa)), nc_quad_add(L->a1, nc_quad_load_f64(pa + 4)),
                       nc_quad_add(L->a2, nc_quad_load_f64(pa + 8)), nc_quad_add(L->a3, nc_quad_load_f64(pa + 12)));
    *b = nc_fold_quads(nc_quad_add(L->b0, nc_quad_load_f64(pb)), nc_quad_add(L->b1, nc_quad_load_f64(pb + 4)),
                       nc_quad_add(L->b2, nc_quad_load_f64(pb + 8)), nc_quad_add(L->b3, nc_quad_load_f64(pb + 12)));
}

/* The lanes of one block's moments while it is being summed (it may be summed in pieces: the
 * pipelined kernels interleave it with the apply of the previous group). */
typedef struct {
    double k;     /* the shift: the block's first value */
    nc_lanes acc; /* a: sum (x - k), b: sum (x - k)^2, per lane */
} nc_mom_state;

NC_INLINE void nc_mom_init(nc_mom_state *st, double k)
{
    st->k = k;
    nc_lanes_zero(&st->acc);
}

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


/* ---- The per-type kernels: row_ops_impl.h, for float and double, every instruction set ---- */
#define NC_TEMPLATE "row_ops_impl.h"
#include "for_each_type.h"
#undef NC_TEMPLATE

#endif
