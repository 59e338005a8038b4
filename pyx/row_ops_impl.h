/* The row kernels of row_ops.h for one element type T and one instruction set: NC_NAME(f) is f
 * with both suffixes (dispatch.h). Included by for_each_isa.h only, once per type and ISA, then
 * once more (NC_DISPATCH_PASS) to bind the entry points listed at the end. */
#ifndef NC_DISPATCH_PASS

/* ---- Block sums: 16 lanes as four quads (row_ops.h), element i of each step of 16 in lane
 * i % 16, the tail (n % 16 values) in lanes 0 .. in order, folded in a fixed tree. ---------- */

/* Moments of n16 values (a multiple of 16), the lanes continuing from *st. Not inlined, and the
 * lanes taken into eight local quads: inside the large pipelined kernels the register allocator
 * kept two of the accumulators in memory (the AVX-512 variant did), and a sum through memory is
 * bound by store forwarding, a third slower there. */
NC_NOINLINE void NC_NAME(nc_blk_moments_part)(const T *x, ptrdiff_t n16, nc_mom_state *st)
{
    const nc_quad k4 = nc_quad_set1(st->k);
    nc_lanes *L = &st->acc;
    nc_quad a0 = L->a0, a1 = L->a1, a2 = L->a2, a3 = L->a3;
    nc_quad b0 = L->b0, b1 = L->b1, b2 = L->b2, b3 = L->b3;
    for (ptrdiff_t i = 0; i < n16; i += NC_LANES) {
        const nc_quad d0 = nc_quad_sub(NC_TYPED(nc_quad_load)(x + i), k4);
        const nc_quad d1 = nc_quad_sub(NC_TYPED(nc_quad_load)(x + i + 4), k4);
        const nc_quad d2 = nc_quad_sub(NC_TYPED(nc_quad_load)(x + i + 8), k4);
        const nc_quad d3 = nc_quad_sub(NC_TYPED(nc_quad_load)(x + i + 12), k4);
        a0 = nc_quad_add(a0, d0); a1 = nc_quad_add(a1, d1);
        a2 = nc_quad_add(a2, d2); a3 = nc_quad_add(a3, d3);
        b0 = nc_quad_add(b0, nc_quad_mul(d0, d0)); b1 = nc_quad_add(b1, nc_quad_mul(d1, d1));
        b2 = nc_quad_add(b2, nc_quad_mul(d2, d2)); b3 = nc_quad_add(b3, nc_quad_mul(d3, d3));
    }
    L->a0 = a0; L->a1 = a1; L->a2 = a2; L->a3 = a3;
    L->b0 = b0; L->b1 = b1; L->b2 = b2; L->b3 = b3;
}

/* The block's last ntail < 16 values (x points at them) and the result, for a block of n. */
NC_INLINE void NC_NAME(nc_blk_moments_finish)(const T *x, ptrdiff_t ntail, ptrdiff_t n,
                                              nc_mom_state *st, double *mean, double *m2)
{
    const double k = st->k;
    double s[NC_LANES], q[NC_LANES];
    for (ptrdiff_t l = 0; l < ntail; l++) {
        const double d = (double)x[l] - k;
        s[l] = d;
        q[l] = d * d;
    }
    double S, Q;
    nc_lanes_fold_tail(&st->acc, s, q, ntail, &S, &Q);
    *mean = k + S / (double)n;
    const double m = Q - S * (S / (double)n);
    *m2 = m < 0.0 ? 0.0 : m; /* clamps rounding below 0; NaN passes through */
}

/* Mean and M2 of one block of n >= 1 values. */
NC_INLINE void NC_NAME(nc_blk_moments)(const T *x, ptrdiff_t n, double *mean, double *m2)
{
    nc_mom_state st;
    const ptrdiff_t n16 = n - n % NC_LANES;
    nc_mom_init(&st, (double)x[0]);
    NC_NAME(nc_blk_moments_part)(x, n16, &st);
    NC_NAME(nc_blk_moments_finish)(x + n16, n - n16, n, &st, mean, m2);
}

/* sum(g) and sum(g * (x - center)) of a block of n values, g = w * dy (w NULL: g = dy). */
NC_INLINE void NC_NAME(nc_blk_gsums)(const T *x, const T *dy, const T *w, ptrdiff_t n,
                                     double center, double *sum_g, double *sum_g_xc)
{
    const nc_quad c4 = nc_quad_set1(center);
    nc_lanes acc;
    nc_lanes_zero(&acc);
    ptrdiff_t i = 0;
    for (; i + NC_LANES <= n; i += NC_LANES) {
        nc_quad g[4];
        for (int j = 0; j < 4; j++) {
            g[j] = NC_TYPED(nc_quad_load)(dy + i + 4 * j);
            if (w)
                g[j] = nc_quad_mul(NC_TYPED(nc_quad_load)(w + i + 4 * j), g[j]);
        }
        nc_lanes_grad(&acc, g[0], g[1], g[2], g[3],
                      nc_quad_sub(NC_TYPED(nc_quad_load)(x + i), c4),
                      nc_quad_sub(NC_TYPED(nc_quad_load)(x + i + 4), c4),
                      nc_quad_sub(NC_TYPED(nc_quad_load)(x + i + 8), c4),
                      nc_quad_sub(NC_TYPED(nc_quad_load)(x + i + 12), c4));
    }
    double s[NC_LANES], t[NC_LANES];
    for (int l = 0; i + l < n; l++) {
        const double g = w ? (double)w[i + l] * (double)dy[i + l] : (double)dy[i + l];
        s[l] = g;
        t[l] = g * ((double)x[i + l] - center);
    }
    nc_lanes_fold_tail(&acc, s, t, n - i, sum_g, sum_g_xc);
}

NC_INLINE void NC_NAME(nc_blk_grad_sums)(const T *x, const T *dy, ptrdiff_t n, double center,
                                         double *sum_dy, double *sum_dy_xc)
{
    NC_NAME(nc_blk_gsums)(x, dy, NULL, n, center, sum_dy, sum_dy_xc);
}

NC_INLINE void NC_NAME(nc_blk_grad_sums_w)(const T *x, const T *dy, const T *w, ptrdiff_t n,
                                           double center, double *sum_wdy, double *sum_wdy_xc)
{
    NC_NAME(nc_blk_gsums)(x, dy, w, n, center, sum_wdy, sum_wdy_xc);
}

/* ---- Runs, applies and the kernels' entry points ------------------------------------------ */
/* (mean, M2) of a run of n >= 1 values: blocks of NC_BLOCK merged in order. */
NC_INLINE void NC_NAME(nc_run_moments)(const T *x, ptrdiff_t n, double *mean, double *m2)
{
    double na = 0.0, mu = 0.0, q = 0.0;
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;
        double bm, bq;
        NC_NAME(nc_blk_moments)(x + b, len, &bm, &bq);
        nc_merge_step(&na, &mu, &q, (double)len, bm, bq);
    }
    *mean = mu;
    *m2 = q;
}

/* Gradient sums of a run: block sums added in order. */
NC_INLINE void NC_NAME(nc_run_grad_sums)(const T *x, const T *dy, ptrdiff_t n, double center,
                                      double *sum_dy, double *sum_dy_xc)
{
    double s = 0.0, t = 0.0;
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;
        double bs, bt;
        NC_NAME(nc_blk_grad_sums)(x + b, dy + b, len, center, &bs, &bt);
        if (b == 0) { s = bs; t = bt; } else { s += bs; t += bt; }
    }
    *sum_dy = s;
    *sum_dy_xc = t;
}

NC_INLINE void NC_NAME(nc_run_grad_sums_w)(const T *x, const T *dy, const T *w, ptrdiff_t n,
                                        double center, double *sum_wdy, double *sum_wdy_xc)
{
    double s = 0.0, t = 0.0;
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;
        double bs, bt;
        NC_NAME(nc_blk_grad_sums_w)(x + b, dy + b, w + b, len, center, &bs, &bt);
        if (b == 0) { s = bs; t = bt; } else { s += bs; t += bt; }
    }
    *sum_wdy = s;
    *sum_wdy_xc = t;
}

/* y = ((x - hi) - lo) * scale + shift in T, center = hi + lo. */
NC_INLINE void NC_NAME(nc_apply)(const T *x, T *y, ptrdiff_t n, double center, double scale,
                              double shift)
{
    const T hi = (T)center, lo = (T)(center - (double)hi);
    const T s = (T)scale, b = (T)shift;
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = ((x[i] - hi) - lo) * s + b;
}

/* dx = a * dy + (b * (x - center) + c), in double, rounded once. With b = c = 0 (statistics
 * that are constants: eval) dx = a * dy exactly, reading no x: an infinite dy stays infinite
 * (0 * inf would make it NaN) and a NaN in x cannot reach dx. */
NC_INLINE void NC_NAME(nc_apply_bwd)(const T *dy, const T *x, T *dx, ptrdiff_t n, double center,
                                  double a, double b, double c)
{
    if (b == 0.0 && c == 0.0) {
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] = (T)(a * (double)dy[i]);
        return;
    }
    for (ptrdiff_t i = 0; i < n; i++)
        dx[i] = (T)(a * (double)dy[i] + (b * ((double)x[i] - center) + c));
}

/* y[j] = (((x[j] - hi) - lo) * scale) * w[j] + bias[j]   (bias NULL: no shift). */
NC_INLINE void NC_NAME(nc_apply_cols)(const T *x, T *y, ptrdiff_t n, double center, double scale,
                                   const T *w, const T *bias)
{
    const T hi = (T)center, lo = (T)(center - (double)hi);
    const T s = (T)scale;
    if (bias) {
        for (ptrdiff_t j = 0; j < n; j++)
            y[j] = (((x[j] - hi) - lo) * s) * w[j] + bias[j];
    } else {
        for (ptrdiff_t j = 0; j < n; j++)
            y[j] = (((x[j] - hi) - lo) * s) * w[j];
    }
}

/* dx[j] = a * (w[j] * dy[j]) + (b * (x[j] - center) + c), in double, rounded once. */
NC_INLINE void NC_NAME(nc_apply_cols_bwd)(const T *dy, const T *x, T *dx, ptrdiff_t n,
                                       double center, double a, double b, double c,
                                       const T *w)
{
    for (ptrdiff_t j = 0; j < n; j++)
        dx[j] = (T)(a * ((double)w[j] * (double)dy[j]) + (b * ((double)x[j] - center) + c));
}

/* ---- entry points (one variant per instruction set, bound by NC_DISPATCH below) ---- */

NC_ENTRY void NC_NAME(nc_block_moments)(const T *x, ptrdiff_t n, double *mean,
                                                   double *m2)
{ NC_NAME(nc_blk_moments)(x, n, mean, m2); }

NC_ENTRY void NC_NAME(nc_block_grad_sums)(const T *x, const T *dy, ptrdiff_t n,
                                                     double center, double *s, double *t)
{ NC_NAME(nc_blk_grad_sums)(x, dy, n, center, s, t); }

NC_ENTRY void NC_NAME(nc_block_grad_sums_weighted)(const T *x, const T *dy,
                                                              const T *w, ptrdiff_t n,
                                                              double center, double *s,
                                                              double *t)
{ NC_NAME(nc_blk_grad_sums_w)(x, dy, w, n, center, s, t); }

NC_ENTRY void NC_NAME(nc_apply_rows)(const T *x, T *y, ptrdiff_t n, double center,
                                                double scale, double shift)
{ NC_NAME(nc_apply)(x, y, n, center, scale, shift); }

NC_ENTRY void NC_NAME(nc_apply_rows_bwd)(const T *dy, const T *x, T *dx,
                                                    ptrdiff_t n, double center, double a,
                                                    double b, double c)
{ NC_NAME(nc_apply_bwd)(dy, x, dx, n, center, a, b, c); }

/* Rows r0 .. r1-1 of L (x, y point at row 0), row r with coefficients [r % period]: one call
 * for many short rows (the channel index is counted, not divided). */
NC_ENTRY void NC_NAME(nc_apply_rows_range)(const T *x, T *y, ptrdiff_t r0, ptrdiff_t r1,
                                                      ptrdiff_t L, ptrdiff_t period,
                                                      const double *center,
                                                      const double *scale,
                                                      const double *shift)
{
    ptrdiff_t p = r0 % period;
    for (ptrdiff_t r = r0; r < r1; r++) {
        NC_NAME(nc_apply)(x + r * L, y + r * L, L, center[p], scale[p], shift[p]);
        if (++p == period)
            p = 0;
    }
}

/* One group, backward with the group's own statistics: per-row sums centered on its mean,
 * then dx = a * dy + b * (x - mean) + c with a = rstd * w[c],
 * b = -rstd^3 * sum(w * dy * (x - mean)) / M, c = -rstd * sum(w * dy) / M (M = k * L).
 * sdy[j], sdyxc[j]: the rows' sums (for the parameter gradients). */
NC_ENTRY void NC_NAME(nc_group_backward)(const T *x, const T *dy, T *dx, ptrdiff_t k,
                                                    ptrdiff_t L, ptrdiff_t c0, ptrdiff_t C,
                                                    const double *w, double mean, double rstd,
                                                    double *sdy, double *sdyxc)
{
    double s1 = 0.0, s2 = 0.0;
    const ptrdiff_t cf = c0 % C; /* channels counted, not divided, from row to row */
    ptrdiff_t ch = cf;
    for (ptrdiff_t j = 0; j < k; j++) {
        NC_NAME(nc_run_grad_sums)(x + j * L, dy + j * L, L, mean, &sdy[j], &sdyxc[j]);
        const double wc = w[ch];
        s1 += wc * sdy[j];
        s2 += wc * sdyxc[j];
        if (++ch == C)
            ch = 0;
    }
    double b, c;
    nc_bwd_coeffs(rstd, s1, s2, (double)(k * L), &b, &c);
    ch = cf;
    for (ptrdiff_t j = 0; j < k; j++) {
        const double a = rstd * w[ch];
        NC_NAME(nc_apply_bwd)(dy + j * L, x + j * L, dx + j * L, L, mean, a, b, c);
        if (++ch == C)
            ch = 0;
    }
}

/* Column sums of nq <= NC_QUAD consecutive rows, added to acc_w, acc_b in one step per column:
 * t_i = dy_i * ((x_i - mean_i) * rstd_i); acc_w += ((t0 + t1) + (t2 + t3)) (missing rows left
 * out of the same tree), acc_b likewise with dy_i. */
NC_INLINE void NC_NAME(nc_col_sums)(const T *x, const T *dy, ptrdiff_t nq, ptrdiff_t S,
                                 ptrdiff_t L, const double *mean, const double *rstd,
                                 double *acc_w, double *acc_b)
{
    /* rows of stride S, columns 0 .. L-1 of them */
    if (nq == NC_QUAD) {
        const T *x0 = x, *x1 = x + S, *x2 = x + 2 * S, *x3 = x + 3 * S;
        const T *g0 = dy, *g1 = dy + S, *g2 = dy + 2 * S, *g3 = dy + 3 * S;
        const double m0 = mean[0], m1 = mean[1], m2 = mean[2], m3 = mean[3];
        const double s0 = rstd[0], s1 = rstd[1], s2 = rstd[2], s3 = rstd[3];
        for (ptrdiff_t j = 0; j < L; j++) {
            const double t0 = (double)g0[j] * (((double)x0[j] - m0) * s0);
            const double t1 = (double)g1[j] * (((double)x1[j] - m1) * s1);
            const double t2 = (double)g2[j] * (((double)x2[j] - m2) * s2);
            const double t3 = (double)g3[j] * (((double)x3[j] - m3) * s3);
            acc_w[j] += (t0 + t1) + (t2 + t3);
            acc_b[j] += ((double)g0[j] + (double)g1[j]) + ((double)g2[j] + (double)g3[j]);
        }
        return;
    }
    for (ptrdiff_t j = 0; j < L; j++) {
        double tw = 0.0, tb = 0.0;
        for (ptrdiff_t i = 0; i < nq; i++) {
            const double g = (double)dy[i * S + j];
            const double t = g * (((double)x[i * S + j] - mean[i]) * rstd[i]);
            if (i == 0) { tw = t; tb = g; } else { tw += t; tb += g; }
        }
        acc_w[j] += tw;
        acc_b[j] += tb;
    }
}

/* One LayerNorm row's backward coefficients b, c from its sums of g = w * dy. */
NC_INLINE void NC_NAME(nc_layer_coeffs)(const T *xr, const T *gr, ptrdiff_t L, const T *w,
                                     double m, double rs, double *b, double *c)
{
    double s1, s2;
    if (w)
        NC_NAME(nc_run_grad_sums_w)(xr, gr, w, L, m, &s1, &s2);
    else
        NC_NAME(nc_run_grad_sums)(xr, gr, L, m, &s1, &s2);
    nc_bwd_coeffs(rs, s1, s2, (double)L, b, c);
}

/* dx of n values of a LayerNorm row (w: the row's weights from the same column, or NULL). */
NC_INLINE void NC_NAME(nc_layer_dx)(const T *gr, const T *xr, T *dxr, ptrdiff_t n, double m,
                                 double rs, double b, double c, const T *w)
{
    if (w)
        NC_NAME(nc_apply_cols_bwd)(gr, xr, dxr, n, m, rs, b, c, w);
    else
        NC_NAME(nc_apply_bwd)(gr, xr, dxr, n, m, rs, b, c);
}

/* The same LayerNorm backward as three separate steps, for few long rows (parallel over rows,
 * then over column blocks, then over pieces of rows): the same bits as nc_layer_backward with
 * r0 = 0 and r1 = R. */
NC_ENTRY void NC_NAME(nc_layer_row_coeffs)(const T *xr, const T *gr, ptrdiff_t L,
                                                      const T *w, double m, double rs,
                                                      double *b, double *c)
{ NC_NAME(nc_layer_coeffs)(xr, gr, L, w, m, rs, b, c); }

/* Column sums of rows 0 .. R-1 (stride L) over columns j0 .. j0+n-1, quads from row 0. */
NC_ENTRY void NC_NAME(nc_layer_col_sums)(const T *x, const T *dy, ptrdiff_t R,
                                                    ptrdiff_t L, ptrdiff_t j0, ptrdiff_t n,
                                                    const double *mean, const double *rstd,
                                                    double *acc_w, double *acc_b)
{
    for (ptrdiff_t j = 0; j < n; j++) { acc_w[j0 + j] = 0.0; acc_b[j0 + j] = 0.0; }
    for (ptrdiff_t q0 = 0; q0 < R; q0 += NC_QUAD) {
        const ptrdiff_t nq = R - q0 < NC_QUAD ? R - q0 : NC_QUAD;
        NC_NAME(nc_col_sums)(x + q0 * L + j0, dy + q0 * L + j0, nq, L, n, mean + q0, rstd + q0,
                          acc_w + j0, acc_b + j0);
    }
}

NC_ENTRY void NC_NAME(nc_layer_dx_piece)(const T *gr, const T *xr, T *dxr, ptrdiff_t n,
                                                    double m, double rs, double b, double c,
                                                    const T *w)
{ NC_NAME(nc_layer_dx)(gr, xr, dxr, n, m, rs, b, c, w); }

/* LayerNorm backward, rows r0 .. r1-1 of L (x, dy, dx point at row 0): per row the sums of
 * g = w * dy (w NULL: g = dy) centered on the row mean, then
 * dx = a * g + b * (x - mean) + c (a = rstd, b = -rstd^3 * sum(g * (x - mean)) / L,
 * c = -rstd * sum(g) / L); and the column sums of these rows (NULL: not wanted):
 * acc_w[j] = sum dy * ((x - mean) * rstd), acc_b[j] = sum dy, added NC_QUAD rows at a time
 * (((t0 + t1) + (t2 + t3)) per quad, quads in order from r0), which reads and writes the
 * accumulators a quarter as often as row by row. Rows are done a quad at a time while in
 * cache: sums, column sums, then dx (dx may be dy itself). */
NC_ENTRY void NC_NAME(nc_layer_backward)(const T *x, const T *dy, T *dx, ptrdiff_t r0,
                                                    ptrdiff_t r1, ptrdiff_t L, const T *w,
                                                    const double *mean, const double *rstd,
                                                    double *acc_w, double *acc_b)
{
    if (acc_w)
        for (ptrdiff_t j = 0; j < L; j++) { acc_w[j] = 0.0; acc_b[j] = 0.0; }
    for (ptrdiff_t q0 = r0; q0 < r1; q0 += NC_QUAD) {
        const ptrdiff_t nq = r1 - q0 < NC_QUAD ? r1 - q0 : NC_QUAD;
        double b[NC_QUAD], c[NC_QUAD];
        for (ptrdiff_t i = 0; i < nq; i++)
            NC_NAME(nc_layer_coeffs)(x + (q0 + i) * L, dy + (q0 + i) * L, L, w, mean[q0 + i],
                                  rstd[q0 + i], &b[i], &c[i]);
        if (acc_w)
            NC_NAME(nc_col_sums)(x + q0 * L, dy + q0 * L, nq, L, L, mean + q0, rstd + q0, acc_w,
                              acc_b);
        for (ptrdiff_t i = 0; i < nq; i++) {
            const ptrdiff_t r = q0 + i;
            NC_NAME(nc_layer_dx)(dy + r * L, x + r * L, dx + r * L, L, mean[r], rstd[r], b[i], c[i], w);
        }
    }
}

/* ---- Pipelined forward: the statistics of the next unit are summed in pieces, each piece
 * interleaved with the apply of the same stretch of the current unit (already in cache), so
 * reading the next unit from memory overlaps writing the current one. A unit is a group
 * (InstanceNorm, GroupNorm) or a row (LayerNorm). The pieces change neither the sums (the
 * same lanes in the same order as nc_run_moments) nor the apply (element-wise). */
NC_INLINE void NC_NAME(nc_group_apply_range)(const T *xg, T *yg, ptrdiff_t i0, ptrdiff_t len,
                                          const nc_apply_ctx *a)
{
    /* one division for the first row; then rows and channels are counted */
    const ptrdiff_t j = i0 / a->L;
    ptrdiff_t off = i0 - j * a->L, c = (a->r0 + j) % a->C;
    while (len > 0) {
        const ptrdiff_t seg = len < a->L - off ? len : a->L - off;
        NC_NAME(nc_apply)(xg + i0, yg + i0, seg, a->mean, a->rstd * a->w[c], a->bias[c]);
        i0 += seg;
        len -= seg;
        off = 0;
        if (++c == a->C)
            c = 0;
    }
}

NC_INLINE void NC_NAME(nc_unit_apply)(const T *xu, T *yu, ptrdiff_t i0, ptrdiff_t len,
                                   const nc_apply_ctx *a)
{
    if (!a->cols) {
        NC_NAME(nc_group_apply_range)(xu, yu, i0, len, a);
    } else if (a->wc) {
        const T *w = (const T *)a->wc, *b = (const T *)a->bc;
        NC_NAME(nc_apply_cols)(xu + i0, yu + i0, len, a->mean, a->rstd, w + i0, b ? b + i0 : NULL);
    } else {
        NC_NAME(nc_apply)(xu + i0, yu + i0, len, a->mean, a->rstd, 0.0);
    }
}

/* Apply unit xu -> yu (n values) while summing the moments of `next` (n values). */
NC_INLINE void NC_NAME(nc_unit_pipeline)(const T *xu, T *yu, ptrdiff_t n, const nc_apply_ctx *a,
                                      const T *next, double *mean_n, double *m2_n)
{
    double na = 0.0, mu = 0.0, q = 0.0;
    for (ptrdiff_t b = 0; b < n; b += NC_BLOCK) {
        const ptrdiff_t len = n - b < NC_BLOCK ? n - b : NC_BLOCK;
        const ptrdiff_t n16 = len - len % NC_LANES;
        nc_mom_state st;
        nc_mom_init(&st, (double)next[b]);
        for (ptrdiff_t p = 0; p < n16; p += NC_PIECE) {
            const ptrdiff_t pl = n16 - p < NC_PIECE ? n16 - p : NC_PIECE;
            NC_NAME(nc_blk_moments_part)(next + b + p, pl, &st);
            NC_NAME(nc_unit_apply)(xu, yu, b + p, pl, a);
        }
        double bm, bq;
        NC_NAME(nc_blk_moments_finish)(next + b + n16, len - n16, len, &st, &bm, &bq);
        if (len > n16)
            NC_NAME(nc_unit_apply)(xu, yu, b + n16, len - n16, a);
        nc_merge_step(&na, &mu, &q, (double)len, bm, bq);
    }
    *mean_n = mu;
    *m2_n = q;
}

/* Groups g0 .. g1-1 of k rows of L (contiguous), forward: moments of each group's k*L values,
 * then row r = g*k + j (channel r % C) gets y = (x - mean) * (rstd * w[c]) + bias[c]. */
NC_ENTRY void NC_NAME(nc_groups_forward)(const T *x, T *y, ptrdiff_t g0, ptrdiff_t g1,
                                                    ptrdiff_t k, ptrdiff_t L, ptrdiff_t C,
                                                    const double *w, const double *bias,
                                                    double eps, double *mean, double *m2,
                                                    double *rstd)
{
    const ptrdiff_t n = k * L;
    if (g0 >= g1)
        return;
    NC_NAME(nc_run_moments)(x + g0 * n, n, &mean[g0], &m2[g0]);
    for (ptrdiff_t g = g0; g < g1; g++) {
        rstd[g] = nc_rstd(m2[g], (double)n, eps);
        const nc_apply_ctx a = {0, L, g * k, C, w, bias, NULL, NULL, mean[g], rstd[g]};
        if (g + 1 < g1 && n >= NC_PIPELINE_MIN) {
            NC_NAME(nc_unit_pipeline)(x + g * n, y + g * n, n, &a, x + (g + 1) * n,
                                   &mean[g + 1], &m2[g + 1]);
        } else {
            NC_NAME(nc_unit_apply)(x + g * n, y + g * n, 0, n, &a);
            if (g + 1 < g1)
                NC_NAME(nc_run_moments)(x + (g + 1) * n, n, &mean[g + 1], &m2[g + 1]);
        }
    }
}

/* LayerNorm rows r0 .. r1-1: per row moments, rstd, y = (x - mean) * rstd * w[j] + bias[j]
 * (w NULL: no affine; bias NULL: no shift). */
NC_ENTRY void NC_NAME(nc_layers_forward)(const T *x, T *y, ptrdiff_t r0, ptrdiff_t r1,
                                                    ptrdiff_t L, const T *w, const T *bias,
                                                    double eps, double *mean, double *rstd)
{
    if (r0 >= r1)
        return;
    double m2;
    NC_NAME(nc_run_moments)(x + r0 * L, L, &mean[r0], &m2);
    for (ptrdiff_t r = r0; r < r1; r++) {
        rstd[r] = nc_rstd(m2, (double)L, eps);
        const nc_apply_ctx a = {1, L, 0, 1, NULL, NULL, w, bias, mean[r], rstd[r]};
        if (r + 1 < r1 && L >= NC_PIPELINE_MIN) {
            NC_NAME(nc_unit_pipeline)(x + r * L, y + r * L, L, &a, x + (r + 1) * L,
                                   &mean[r + 1], &m2);
        } else {
            NC_NAME(nc_unit_apply)(x + r * L, y + r * L, 0, L, &a);
            if (r + 1 < r1)
                NC_NAME(nc_run_moments)(x + (r + 1) * L, L, &mean[r + 1], &m2);
        }
    }
}

#else /* NC_DISPATCH_PASS: the entry points, bound to one variant each */
NC_DISPATCH(nc_block_moments)
NC_DISPATCH(nc_block_grad_sums)
NC_DISPATCH(nc_block_grad_sums_weighted)
NC_DISPATCH(nc_apply_rows)
NC_DISPATCH(nc_apply_rows_bwd)
NC_DISPATCH(nc_apply_rows_range)
NC_DISPATCH(nc_group_backward)
NC_DISPATCH(nc_layer_row_coeffs)
NC_DISPATCH(nc_layer_col_sums)
NC_DISPATCH(nc_layer_dx_piece)
NC_DISPATCH(nc_layer_backward)
NC_DISPATCH(nc_groups_forward)
NC_DISPATCH(nc_layers_forward)
#endif
