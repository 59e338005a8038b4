/* BatchNorm on NCHW rows shorter than NC_SHORT_ROW: the reduce and apply steps of one channel
 * over several rows at a time (included by pyx/channel_ops.pxd; pyx/channels.pxi cuts the work
 * into tasks and merges their results in order).
 *
 * Per-row kernels pay a fixed cost for every row (a call, the fold of 16 lanes, a Chan merge
 * step), which for 7x7 or 6x6 maps is larger than the work on the row's values. Here a *block*
 * is the rows n0 .. n1-1 of one channel c (row (n, c) starts at x + (n * C + c) * L), at most
 * NC_BLOCK values, summed in one set of 16 lanes: element j of a row goes to lane j % 16, the
 * row's last L % 16 elements to lanes 0 .. (padded with values that add exactly 0), and the
 * lanes are folded once per block in row_ops.h's fixed tree. Every lane sees the same
 * operations in the same order whatever vector width the compiler picks (the functions are
 * plain C loops, compiled for each instruction set by NC_MULTIVERSION), and a block never
 * depends on the thread count: the bits are the same on every variant and any thread count.
 *
 * Moments are shifted by the block's first value k (S = sum(x - k), Q = sum((x - k)^2),
 * M2 = Q - S^2/n), with the bound of row_ops.h: k is a value of the block, so the cancellation
 * costs at most a factor n <= NC_BLOCK of float64 rounding. Blocks are merged with Chan's
 * formula by the caller, in block order.
 *
 * The functions are instantiated for float and double from channel_ops_impl.h (T, NC_NAME).
 */
#ifndef NORMCORE_CHANNEL_OPS_H
#define NORMCORE_CHANNEL_OPS_H

#include "row_ops.h"

/* Rows shorter than this take the block path: at NC_SHORT_ROW values the per-row costs are
 * already a few percent of a row's work. */
#define NC_SHORT_ROW 1024
/* A channel whose x and dy take at most this many bytes is in cache (L2) for the second read
 * of its backward: its rows (up to a block each) take the block path and the fused backward. */
#define NC_FUSED_CHANNEL_BYTES (256 * 1024)

/* Four float64 lanes and their operations: GCC / clang vector extensions (one AVX or two SSE2
 * operations, by the clone), else row_ops.h's struct of four doubles. */
#if NC_VECTOR_EXT
typedef nc_v4d nc_quad;
/* element by element: GCC then emits one vcvtps2pd ymm in the AVX2 clone (row_ops.h's
 * memcpy + __builtin_convertvector becomes two halves and an insert there) */
NC_INLINE nc_quad nc_quad_make(double a, double b, double c, double d) { return (nc_quad){a, b, c, d}; }
NC_INLINE nc_quad nc_quad_load_f32(const float *p) { return nc_quad_make(p[0], p[1], p[2], p[3]); }
NC_INLINE nc_quad nc_quad_load_f64(const double *p) { return nc_quad_make(p[0], p[1], p[2], p[3]); }
NC_INLINE nc_quad nc_quad_set1(double a) { return NC_V_SET1(a); }
NC_INLINE nc_quad nc_quad_add(nc_quad a, nc_quad b) { return a + b; }
NC_INLINE nc_quad nc_quad_sub(nc_quad a, nc_quad b) { return a - b; }
NC_INLINE nc_quad nc_quad_mul(nc_quad a, nc_quad b) { return a * b; }
NC_INLINE void nc_quad_store(double *p, nc_quad v) { NC_V_STORE(p, v); }
#else
typedef nc_s4d nc_quad;
NC_INLINE nc_quad nc_quad_make(double a, double b, double c, double d) { nc_quad r = {{a, b, c, d}}; return r; }
NC_INLINE nc_quad nc_quad_load_f32(const float *p) { return nc_sload_f32(p); }
NC_INLINE nc_quad nc_quad_load_f64(const double *p) { return nc_sload_f64(p); }
NC_INLINE nc_quad nc_quad_set1(double a) { return nc_sset1(a); }
NC_INLINE nc_quad nc_quad_add(nc_quad a, nc_quad b) { return nc_sadd(a, b); }
NC_INLINE nc_quad nc_quad_sub(nc_quad a, nc_quad b) { return nc_ssub(a, b); }
NC_INLINE nc_quad nc_quad_mul(nc_quad a, nc_quad b) { return nc_smul(a, b); }
NC_INLINE void nc_quad_store(double *p, nc_quad v) { NC_S_STORE(p, v); }
#endif

/* The 16 lanes of a block's sums as four quads (lanes 4i .. 4i+3 in quad i). */
typedef struct {
    nc_quad a0, a1, a2, a3; /* sum of the first value of each pair: x - k, or dy */
    nc_quad b0, b1, b2, b3; /* sum of the second: (x - k)^2, or dy * (x - center) */
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

/* One step of 16 values of a gradient block: a += g, b += g * e, g = dy, e = x - center. */
NC_INLINE void nc_lanes_grad(nc_lanes *L, nc_quad g0, nc_quad g1, nc_quad g2, nc_quad g3,
                             nc_quad e0, nc_quad e1, nc_quad e2, nc_quad e3)
{
    L->a0 = nc_quad_add(L->a0, g0); L->a1 = nc_quad_add(L->a1, g1);
    L->a2 = nc_quad_add(L->a2, g2); L->a3 = nc_quad_add(L->a3, g3);
    L->b0 = nc_quad_add(L->b0, nc_quad_mul(g0, e0)); L->b1 = nc_quad_add(L->b1, nc_quad_mul(g1, e1));
    L->b2 = nc_quad_add(L->b2, nc_quad_mul(g2, e2)); L->b3 = nc_quad_add(L->b3, nc_quad_mul(g3, e3));
}

/* The folded sums of the lanes, in row_ops.h's fixed tree. */
NC_INLINE void nc_lanes_fold(const nc_lanes *L, double *a, double *b)
{
    double va[NC_LANES], vb[NC_LANES];
    nc_quad_store(va, L->a0); nc_quad_store(va + 4, L->a1);
    nc_quad_store(va + 8, L->a2); nc_quad_store(va + 12, L->a3);
    nc_quad_store(vb, L->b0); nc_quad_store(vb + 4, L->b1);
    nc_quad_store(vb + 8, L->b2); nc_quad_store(vb + 12, L->b3);
    *a = nc_fold_lanes(va);
    *b = nc_fold_lanes(vb);
}

/* BatchNorm's combine for one channel's backward, from its sums over (N, L) (M values):
 * dweight = sum(dy * (x - mean)) * rstd and the apply's coefficients. With batch statistics
 * dx = a * dy + b * (x - mean) + c, a = rstd * w and b, c of row_ops.h's nc_bwd_coeffs on
 * g = w * dy; with given ones (constants) b = c = 0 and center 0: dx = a * dy exactly. */
NC_INLINE void nc_channel_bwd_combine(double rstd, double w, double mean, double sum_dy, double sum_dy_xc,
                                      double M, int batch_stats, double *dweight, double *a, double *b,
                                      double *c, double *center)
{
    *dweight = sum_dy_xc * rstd;
    *a = rstd * w;
    if (batch_stats) {
        nc_bwd_coeffs(rstd, w * sum_dy, w * sum_dy_xc, M, b, c);
        *center = mean;
    } else {
        *b = 0.0;
        *c = 0.0;
        *center = 0.0;
    }
}

#define T float
#define NC_NAME(name) name##_f32
#include "channel_ops_impl.h"
#undef T
#undef NC_NAME

#define T double
#define NC_NAME(name) name##_f64
#include "channel_ops_impl.h"
#undef T
#undef NC_NAME

#endif
