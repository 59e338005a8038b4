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
 * plain C loops, compiled for each instruction set: dispatch.h), and a block never
 * depends on the thread count: the bits are the same on every variant and any thread count.
 *
 * Moments are shifted by the block's first value k (S = sum(x - k), Q = sum((x - k)^2),
 * M2 = Q - S^2/n), with the bound of row_ops.h: k is a value of the block, so the cancellation
 * costs at most a factor n <= NC_BLOCK of float64 rounding. Blocks are merged with Chan's
 * formula by the caller, in block order.
 *
 * The functions are instantiated for float and double from channel_ops_impl.h, the quads and
 * lanes they sum in are row_ops.h's.
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

#define NC_TEMPLATE "channel_ops_impl.h"
#include "for_each_type.h"
#undef NC_TEMPLATE

#endif
