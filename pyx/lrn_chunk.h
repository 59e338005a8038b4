/* LocalResponseNorm on one chunk: one sample, wn (<= W) contiguous spatial positions, all C
 * channels (included by pyx/lrn.pxi, which cuts the work into chunks and runs them in
 * parallel).
 *
 * Window sums across channels without subtraction (van Herk / Gil-Werman): with padded channel
 * index p = c + start (zeros outside [0, C)) and blocks of `size` padded positions,
 *     window(c) = [c, c + size - 1] (padded) = suffix(c) + prefix(c + size - 1)
 * where prefix / suffix are sums from the block's start to p and from p to the block's end
 * (prefix(c + size - 1) is taken as 0 when c starts a block). Each window sum is a sum of at
 * most `size` terms, never a running sum with subtractions: nothing drifts along the channels.
 * The prefix sums of a chunk are kept ([P][W], P = C + size - 1); the suffix sums are one
 * rolling row, consumed as the channels are walked down, where the outputs are made.
 *
 * Sums are in double. The power s^-beta is taken in type PT: float for float32 data (a few
 * float32 ulps, below the data's own precision; float sqrt and division run on twice the lanes),
 * double for float64 data. beta = 0.75 and 0.5 use sqrt and one division instead of pow. In
 * float, s^-beta and s^(-beta-1) are normal numbers only for s in [2^-72, 2^72]: a chunk in
 * which any s lies outside (or is NaN) is computed again with PT = double (the _wide
 * functions), so the float path changes the speed, never the range of correct results (a
 * general beta goes through pow in double anyway, and its backward through _wide). Chunks
 * are cut by shape alone, so this too is the same for any thread count.
 * Every loop over w treats each position on its own, so results depend neither on W nor on how
 * chunks are given to threads.
 */
#ifndef NORMCORE_LRN_CHUNK_H
#define NORMCORE_LRN_CHUNK_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "dispatch.h"

enum { NC_POW_GENERAL = 0, NC_POW_075 = 1, NC_POW_05 = 2 };

/* 1 for an s (a double, rounded to float as the float path sees it) outside [2^-72, 2^72], where
 * s^-1.75 and s^-1.5 leave float's normal range [2^-126, 2^127]; also for zero, negatives,
 * infinities and NaN. The float's bits are compared as one unsigned range, so a loop that ORs
 * this vectorises (a reduction of float compares does not). */
#define NC_LRN_FLOAT_SMIN_BITS 0x1b800000u /* 2^-72 as float */
#define NC_LRN_FLOAT_SMAX_BITS 0x63800000u /* 2^72 as float */

static inline uint32_t nc_lrn_outside_float_range(double s)
{
    const float sf = (float)s;
    uint32_t bits;
    memcpy(&bits, &sf, sizeof bits);
    return bits - NC_LRN_FLOAT_SMIN_BITS > NC_LRN_FLOAT_SMAX_BITS - NC_LRN_FLOAT_SMIN_BITS;
}

static inline int nc_pow_mode(double beta)
{
    return beta == 0.75 ? NC_POW_075 : (beta == 0.5 ? NC_POW_05 : NC_POW_GENERAL);
}

/* Doubles of scratch a chunk of width W needs. */
static inline ptrdiff_t nc_lrn_scratch_forward(ptrdiff_t C, ptrdiff_t size, ptrdiff_t W)
{
    return (C + size) * W + W;       /* prefix rows, a zero row, the suffix row */
}

static inline ptrdiff_t nc_lrn_scratch_backward(ptrdiff_t C, ptrdiff_t size, ptrdiff_t W)
{
    return (C + size) * W + W + 2 * C * W;   /* + s^-beta and u for every channel (as doubles: wide too) */
}

/* The variants: (storage T, power type PT, its SQRT, whether PT needs the range check, the
 * variant a chunk falls back to, suffix). f32_wide: float data with the power in double, for the
 * chunks outside the float path's range (and for nothing else); it comes first, as the
 * fallback of f32. */
#define NC_TEMPLATE "lrn_chunk_impl.h"
#define T float
#define PT double
#define SQRT sqrt
#define CHECK_RANGE 0
#define WIDE f32_wide
#define NC_SFX f32_wide
#include "for_each_isa.h"
#undef PT
#undef SQRT
#undef CHECK_RANGE
#undef NC_SFX
#define PT float
#define SQRT sqrtf
#define CHECK_RANGE 1
#define NC_SFX f32
#include "for_each_isa.h"
#undef T
#undef PT
#undef SQRT
#undef CHECK_RANGE
#undef WIDE
#undef NC_SFX
#define T double
#define PT double
#define SQRT sqrt
#define CHECK_RANGE 0
#define WIDE f64
#define NC_SFX f64
#include "for_each_isa.h"
#undef T
#undef PT
#undef SQRT
#undef CHECK_RANGE
#undef WIDE
#undef NC_SFX
#undef NC_TEMPLATE

#endif
