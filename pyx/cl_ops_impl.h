/* The channels-last kernels of cl_ops.h for one element type T and one instruction set
 * (NC_NAME, dispatch.h). Included by for_each_isa.h only. */
#ifndef NC_DISPATCH_PASS
/* Column moments of rows [nrows][C] (row stride C); s, q: scratch of C doubles each, which may
 * be mean and m2 themselves. */
NC_ENTRY void NC_NAME(nc_cl_moments)(const T *x, ptrdiff_t nrows, ptrdiff_t C,
                                                double *s, double *q, double *mean, double *m2)
{
    for (ptrdiff_t c = 0; c < C; c++) { s[c] = 0.0; q[c] = 0.0; }
    ptrdiff_t r = 0;
    for (; r + NC_CL_ROWS <= nrows; r += NC_CL_ROWS) {
        const T *x0 = x + r * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
        for (ptrdiff_t c = 0; c < C; c++) {
            const double k = (double)x[c];
            const double d0 = (double)x0[c] - k, d1 = (double)x1[c] - k;
            const double d2 = (double)x2[c] - k, d3 = (double)x3[c] - k;
            s[c] += (d0 + d1) + (d2 + d3);
            q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    }
    for (; r < nrows; r++) {
        const T *xr = x + r * C;
        for (ptrdiff_t c = 0; c < C; c++) {
            const double d = (double)xr[c] - (double)x[c];
            s[c] += d;
            q[c] += d * d;
        }
    }
    const double n = (double)nrows;
    for (ptrdiff_t c = 0; c < C; c++) {
        const double sc = s[c], qc = q[c]; /* read before the writes: mean, m2 may be s, q */
        mean[c] = (double)x[c] + sc / n;
        const double m = qc - sc * (sc / n);
        m2[c] = m < 0.0 ? 0.0 : m; /* clamps rounding below 0; NaN passes through */
    }
}

/* Column sums of dy and dy * (x - center[c]) over rows [nrows][C]. */
NC_ENTRY void NC_NAME(nc_cl_grad_sums)(const T *x, const T *dy, ptrdiff_t nrows,
                                                  ptrdiff_t C, const double *center,
                                                  double *sum_dy, double *sum_dy_xc)
{
    for (ptrdiff_t c = 0; c < C; c++) { sum_dy[c] = 0.0; sum_dy_xc[c] = 0.0; }
    ptrdiff_t r = 0;
    for (; r + NC_CL_ROWS <= nrows; r += NC_CL_ROWS) {
        const T *x0 = x + r * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
        const T *g0 = dy + r * C, *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
        for (ptrdiff_t c = 0; c < C; c++) {
            const double m = center[c];
            const double a0 = (double)g0[c], a1 = (double)g1[c];
            const double a2 = (double)g2[c], a3 = (double)g3[c];
            sum_dy[c] += (a0 + a1) + (a2 + a3);
            sum_dy_xc[c] += (a0 * ((double)x0[c] - m) + a1 * ((double)x1[c] - m))
                          + (a2 * ((double)x2[c] - m) + a3 * ((double)x3[c] - m));
        }
    }
    for (; r < nrows; r++) {
        const T *xr = x + r * C, *gr = dy + r * C;
        for (ptrdiff_t c = 0; c < C; c++) {
            const double a = (double)gr[c];
            sum_dy[c] += a;
            sum_dy_xc[c] += a * ((double)xr[c] - center[c]);
        }
    }
}

/* y = ((x - hi[c]) - lo[c]) * s[c] + b[c] over rows [nrows][C] (coefficients in T). */
NC_ENTRY void NC_NAME(nc_cl_apply)(const T *x, T *y, ptrdiff_t nrows, ptrdiff_t C,
                                              const T *hi, const T *lo, const T *s,
                                              const T *b)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const T *xr = x + r * C;
        T *yr = y + r * C;
        for (ptrdiff_t c = 0; c < C; c++)
            yr[c] = ((xr[c] - hi[c]) - lo[c]) * s[c] + b[c];
    }
}

/* dx = a[c] * dy + (b[c] * (x - center[c]) + k[c]) over rows [nrows][C], in double. With b and
 * k all 0 (constant statistics: eval) dx = a[c] * dy exactly, reading no x: an infinite dy
 * stays infinite (0 * inf would make it NaN) and a NaN in x cannot reach dx. */
NC_ENTRY void NC_NAME(nc_cl_apply_bwd)(const T *dy, const T *x, T *dx, ptrdiff_t nrows,
                                                  ptrdiff_t C, const double *center,
                                                  const double *a, const double *b,
                                                  const double *k)
{
    int scale_only = 1;
    for (ptrdiff_t c = 0; c < C; c++)
        scale_only &= b[c] == 0.0 && k[c] == 0.0;
    if (scale_only) {
        for (ptrdiff_t r = 0; r < nrows; r++) {
            const T *gr = dy + r * C;
            T *dxr = dx + r * C;
            for (ptrdiff_t c = 0; c < C; c++)
                dxr[c] = (T)(a[c] * (double)gr[c]);
        }
        return;
    }
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const T *xr = x + r * C, *gr = dy + r * C;
        T *dxr = dx + r * C;
        for (ptrdiff_t c = 0; c < C; c++)
            dxr[c] = (T)(a[c] * (double)gr[c] + (b[c] * ((double)xr[c] - center[c]) + k[c]));
    }
}

#else /* NC_DISPATCH_PASS */
NC_DISPATCH(nc_cl_moments)
NC_DISPATCH(nc_cl_grad_sums)
NC_DISPATCH(nc_cl_apply)
NC_DISPATCH(nc_cl_apply_bwd)
#endif
