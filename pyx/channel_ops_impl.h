/* The functions of channel_ops.h for one element type T and one instruction set: NC_NAME(f) is f
 * with both suffixes (dispatch.h). Included by for_each_isa.h only, once per type and ISA, then
 * once more (NC_DISPATCH_PASS) to bind the entry points listed at the end. */
#ifndef NC_DISPATCH_PASS

/* p[0 .. 3] - sub as a quad, keeping only the first m lanes (m <= 0: none; m >= 4: all) and
 * +0 in the others; reads only the values it keeps. */
NC_INLINE nc_quad NC_NAME(nc_quad_tail)(const T *p, ptrdiff_t m, double sub)
{
    if (m >= 4)
        return nc_quad_sub(NC_TYPED(nc_quad_load)(p), nc_quad_set1(sub));
    if (m <= 0)
        return nc_quad_set1(0.0);
    return nc_quad_make((double)p[0] - sub, m > 1 ? (double)p[1] - sub : 0.0, m > 2 ? (double)p[2] - sub : 0.0, 0.0);
}

/* Moments of a block: the rows n0 .. n1-1 (n1 > n0) of channel c, rows of L values (L >= 1,
 * (n1 - n0) * L <= NC_BLOCK), of x as [N, C, L]. (OUT: mean, m2) */
NC_ENTRY void NC_NAME(nc_channel_block_moments)(const T *x, ptrdiff_t C, ptrdiff_t L,
                                                             ptrdiff_t c, ptrdiff_t n0, ptrdiff_t n1,
                                                             double *mean, double *m2)
{
    const T *row = x + (n0 * C + c) * L;
    const double k = (double)row[0];
    const nc_quad k4 = nc_quad_set1(k);
    const ptrdiff_t L16 = L - L % NC_LANES, tail = L - L16;
    nc_lanes acc;
    nc_lanes_zero(&acc);
    for (ptrdiff_t n = n0; n < n1; n++, row += C * L) {
        for (ptrdiff_t j = 0; j < L16; j += NC_LANES)
            nc_lanes_moments(&acc, nc_quad_sub(NC_TYPED(nc_quad_load)(row + j), k4),
                             nc_quad_sub(NC_TYPED(nc_quad_load)(row + j + 4), k4),
                             nc_quad_sub(NC_TYPED(nc_quad_load)(row + j + 8), k4),
                             nc_quad_sub(NC_TYPED(nc_quad_load)(row + j + 12), k4));
        if (tail) {
            /* the tail's values x - k in lanes 0 .. tail-1; the others add +0 to lanes that
             * started at +0, which changes no bit */
            const T *p = row + L16;
            nc_lanes_moments(&acc, NC_NAME(nc_quad_tail)(p, tail, k), NC_NAME(nc_quad_tail)(p + 4, tail - 4, k),
                             NC_NAME(nc_quad_tail)(p + 8, tail - 8, k), NC_NAME(nc_quad_tail)(p + 12, tail - 12, k));
        }
    }
    const double count = (double)((n1 - n0) * L);
    double S, Q;
    nc_lanes_fold(&acc, &S, &Q);
    *mean = k + S / count;
    const double v = Q - S * (S / count);
    *m2 = v < 0.0 ? 0.0 : v; /* clamps rounding below 0; NaN passes through */
}

/* Gradient sums of a block (as above): sum(dy) and sum(dy * (x - center)). */
NC_INLINE void NC_NAME(nc_chblk_grad_sums)(const T *x, const T *dy, ptrdiff_t C, ptrdiff_t L, ptrdiff_t c,
                                           ptrdiff_t n0, ptrdiff_t n1, double center, double *sum_dy,
                                           double *sum_dy_xc)
{
    const ptrdiff_t first = (n0 * C + c) * L;
    const T *xr = x + first, *gr = dy + first;
    const nc_quad c4 = nc_quad_set1(center);
    const ptrdiff_t L16 = L - L % NC_LANES, tail = L - L16;
    nc_lanes acc;
    nc_lanes_zero(&acc);
    for (ptrdiff_t n = n0; n < n1; n++, xr += C * L, gr += C * L) {
        for (ptrdiff_t j = 0; j < L16; j += NC_LANES)
            nc_lanes_grad(&acc, NC_TYPED(nc_quad_load)(gr + j), NC_TYPED(nc_quad_load)(gr + j + 4),
                          NC_TYPED(nc_quad_load)(gr + j + 8), NC_TYPED(nc_quad_load)(gr + j + 12),
                          nc_quad_sub(NC_TYPED(nc_quad_load)(xr + j), c4),
                          nc_quad_sub(NC_TYPED(nc_quad_load)(xr + j + 4), c4),
                          nc_quad_sub(NC_TYPED(nc_quad_load)(xr + j + 8), c4),
                          nc_quad_sub(NC_TYPED(nc_quad_load)(xr + j + 12), c4));
        if (tail) {
            /* missing lanes: g = e = 0, which add +0 */
            const T *g = gr + L16, *e = xr + L16;
            nc_lanes_grad(&acc, NC_NAME(nc_quad_tail)(g, tail, 0.0), NC_NAME(nc_quad_tail)(g + 4, tail - 4, 0.0),
                          NC_NAME(nc_quad_tail)(g + 8, tail - 8, 0.0), NC_NAME(nc_quad_tail)(g + 12, tail - 12, 0.0),
                          NC_NAME(nc_quad_tail)(e, tail, center), NC_NAME(nc_quad_tail)(e + 4, tail - 4, center),
                          NC_NAME(nc_quad_tail)(e + 8, tail - 8, center),
                          NC_NAME(nc_quad_tail)(e + 12, tail - 12, center));
        }
    }
    nc_lanes_fold(&acc, sum_dy, sum_dy_xc);
}

NC_ENTRY void NC_NAME(nc_channel_block_grad_sums)(const T *x, const T *dy, ptrdiff_t C,
                                                               ptrdiff_t L, ptrdiff_t c, ptrdiff_t n0,
                                                               ptrdiff_t n1, double center,
                                                               double *sum_dy, double *sum_dy_xc)
{ NC_NAME(nc_chblk_grad_sums)(x, dy, C, L, c, n0, n1, center, sum_dy, sum_dy_xc); }

/* BatchNorm's whole backward for channel c of x, dy, dx [N, C, L] (L <= NC_BLOCK) while the
 * channel sits in cache: its gradient sums block by block (blocks of NC_BLOCK / L rows, added
 * in order), nc_channel_bwd_combine, then dx of its rows (dx may be dy itself). The same steps
 * as the separate passes (nc_channel_block_grad_sums, then nc_apply_rows_bwd_range): the same
 * bits. (OUT: dx of the channel's rows, *dweight, *dbias) */
NC_ENTRY void NC_NAME(nc_channel_backward)(const T *x, const T *dy, T *dx, ptrdiff_t N,
                                                        ptrdiff_t C, ptrdiff_t L, ptrdiff_t c, double w,
                                                        double mean, double rstd, int batch_stats,
                                                        double *dweight, double *dbias)
{
    const ptrdiff_t per = NC_BLOCK / L;
    double s = 0.0, u = 0.0;
    for (ptrdiff_t n0 = 0; n0 < N; n0 += per) {
        double bs, bu;
        NC_NAME(nc_chblk_grad_sums)(x, dy, C, L, c, n0, N - n0 < per ? N : n0 + per, mean, &bs, &bu);
        s = s + bs;
        u = u + bu;
    }
    double a, b, cc, center;
    nc_channel_bwd_combine(rstd, w, mean, s, u, (double)(N * L), batch_stats, dweight, &a, &b, &cc, &center);
    *dbias = s;
    const T *xa = batch_stats ? x : dy; /* given statistics: dx = a * dy reads no x */
    for (ptrdiff_t n = 0; n < N; n++) {
        const ptrdiff_t off = (n * C + c) * L;
        NC_NAME(nc_apply_bwd)(dy + off, xa + off, dx + off, L, center, a, b, cc);
    }
}

/* dx = a * dy + (b * (x - center) + c) on rows r0 .. r1-1 of L (dy, x, dx point at row 0), the
 * coefficients of row r at [r % period]: row_ops.h's backward apply, one call for many rows. */
NC_ENTRY void NC_NAME(nc_apply_rows_bwd_range)(const T *dy, const T *x, T *dx, ptrdiff_t r0,
                                                            ptrdiff_t r1, ptrdiff_t L, ptrdiff_t period,
                                                            const double *center, const double *a,
                                                            const double *b, const double *c)
{
    ptrdiff_t p = r0 % period;
    for (ptrdiff_t r = r0; r < r1; r++) {
        NC_NAME(nc_apply_bwd)(dy + r * L, x + r * L, dx + r * L, L, center[p], a[p], b[p], c[p]);
        if (++p == period)
            p = 0;
    }
}

#else /* NC_DISPATCH_PASS */
NC_DISPATCH(nc_channel_block_moments)
NC_DISPATCH(nc_channel_block_grad_sums)
NC_DISPATCH(nc_channel_backward)
NC_DISPATCH(nc_apply_rows_bwd_range)
#endif
