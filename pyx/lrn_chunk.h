/* LocalResponseNorm on one chunk: one sample, wn (<= W) contiguous spatial positions, all C
 * channels (included by pyx/lrn.pyx, which cuts the work into chunks and runs them in
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

#include "multiversion.h"

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

/* Element-wise pieces, PT the type of the power. */
#define NC_POW(PT, SQRT, mode, s, beta, pw)                                                          \
    do {                                                                                              \
        if ((mode) == NC_POW_075) { const PT r_ = (PT)1 / SQRT(s); (pw) = r_ * SQRT(r_); }            \
        else if ((mode) == NC_POW_05) { (pw) = (PT)1 / SQRT(s); }                                     \
        else { (pw) = (PT)pow((double)(s), -(beta)); }                                                \
    } while (0)

#define NC_DEFINE_LRN(T, PT, SQRT, CHECK_RANGE, WIDE, SUFFIX)                                                           \
/* rows[p] = prefix sums within blocks of `size` of v(p - start), p in [0, P); v(j) = SQ ? x_j^2 : x_j */ \
static inline void nc_lrn_prefix_##SUFFIX(const T *x, ptrdiff_t stride, const PT *u, int squares, \
                                          ptrdiff_t C, ptrdiff_t wn, ptrdiff_t W, ptrdiff_t size,    \
                                          ptrdiff_t start, double *restrict rows)                    \
{                                                                                                     \
    const ptrdiff_t P = C + size - 1;                                                                 \
    for (ptrdiff_t p = 0; p < P; p++) {                                                               \
        const ptrdiff_t j = p - start;                                                                \
        double *restrict row = rows + p * W;                                                          \
        const int first = p % size == 0;                                                              \
        const double *restrict prev = first ? row : row - W;                                          \
        if (j < 0 || j >= C) {                                                                        \
            if (first) for (ptrdiff_t w = 0; w < wn; w++) row[w] = 0.0;                               \
            else       for (ptrdiff_t w = 0; w < wn; w++) row[w] = prev[w];                           \
        } else if (squares) {                                                                         \
            const T *restrict xj = x + j * stride;                                                    \
            if (first) for (ptrdiff_t w = 0; w < wn; w++) row[w] = (double)xj[w] * (double)xj[w];     \
            else for (ptrdiff_t w = 0; w < wn; w++) row[w] = prev[w] + (double)xj[w] * (double)xj[w]; \
        } else {                                                                                      \
            const PT *restrict uj = u + j * W;                                                        \
            if (first) for (ptrdiff_t w = 0; w < wn; w++) row[w] = (double)uj[w];                     \
            else       for (ptrdiff_t w = 0; w < wn; w++) row[w] = prev[w] + (double)uj[w];           \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* suf <- suffix sum at padded p (restarting at a block's end) */                                     \
static inline void nc_lrn_suffix_##SUFFIX(const T *x, ptrdiff_t stride, const PT *u, int squares, \
                                          ptrdiff_t C, ptrdiff_t wn, ptrdiff_t W, ptrdiff_t size,    \
                                          ptrdiff_t start, ptrdiff_t p, double *restrict suf)        \
{                                                                                                     \
    const ptrdiff_t j = p - start;                                                                    \
    const int restart = (p % size == size - 1) || p == C + size - 2;                                  \
    if (j < 0 || j >= C) {                                                                            \
        if (restart) for (ptrdiff_t w = 0; w < wn; w++) suf[w] = 0.0;                                 \
    } else if (squares) {                                                                             \
        const T *restrict xj = x + j * stride;                                                        \
        if (restart) for (ptrdiff_t w = 0; w < wn; w++) suf[w] = (double)xj[w] * (double)xj[w];       \
        else         for (ptrdiff_t w = 0; w < wn; w++) suf[w] += (double)xj[w] * (double)xj[w];      \
    } else {                                                                                          \
        const PT *restrict uj = u + j * W;                                                            \
        if (restart) for (ptrdiff_t w = 0; w < wn; w++) suf[w] = (double)uj[w];                       \
        else         for (ptrdiff_t w = 0; w < wn; w++) suf[w] += (double)uj[w];                      \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
NC_MULTIVERSION static void nc_lrn_forward_chunk_##SUFFIX(const T *x, T *y, ptrdiff_t stride,       \
                                                          ptrdiff_t C, ptrdiff_t wn, ptrdiff_t W,     \
                                                          ptrdiff_t size, double alpha, double beta, \
                                                          double k, double *scratch)                 \
{                                                                                                     \
    const ptrdiff_t P = C + size - 1, lo = size / 2;                                                  \
    const double scale = alpha / (double)size;                                                        \
    const int mode = nc_pow_mode(beta);                                                               \
    double *restrict pre = scratch;                 /* [P][W] */                                      \
    double *restrict zero = pre + P * W;            /* [W] */                                         \
    double *restrict suf = zero + W;                /* [W] */                                         \
    for (ptrdiff_t w = 0; w < wn; w++) zero[w] = 0.0;                                                 \
    nc_lrn_prefix_##SUFFIX(x, stride, NULL, 1, C, wn, W, size, lo, pre);                             \
    for (ptrdiff_t p = P - 1; p >= 0; p--) {                                                          \
        nc_lrn_suffix_##SUFFIX(x, stride, NULL, 1, C, wn, W, size, lo, p, suf);                      \
        if (p >= C) continue;                                                                         \
        const T *restrict xc = x + p * stride;                                                        \
        T *restrict yc = y + p * stride;                                                              \
        const double *restrict pe = (p % size == 0) ? zero : pre + (p + size - 1) * W;               \
        uint32_t outside = 0;                                                                         \
        if (mode == NC_POW_075) {                                                                     \
            for (ptrdiff_t w = 0; w < wn; w++) {                                                      \
                const double sd = k + scale * (suf[w] + pe[w]);                                       \
                PT pw; NC_POW(PT, SQRT, NC_POW_075, (PT)sd, beta, pw);                                \
                yc[w] = (T)(xc[w] * pw);                                                              \
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);                           \
            }                                                                                         \
        } else if (mode == NC_POW_05) {                                                               \
            for (ptrdiff_t w = 0; w < wn; w++) {                                                      \
                const double sd = k + scale * (suf[w] + pe[w]);                                       \
                PT pw; NC_POW(PT, SQRT, NC_POW_05, (PT)sd, beta, pw);                                 \
                yc[w] = (T)(xc[w] * pw);                                                              \
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);                           \
            }                                                                                         \
        } else {                                                                                      \
            for (ptrdiff_t w = 0; w < wn; w++)                                                        \
                yc[w] = (T)((double)xc[w] * pow(k + scale * (suf[w] + pe[w]), -beta));                \
        }                                                                                             \
        if (CHECK_RANGE && outside) {  /* beyond the float path's range: the chunk in double */       \
            nc_lrn_forward_chunk_##WIDE(x, y, stride, C, wn, W, size, alpha, beta, k, scratch);       \
            return;                                                                                   \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* dx_c = dy_c s_c^-beta - (2 alpha beta / size) x_c sum_{c' in [c - hi, c + lo]} u_c',            \
 * with u_c' = dy_c' x_c' s_c'^(-beta-1). */                                                         \
NC_MULTIVERSION static void nc_lrn_backward_chunk_##SUFFIX(const T *dy, const T *x, T *dx,          \
                                                           ptrdiff_t stride, ptrdiff_t C,            \
                                                           ptrdiff_t wn, ptrdiff_t W, ptrdiff_t size, \
                                                           double alpha, double beta, double k,      \
                                                           double *scratch)                          \
{                                                                                                     \
    const ptrdiff_t P = C + size - 1, lo = size / 2, hi = (size - 1) / 2;                             \
    const double scale = alpha / (double)size, coef = 2.0 * alpha * beta / (double)size;              \
    const int mode = nc_pow_mode(beta);                                                               \
    if (CHECK_RANGE && mode == NC_POW_GENERAL) {  /* pow is in double: keep s^-beta and u there */  \
        nc_lrn_backward_chunk_##WIDE(dy, x, dx, stride, C, wn, W, size, alpha, beta, k, scratch);     \
        return;                                                                                       \
    }                                                                                                 \
    double *restrict pre = scratch;                 /* [P][W] */                                      \
    double *restrict zero = pre + P * W;            /* [W] */                                         \
    double *restrict suf = zero + W;                /* [W] */                                         \
    PT *restrict pw = (PT *)(suf + W);              /* [C][W]: s_c^-beta */                           \
    PT *restrict u = pw + C * W;                    /* [C][W]: dy_c x_c s_c^(-beta-1) */              \
    for (ptrdiff_t w = 0; w < wn; w++) zero[w] = 0.0;                                                 \
    nc_lrn_prefix_##SUFFIX(x, stride, NULL, 1, C, wn, W, size, lo, pre);                             \
    for (ptrdiff_t p = P - 1; p >= 0; p--) {                                                          \
        nc_lrn_suffix_##SUFFIX(x, stride, NULL, 1, C, wn, W, size, lo, p, suf);                      \
        if (p >= C) continue;                                                                         \
        const T *restrict xc = x + p * stride;                                                        \
        const T *restrict gc = dy + p * stride;                                                       \
        PT *restrict pwc = pw + p * W;                                                                \
        PT *restrict uc = u + p * W;                                                                  \
        const double *restrict pe = (p % size == 0) ? zero : pre + (p + size - 1) * W;               \
        uint32_t outside = 0;                                                                         \
        if (mode == NC_POW_075) {                                                                     \
            for (ptrdiff_t w = 0; w < wn; w++) {                                                      \
                const double sd = k + scale * (suf[w] + pe[w]);                                       \
                const PT r = (PT)1 / SQRT((PT)sd);                                                    \
                const PT q = r * SQRT(r);                  /* s^-0.75 */                              \
                pwc[w] = q;                                                                           \
                uc[w] = (PT)gc[w] * (PT)xc[w] * (q * (r * r));                                        \
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);                           \
            }                                                                                         \
        } else if (mode == NC_POW_05) {                                                               \
            for (ptrdiff_t w = 0; w < wn; w++) {                                                      \
                const double sd = k + scale * (suf[w] + pe[w]);                                       \
                const PT r = (PT)1 / SQRT((PT)sd);                                                    \
                pwc[w] = r;                                                                           \
                uc[w] = (PT)gc[w] * (PT)xc[w] * (r * (r * r));                                        \
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);                           \
            }                                                                                         \
        } else {                                                                                      \
            for (ptrdiff_t w = 0; w < wn; w++) {                                                      \
                const double s = k + scale * (suf[w] + pe[w]);                                        \
                const double q = pow(s, -beta);                                                       \
                pwc[w] = (PT)q;                                                                       \
                uc[w] = (PT)((double)gc[w] * (double)xc[w] * (q / s));                                \
            }                                                                                         \
        }                                                                                             \
        if (CHECK_RANGE && outside) {  /* beyond the float path's range: the chunk in double */       \
            nc_lrn_backward_chunk_##WIDE(dy, x, dx, stride, C, wn, W, size, alpha, beta, k, scratch); \
            return;                                                                                   \
        }                                                                                             \
    }                                                                                                 \
    /* the same window sums over u, reversed: the channels whose window holds c */                    \
    nc_lrn_prefix_##SUFFIX(x, stride, u, 0, C, wn, W, size, hi, pre);                                \
    for (ptrdiff_t p = P - 1; p >= 0; p--) {                                                          \
        nc_lrn_suffix_##SUFFIX(x, stride, u, 0, C, wn, W, size, hi, p, suf);                         \
        if (p >= C) continue;                                                                         \
        const T *restrict xc = x + p * stride;                                                        \
        const T *restrict gc = dy + p * stride;                                                       \
        const PT *restrict pwc = pw + p * W;                                                          \
        T *restrict dxc = dx + p * stride;                                                            \
        const double *restrict pe = (p % size == 0) ? zero : pre + (p + size - 1) * W;               \
        for (ptrdiff_t w = 0; w < wn; w++)                                                            \
            dxc[w] = (T)((double)gc[w] * (double)pwc[w] - coef * (double)xc[w] * (suf[w] + pe[w]));   \
    }                                                                                                 \
}

/* (storage, power type, its sqrt, whether the power type needs the range check, the variant a
 * chunk falls back to, suffix). f32_wide: float data with the power in double, for the chunks
 * outside the float path's range (and for nothing else). */
NC_DEFINE_LRN(float, double, sqrt, 0, f32_wide, f32_wide)
NC_DEFINE_LRN(float, float, sqrtf, 1, f32_wide, f32)
NC_DEFINE_LRN(double, double, sqrt, 0, f64, f64)

#endif
