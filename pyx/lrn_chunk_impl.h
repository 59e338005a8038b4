/* LocalResponseNorm on one chunk (lrn_chunk.h) for one variant and one instruction set:
 * T the storage type, PT the type of the power, SQRT its square root, CHECK_RANGE whether a
 * chunk outside the float range falls back to the variant WIDE (NC_NAME, dispatch.h).
 * Included by for_each_isa.h only. */
#ifndef NC_DISPATCH_PASS

/* s^-beta in PT: sqrt and one division for beta = 0.75 and 0.5, pow in double otherwise. */
NC_INLINE PT NC_NAME(nc_lrn_pow)(int mode, PT s, double beta)
{
    if (mode == NC_POW_075) {
        const PT r = (PT)1 / SQRT(s);
        return r * SQRT(r);
    }
    if (mode == NC_POW_05)
        return (PT)1 / SQRT(s);
    return (PT)pow((double)s, -beta);
}

/* rows[p] = prefix sums within blocks of `size` of v(p - start), p in [0, P); v(j) = SQ ? x_j^2 : x_j */
static inline void NC_NAME(nc_lrn_prefix)(const T *x, ptrdiff_t stride, const PT *u, int squares,
                                          ptrdiff_t C, ptrdiff_t wn, ptrdiff_t W, ptrdiff_t size,
                                          ptrdiff_t start, double *restrict rows)
{
    const ptrdiff_t P = C + size - 1;
    for (ptrdiff_t p = 0; p < P; p++) {
        const ptrdiff_t j = p - start;
        double *restrict row = rows + p * W;
        const int first = p % size == 0;
        const double *restrict prev = first ? row : row - W;
        if (j < 0 || j >= C) {
            if (first) for (ptrdiff_t w = 0; w < wn; w++) row[w] = 0.0;
            else       for (ptrdiff_t w = 0; w < wn; w++) row[w] = prev[w];
        } else if (squares) {
            const T *restrict xj = x + j * stride;
            if (first) for (ptrdiff_t w = 0; w < wn; w++) row[w] = (double)xj[w] * (double)xj[w];
            else for (ptrdiff_t w = 0; w < wn; w++) row[w] = prev[w] + (double)xj[w] * (double)xj[w];
        } else {
            const PT *restrict uj = u + j * W;
            if (first) for (ptrdiff_t w = 0; w < wn; w++) row[w] = (double)uj[w];
            else       for (ptrdiff_t w = 0; w < wn; w++) row[w] = prev[w] + (double)uj[w];
        }
    }
}

/* suf <- suffix sum at padded p (restarting at a block's end) */
static inline void NC_NAME(nc_lrn_suffix)(const T *x, ptrdiff_t stride, const PT *u, int squares,
                                          ptrdiff_t C, ptrdiff_t wn, ptrdiff_t W, ptrdiff_t size,
                                          ptrdiff_t start, ptrdiff_t p, double *restrict suf)
{
    const ptrdiff_t j = p - start;
    const int restart = (p % size == size - 1) || p == C + size - 2;
    if (j < 0 || j >= C) {
        if (restart) for (ptrdiff_t w = 0; w < wn; w++) suf[w] = 0.0;
    } else if (squares) {
        const T *restrict xj = x + j * stride;
        if (restart) for (ptrdiff_t w = 0; w < wn; w++) suf[w] = (double)xj[w] * (double)xj[w];
        else         for (ptrdiff_t w = 0; w < wn; w++) suf[w] += (double)xj[w] * (double)xj[w];
    } else {
        const PT *restrict uj = u + j * W;
        if (restart) for (ptrdiff_t w = 0; w < wn; w++) suf[w] = (double)uj[w];
        else         for (ptrdiff_t w = 0; w < wn; w++) suf[w] += (double)uj[w];
    }
}

NC_ENTRY void NC_NAME(nc_lrn_forward_chunk)(const T *x, T *y, ptrdiff_t stride,
                                                          ptrdiff_t C, ptrdiff_t wn, ptrdiff_t W,
                                                          ptrdiff_t size, double alpha, double beta,
                                                          double k, double *scratch)
{
    const ptrdiff_t P = C + size - 1, lo = size / 2;
    const double scale = alpha / (double)size;
    const int mode = nc_pow_mode(beta);
    double *restrict pre = scratch;                 /* [P][W] */
    double *restrict zero = pre + P * W;            /* [W] */
    double *restrict suf = zero + W;                /* [W] */
    for (ptrdiff_t w = 0; w < wn; w++) zero[w] = 0.0;
    NC_NAME(nc_lrn_prefix)(x, stride, NULL, 1, C, wn, W, size, lo, pre);
    for (ptrdiff_t p = P - 1; p >= 0; p--) {
        NC_NAME(nc_lrn_suffix)(x, stride, NULL, 1, C, wn, W, size, lo, p, suf);
        if (p >= C) continue;
        const T *restrict xc = x + p * stride;
        T *restrict yc = y + p * stride;
        const double *restrict pe = (p % size == 0) ? zero : pre + (p + size - 1) * W;
        uint32_t outside = 0;
        if (mode == NC_POW_075) {
            for (ptrdiff_t w = 0; w < wn; w++) {
                const double sd = k + scale * (suf[w] + pe[w]);
                const PT pw = NC_NAME(nc_lrn_pow)(NC_POW_075, (PT)sd, beta);
                yc[w] = (T)(xc[w] * pw);
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);
            }
        } else if (mode == NC_POW_05) {
            for (ptrdiff_t w = 0; w < wn; w++) {
                const double sd = k + scale * (suf[w] + pe[w]);
                const PT pw = NC_NAME(nc_lrn_pow)(NC_POW_05, (PT)sd, beta);
                yc[w] = (T)(xc[w] * pw);
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);
            }
        } else {
            for (ptrdiff_t w = 0; w < wn; w++)
                yc[w] = (T)((double)xc[w] * pow(k + scale * (suf[w] + pe[w]), -beta));
        }
        if (CHECK_RANGE && outside) {  /* beyond the float path's range: the chunk in double */
            NC_NAME_AS(nc_lrn_forward_chunk, WIDE)(x, y, stride, C, wn, W, size, alpha, beta, k, scratch);
            return;
        }
    }
}

/* dx_c = dy_c s_c^-beta - (2 alpha beta / size) x_c sum_{c' in [c - hi, c + lo]} u_c',
 * with u_c' = dy_c' x_c' s_c'^(-beta-1). */
NC_ENTRY void NC_NAME(nc_lrn_backward_chunk)(const T *dy, const T *x, T *dx,
                                                           ptrdiff_t stride, ptrdiff_t C,
                                                           ptrdiff_t wn, ptrdiff_t W, ptrdiff_t size,
                                                           double alpha, double beta, double k,
                                                           double *scratch)
{
    const ptrdiff_t P = C + size - 1, lo = size / 2, hi = (size - 1) / 2;
    const double scale = alpha / (double)size, coef = 2.0 * alpha * beta / (double)size;
    const int mode = nc_pow_mode(beta);
    if (CHECK_RANGE && mode == NC_POW_GENERAL) {  /* pow is in double: keep s^-beta and u there */
        NC_NAME_AS(nc_lrn_backward_chunk, WIDE)(dy, x, dx, stride, C, wn, W, size, alpha, beta, k, scratch);
        return;
    }
    double *restrict pre = scratch;                 /* [P][W] */
    double *restrict zero = pre + P * W;            /* [W] */
    double *restrict suf = zero + W;                /* [W] */
    PT *restrict pw = (PT *)(suf + W);              /* [C][W]: s_c^-beta */
    PT *restrict u = pw + C * W;                    /* [C][W]: dy_c x_c s_c^(-beta-1) */
    for (ptrdiff_t w = 0; w < wn; w++) zero[w] = 0.0;
    NC_NAME(nc_lrn_prefix)(x, stride, NULL, 1, C, wn, W, size, lo, pre);
    for (ptrdiff_t p = P - 1; p >= 0; p--) {
        NC_NAME(nc_lrn_suffix)(x, stride, NULL, 1, C, wn, W, size, lo, p, suf);
        if (p >= C) continue;
        const T *restrict xc = x + p * stride;
        const T *restrict gc = dy + p * stride;
        PT *restrict pwc = pw + p * W;
        PT *restrict uc = u + p * W;
        const double *restrict pe = (p % size == 0) ? zero : pre + (p + size - 1) * W;
        uint32_t outside = 0;
        if (mode == NC_POW_075) {
            for (ptrdiff_t w = 0; w < wn; w++) {
                const double sd = k + scale * (suf[w] + pe[w]);
                const PT r = (PT)1 / SQRT((PT)sd);
                const PT q = r * SQRT(r);                  /* s^-0.75 */
                pwc[w] = q;
                uc[w] = (PT)gc[w] * (PT)xc[w] * (q * (r * r));
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);
            }
        } else if (mode == NC_POW_05) {
            for (ptrdiff_t w = 0; w < wn; w++) {
                const double sd = k + scale * (suf[w] + pe[w]);
                const PT r = (PT)1 / SQRT((PT)sd);
                pwc[w] = r;
                uc[w] = (PT)gc[w] * (PT)xc[w] * (r * (r * r));
                if (CHECK_RANGE) outside |= nc_lrn_outside_float_range(sd);
            }
        } else {
            for (ptrdiff_t w = 0; w < wn; w++) {
                const double s = k + scale * (suf[w] + pe[w]);
                const double q = pow(s, -beta);
                pwc[w] = (PT)q;
                uc[w] = (PT)((double)gc[w] * (double)xc[w] * (q / s));
            }
        }
        if (CHECK_RANGE && outside) {  /* beyond the float path's range: the chunk in double */
            NC_NAME_AS(nc_lrn_backward_chunk, WIDE)(dy, x, dx, stride, C, wn, W, size, alpha, beta, k, scratch);
            return;
        }
    }
    /* the same window sums over u, reversed: the channels whose window holds c */
    NC_NAME(nc_lrn_prefix)(x, stride, u, 0, C, wn, W, size, hi, pre);
    for (ptrdiff_t p = P - 1; p >= 0; p--) {
        NC_NAME(nc_lrn_suffix)(x, stride, u, 0, C, wn, W, size, hi, p, suf);
        if (p >= C) continue;
        const T *restrict xc = x + p * stride;
        const T *restrict gc = dy + p * stride;
        const PT *restrict pwc = pw + p * W;
        T *restrict dxc = dx + p * stride;
        const double *restrict pe = (p % size == 0) ? zero : pre + (p + size - 1) * W;
        for (ptrdiff_t w = 0; w < wn; w++)
            dxc[w] = (T)((double)gc[w] * (double)pwc[w] - coef * (double)xc[w] * (suf[w] + pe[w]));
    }
}

#else /* NC_DISPATCH_PASS */
NC_DISPATCH(nc_lrn_forward_chunk)
NC_DISPATCH(nc_lrn_backward_chunk)
#endif
