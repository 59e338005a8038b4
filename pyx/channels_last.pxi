# BatchNorm, InstanceNorm and GroupNorm on channels-last memory: x (N, C, *spatial) stored as
# (N, *spatial, C), read without a copy as [N, L, C] (sample n: L positions of C contiguous
# channels), y and dx written in the same layout. The groupings are the NCHW ones:
#
#   per channel (k = 0)          the (n, c) of channel c over the batch: BatchNorm, and any
#                                layer with given (running) statistics; statistics [C]
#   consecutive channels (k)     k channels of one sample: InstanceNorm (k = 1), GroupNorm
#                                (k = C/G); statistics [N*C/k], group g = (n*C + c) // k
#
# Forward:  reduce (column moments of each chunk, cl_ops.h) -> combine (the chunks of each
#           (n, c) in order, then the (n, c) of a group in order, Chan's formula; rstd) ->
#           apply (y = (x - mean) * rstd * w[c] + b[c], the center split in two parts of T).
# Backward: reduce (sum(dy), sum(dy * (x - mean)) per chunk) -> combine (per (n, c), then the
#           group's coefficients: row_ops.h nc_bwd_coeffs, channel_ops.h
#           nc_channel_bwd_combine) -> apply (dx = a * dy + b * (x - mean) + c in double).
#
# A chunk is at most NC_CL_CHUNK positions of one sample, and every merge runs in an order
# fixed by the shape: the bits are the same for any thread count. Consecutive-channel groups
# with at least as many samples as threads run one sample per task, reduce, combine and apply
# while it is in cache, with the same arithmetic as the separate passes (the same bits).
#
# Included by engine.pyx: the Plan's forward and backward call cl_forward_run and
# cl_backward_run for a channels-last plan; the caller has checked every shape.

from cython.parallel import prange
from libc.stdlib cimport free, malloc

from fused_types cimport floating
from chunking cimport use_threads
from blocks cimport merge_equal_rows, nc_bwd_coeffs, nc_merge_step, nc_rstd
from channel_ops cimport nc_channel_bwd_combine

cdef extern from "cl_ops.h" nogil:
    enum: NC_CL_CHUNK
    void nc_cl_moments_f32(const float* x, Py_ssize_t nrows, Py_ssize_t C, double* s, double* q,
                           double* mean, double* m2)
    void nc_cl_moments_f64(const double* x, Py_ssize_t nrows, Py_ssize_t C, double* s, double* q,
                           double* mean, double* m2)
    void nc_cl_grad_sums_f32(const float* x, const float* dy, Py_ssize_t nrows, Py_ssize_t C,
                             const double* center, double* sum_dy, double* sum_dy_xc)
    void nc_cl_grad_sums_f64(const double* x, const double* dy, Py_ssize_t nrows, Py_ssize_t C,
                             const double* center, double* sum_dy, double* sum_dy_xc)
    void nc_cl_apply_f32(const float* x, float* y, Py_ssize_t nrows, Py_ssize_t C, const float* hi,
                         const float* lo, const float* s, const float* b)
    void nc_cl_apply_f64(const double* x, double* y, Py_ssize_t nrows, Py_ssize_t C, const double* hi,
                         const double* lo, const double* s, const double* b)
    void nc_cl_apply_bwd_f32(const float* dy, const float* x, float* dx, Py_ssize_t nrows, Py_ssize_t C,
                             const double* center, const double* a, const double* b, const double* k)
    void nc_cl_apply_bwd_f64(const double* dy, const double* x, double* dx, Py_ssize_t nrows, Py_ssize_t C,
                             const double* center, const double* a, const double* b, const double* k)


cdef struct ClShape:
    Py_ssize_t N, L, C    # x as [N, L, C]
    Py_ssize_t k          # consecutive channels per group; 0: per channel over the batch
    Py_ssize_t nch        # chunks per sample; chunk t = n * nch + ch


cdef inline ClShape cl_shape(Py_ssize_t N, Py_ssize_t L, Py_ssize_t C, Py_ssize_t k) noexcept nogil:
    cdef ClShape s
    s.N, s.L, s.C, s.k = N, L, C, k
    s.nch = (L + NC_CL_CHUNK - 1) // NC_CL_CHUNK
    return s


cdef inline bint cl_sample_tasks(Py_ssize_t N, int n_threads, bint par) noexcept nogil:
    """Whether consecutive-channel groups run one sample per task (the other way gives the same
    bits: the choice, which depends on the thread count, changes no result)."""
    return not par or N >= n_threads


cdef inline Py_ssize_t chunk_rows(const ClShape* s, Py_ssize_t ch) noexcept nogil:
    """Positions in chunk ch of a sample."""
    cdef Py_ssize_t rest = s.L - ch * NC_CL_CHUNK
    return NC_CL_CHUNK if rest > NC_CL_CHUNK else rest


cdef inline Py_ssize_t chunk_start(const ClShape* s, Py_ssize_t t) noexcept nogil:
    """The offset in x of chunk t's first value."""
    cdef Py_ssize_t n = t // s.nch
    return (n * s.L + (t - n * s.nch) * NC_CL_CHUNK) * s.C


cdef inline Py_ssize_t coeff_offset(const ClShape* s, Py_ssize_t t) noexcept nogil:
    """Where the apply coefficients of chunk t's sample start: [4][C] per sample for
    consecutive-channel groups, one [4][C] for all with per-channel groups."""
    return 0 if s.k == 0 else (t // s.nch) * 4 * s.C


# ---- reduce: one chunk ---------------------------------------------------------------------

cdef inline void chunk_moments(const floating* x, const ClShape* s, Py_ssize_t t, double* parts) noexcept nogil:
    """(mean, M2) per channel of chunk t into parts[t]: C means then C M2."""
    cdef double* p = parts + 2 * s.C * t
    if floating is float:
        nc_cl_moments_f32(x + chunk_start(s, t), chunk_rows(s, t % s.nch), s.C, p, p + s.C, p, p + s.C)
    else:
        nc_cl_moments_f64(x + chunk_start(s, t), chunk_rows(s, t % s.nch), s.C, p, p + s.C, p, p + s.C)


cdef inline void chunk_grad_sums(const floating* x, const floating* dy, const ClShape* s, Py_ssize_t t,
                                 const double* center, double* parts) noexcept nogil:
    """sum(dy) and sum(dy * (x - center[c])) per channel of chunk t into parts[t]."""
    cdef double* p = parts + 2 * s.C * t
    cdef Py_ssize_t o = chunk_start(s, t)
    if floating is float:
        nc_cl_grad_sums_f32(x + o, dy + o, chunk_rows(s, t % s.nch), s.C, center, p, p + s.C)
    else:
        nc_cl_grad_sums_f64(x + o, dy + o, chunk_rows(s, t % s.nch), s.C, center, p, p + s.C)


# ---- combine -------------------------------------------------------------------------------

cdef void sample_merge(const ClShape* s, Py_ssize_t n, const double* parts, double* rows,
                       bint moments) noexcept nogil:
    """Sample n's chunks merged per channel in chunk order into rows[n*C + c] and
    rows[N*C + n*C + c]: (mean, M2) with Chan's formula, or the two sums added."""
    cdef Py_ssize_t C = s.C, NC = s.N * s.C, c, ch
    cdef const double* p = parts + 2 * C * n * s.nch
    cdef double na, mu, q
    for c in range(C):
        if moments:
            na, mu, q = 0.0, 0.0, 0.0
            for ch in range(s.nch):
                nc_merge_step(&na, &mu, &q, <double>chunk_rows(s, ch), p[2 * C * ch + c], p[2 * C * ch + C + c])
        else:
            mu, q = p[c], p[C + c]
            for ch in range(1, s.nch):
                mu = mu + p[2 * C * ch + c]
                q = q + p[2 * C * ch + C + c]
        rows[n * C + c] = mu
        rows[NC + n * C + c] = q


cdef void sample_group_stats(const ClShape* s, Py_ssize_t n, const double* rows, double eps, double* mean,
                             double* m2, double* rstd) noexcept nogil:
    """The consecutive-channel groups of sample n: their channels' moments merged in order."""
    cdef Py_ssize_t per = s.C // s.k, j, g, r
    for j in range(per):
        g = n * per + j
        r = n * s.C + j * s.k
        merge_equal_rows(&rows[r], &rows[s.N * s.C + r], 1, s.k, <double>s.L, &mean[g], &m2[g])
        rstd[g] = nc_rstd(m2[g], <double>(s.k * s.L), eps)


cdef void channel_moments(const ClShape* s, const double* rows, double* mean, double* m2) noexcept nogil:
    """Per channel: its (n, c) merged in batch order."""
    cdef Py_ssize_t c
    for c in range(s.C):
        merge_equal_rows(&rows[c], &rows[s.N * s.C + c], s.C, s.N, <double>s.L, &mean[c], &m2[c])


cdef void channel_totals(const ClShape* s, const double* rows, double* sdy, double* sxc) noexcept nogil:
    """Per channel: the gradient sums of its (n, c) added in batch order."""
    cdef Py_ssize_t C = s.C, NC = s.N * s.C, c, n
    cdef double a, b
    for c in range(C):
        a, b = 0.0, 0.0
        for n in range(s.N):
            a = a + rows[n * C + c]
            b = b + rows[NC + n * C + c]
        sdy[c] = a
        sxc[c] = b


cdef void apply_coeffs(const ClShape* s, Py_ssize_t n, const double* mean, const double* rstd,
                       const double* weight, const double* bias, floating* co) noexcept nogil:
    """The forward apply's coefficients of sample n's channels in T: co[0:C] and co[C:2C] the
    two parts of the center, co[2C:3C] the scale rstd * w, co[3C:4C] the bias."""
    cdef Py_ssize_t C = s.C, c, g
    cdef floating hi
    for c in range(C):
        g = c if s.k == 0 else (n * C + c) // s.k
        hi = <floating>mean[g]
        co[c] = hi
        co[C + c] = <floating>(mean[g] - <double>hi)
        co[2 * C + c] = <floating>(rstd[g] * weight[c])
        co[3 * C + c] = <floating>bias[c]


cdef void sample_centers(const ClShape* s, Py_ssize_t n, const double* mean, double* co) noexcept nogil:
    """co[0:C]: the group mean of each channel of sample n (consecutive-channel groups)."""
    cdef Py_ssize_t c
    for c in range(s.C):
        co[c] = mean[(n * s.C + c) // s.k]


cdef void sample_bwd_coeffs(const ClShape* s, Py_ssize_t n, const double* rows, const double* weight,
                            const double* rstd, double* co) noexcept nogil:
    """The backward apply's coefficients of sample n's channels (consecutive-channel groups with
    their own statistics; co[0:C] holds the centers already): co[C:2C] a = rstd * w, co[2C:3C]
    and co[3C:4C] the group's b and c from its gamma-weighted sums."""
    cdef Py_ssize_t C = s.C, NC = s.N * s.C, per = s.C // s.k, j, i, c, g, r
    cdef double s1, s2, b, cc
    for j in range(per):
        g = n * per + j
        s1, s2 = 0.0, 0.0
        for i in range(s.k):
            c = j * s.k + i
            r = n * C + c
            s1 = s1 + weight[c] * rows[r]
            s2 = s2 + weight[c] * rows[NC + r]
        nc_bwd_coeffs(rstd[g], s1, s2, <double>(s.k * s.L), &b, &cc)
        for i in range(s.k):
            c = j * s.k + i
            co[C + c] = rstd[g] * weight[c]
            co[2 * C + c] = b
            co[3 * C + c] = cc


cdef void channel_bwd_coeffs(Py_ssize_t C, const double* sdy, const double* sxc, double count,
                             const double* weight, const double* mean, const double* rstd, bint batch_stats,
                             double* dweight, double* dbias, double* co) noexcept nogil:
    """Per channel, from its gradient sums over `count` values: the parameter gradients and the
    apply's coefficients co[4][C] (center, a, b, c)."""
    cdef Py_ssize_t c
    for c in range(C):
        dbias[c] = sdy[c]
        nc_channel_bwd_combine(rstd[c], weight[c], mean[c], sdy[c], sxc[c], count, batch_stats,
                               &dweight[c], &co[C + c], &co[2 * C + c], &co[3 * C + c], &co[c])


# ---- apply: one chunk ----------------------------------------------------------------------

cdef inline void chunk_apply(const floating* x, floating* y, const ClShape* s, Py_ssize_t t,
                             const floating* co) noexcept nogil:
    """y of chunk t with its sample's coefficients co (apply_coeffs)."""
    cdef Py_ssize_t o = chunk_start(s, t), C = s.C
    if floating is float:
        nc_cl_apply_f32(x + o, y + o, chunk_rows(s, t % s.nch), C, co, co + C, co + 2 * C, co + 3 * C)
    else:
        nc_cl_apply_f64(x + o, y + o, chunk_rows(s, t % s.nch), C, co, co + C, co + 2 * C, co + 3 * C)


cdef inline void chunk_apply_bwd(const floating* dy, const floating* x, floating* dx, const ClShape* s,
                                 Py_ssize_t t, const double* co) noexcept nogil:
    """dx of chunk t with its sample's coefficients co[4][C] (center, a, b, c)."""
    cdef Py_ssize_t o = chunk_start(s, t), C = s.C
    if floating is float:
        nc_cl_apply_bwd_f32(dy + o, x + o, dx + o, chunk_rows(s, t % s.nch), C, co, co + C, co + 2 * C,
                            co + 3 * C)
    else:
        nc_cl_apply_bwd_f64(dy + o, x + o, dx + o, chunk_rows(s, t % s.nch), C, co, co + C, co + 2 * C,
                            co + 3 * C)


# ---- per-channel passes over every chunk ---------------------------------------------------

cdef void channel_moment_passes(const floating* x, const ClShape* s, double* parts, double* rows, double* mean,
                                double* m2, int n_threads, bint par) noexcept nogil:
    """Per-channel (mean, M2) of x: every chunk's column moments, then the merges."""
    cdef Py_ssize_t t, n
    for t in prange(s.N * s.nch, num_threads=n_threads, use_threads_if=par, schedule="static"):
        chunk_moments(x, s, t, parts)
    for n in range(s.N):
        sample_merge(s, n, parts, rows, True)
    channel_moments(s, rows, mean, m2)


cdef void channel_grad_sum_passes(const floating* x, const floating* dy, const ClShape* s, const double* mean,
                                  double* parts, double* rows, double* sdy, double* sxc, int n_threads,
                                  bint par) noexcept nogil:
    """Per channel sum(dy) and sum(dy * (x - mean[c])): every chunk's, then the sums in order."""
    cdef Py_ssize_t t, n
    for t in prange(s.N * s.nch, num_threads=n_threads, use_threads_if=par, schedule="static"):
        chunk_grad_sums(x, dy, s, t, mean, parts)
    for n in range(s.N):
        sample_merge(s, n, parts, rows, False)
    channel_totals(s, rows, sdy, sxc)


cdef double* cl_work(const ClShape* s, Py_ssize_t extra) noexcept nogil:
    """Scratch of the passes: per chunk [N*nch][2][C] then per (n, c) [2][N*C] doubles, and
    `extra` doubles after them; NULL when there is no memory."""
    return <double*>malloc((2 * s.C * s.N * s.nch + 2 * s.N * s.C + extra) * sizeof(double))


cdef int cl_moments_run(const floating* x, Py_ssize_t N, Py_ssize_t L, Py_ssize_t C, double* mean, double* m2,
                        int n_threads) except -1 nogil:
    """Per-channel (mean, M2) of x [N, L, C] C-contiguous, N*L*C > 0: the reduce and combine of
    cl_forward_run with per-channel groups."""
    cdef ClShape s = cl_shape(N, L, C, 0)
    cdef double* work = cl_work(&s, 0)
    if work == NULL:
        with gil:
            raise MemoryError("channels-last moments: no memory for the partial moments")
    channel_moment_passes(x, &s, work, work + 2 * C * N * s.nch, mean, m2, n_threads,
                          use_threads(n_threads, N * L * C))
    free(work)
    return 0


cdef int cl_grad_sums_run(const floating* x, const floating* dy, Py_ssize_t N, Py_ssize_t L, Py_ssize_t C,
                          const double* mean, double* sdy, double* sxc, int n_threads) except -1 nogil:
    """Per channel sum(dy) and sum(dy * (x - mean[c])) of x, dy [N, L, C]: the reduce of
    cl_backward_run with per-channel groups."""
    cdef ClShape s = cl_shape(N, L, C, 0)
    cdef double* work = cl_work(&s, 0)
    if work == NULL:
        with gil:
            raise MemoryError("channels-last gradient sums: no memory for the partial sums")
    channel_grad_sum_passes(x, dy, &s, mean, work, work + 2 * C * N * s.nch, sdy, sxc, n_threads,
                            use_threads(n_threads, N * L * C))
    free(work)
    return 0


# ---- one sample per task (consecutive-channel groups) ---------------------------------------

cdef void forward_sample(const floating* x, floating* y, const ClShape* s, Py_ssize_t n, double* parts,
                         double* rows, const double* weight, const double* bias, double eps, double* mean,
                         double* m2, double* rstd, floating* co) noexcept nogil:
    """Sample n's forward: the steps of cl_forward_run's separate passes, in cache."""
    cdef Py_ssize_t t
    for t in range(n * s.nch, (n + 1) * s.nch):
        chunk_moments(x, s, t, parts)
    sample_merge(s, n, parts, rows, True)
    sample_group_stats(s, n, rows, eps, mean, m2, rstd)
    apply_coeffs(s, n, mean, rstd, weight, bias, co + n * 4 * s.C)
    for t in range(n * s.nch, (n + 1) * s.nch):
        chunk_apply(x, y, s, t, co + n * 4 * s.C)


cdef void backward_sample(const floating* x, const floating* dy, floating* dx, const ClShape* s, Py_ssize_t n,
                          double* parts, double* rows, const double* weight, const double* mean,
                          const double* rstd, double* co) noexcept nogil:
    """Sample n's backward: the steps of cl_backward_run's separate passes, in cache."""
    cdef Py_ssize_t t
    cdef double* cn = co + n * 4 * s.C
    sample_centers(s, n, mean, cn)
    for t in range(n * s.nch, (n + 1) * s.nch):
        chunk_grad_sums(x, dy, s, t, cn, parts)
    sample_merge(s, n, parts, rows, False)
    sample_bwd_coeffs(s, n, rows, weight, rstd, cn)
    for t in range(n * s.nch, (n + 1) * s.nch):
        chunk_apply_bwd(dy, x, dx, s, t, cn)


# ---- the engine's entries ------------------------------------------------------------------

cdef int cl_forward_run(const floating* x, floating* y, Py_ssize_t N, Py_ssize_t L, Py_ssize_t C, Py_ssize_t k,
                        const double* weight, const double* bias, double eps, double* mean, double* m2,
                        double* rstd, bint batch_stats, int n_threads) except -1 nogil:
    """x, y [N, L, C] C-contiguous, N*L*C > 0; k = 0 per-channel groups, else k consecutive
    channels dividing C; weight, bias [C]; mean, m2, rstd per group (OUT with batch_stats;
    else mean and m2 hold the given mean and var + eps, per channel, and eps is 0)."""
    cdef ClShape s = cl_shape(N, L, C, k)
    cdef Py_ssize_t T = N * s.nch, t, n, c
    cdef Py_ssize_t n_co = N if k else 1
    cdef bint par = use_threads(n_threads, N * L * C)
    # the coefficients [n_co][4][C] in T, then (batch statistics) the passes' scratch: per chunk
    # [T][2][C], per (n, c) [2][N*C]
    cdef Py_ssize_t n_co_doubles = (4 * C * n_co * sizeof(floating) + sizeof(double) - 1) // sizeof(double)
    cdef double* work = <double*>malloc((n_co_doubles + (2 * C * T + 2 * N * C if batch_stats else 0))
                                        * sizeof(double))
    cdef floating* co = <floating*>work
    cdef double* parts = work + n_co_doubles
    cdef double* rows = parts + 2 * C * T
    if work == NULL:
        with gil:
            raise MemoryError("channels-last forward: no memory for the partial moments")
    if k and cl_sample_tasks(N, n_threads, par):
        if par:
            for n in prange(N, num_threads=n_threads, schedule="static"):
                forward_sample(x, y, &s, n, parts, rows, weight, bias, eps, mean, m2, rstd, co)
        else:
            for n in range(N):
                forward_sample(x, y, &s, n, parts, rows, weight, bias, eps, mean, m2, rstd, co)
        free(work)
        return 0
    if batch_stats and k:
        for t in prange(T, num_threads=n_threads, use_threads_if=par, schedule="static"):
            chunk_moments(x, &s, t, parts)
        for n in range(N):
            sample_merge(&s, n, parts, rows, True)
            sample_group_stats(&s, n, rows, eps, mean, m2, rstd)
    elif batch_stats:
        channel_moment_passes(x, &s, parts, rows, mean, m2, n_threads, par)
        for c in range(C):
            rstd[c] = nc_rstd(m2[c], <double>(N * L), eps)
    else:
        for c in range(C):
            rstd[c] = nc_rstd(m2[c], 1.0, eps)
    for n in range(n_co):
        apply_coeffs(&s, n, mean, rstd, weight, bias, co + n * 4 * C)
    for t in prange(T, num_threads=n_threads, use_threads_if=par, schedule="static"):
        chunk_apply(x, y, &s, t, co + coeff_offset(&s, t))
    free(work)
    return 0


cdef int cl_backward_run(const floating* x, const floating* dy, floating* dx, Py_ssize_t N, Py_ssize_t L,
                         Py_ssize_t C, Py_ssize_t k, const double* weight, const double* mean, const double* rstd,
                         bint batch_stats, double* dweight, double* dbias, const double* sums, double count,
                         int n_threads) except -1 nogil:
    """dx, dweight, dbias for cl_forward_run's forward of x with these statistics; dy [N, L, C]
    like x. Consecutive-channel groups need batch_stats (given statistics are per channel).
    Per-channel groups: sums NULL, the gradient sums of x and dy over N*L values; else given
    ones (sums[0:C] sum(dy), sums[C:2C] sum(dy * (x - mean)), over `count` values)."""
    cdef ClShape s = cl_shape(N, L, C, k)
    cdef Py_ssize_t T = N * s.nch, t, n
    cdef Py_ssize_t n_co = N if k else 1
    cdef bint par = use_threads(n_threads, N * L * C)
    # the passes' scratch, the coefficients [n_co][4][C], the per-channel sums [2][C]
    cdef double* work = cl_work(&s, 4 * C * n_co + 2 * C)
    cdef double* parts = work
    cdef double* rows = work + 2 * C * T
    cdef double* co = rows + 2 * N * C
    cdef double* totals = co + 4 * C * n_co
    if work == NULL:
        with gil:
            raise MemoryError("channels-last backward: no memory for the partial sums")
    if k and cl_sample_tasks(N, n_threads, par):
        if par:
            for n in prange(N, num_threads=n_threads, schedule="static"):
                backward_sample(x, dy, dx, &s, n, parts, rows, weight, mean, rstd, co)
        else:
            for n in range(N):
                backward_sample(x, dy, dx, &s, n, parts, rows, weight, mean, rstd, co)
    elif k:
        for n in range(N):
            sample_centers(&s, n, mean, co + n * 4 * C)
        for t in prange(T, num_threads=n_threads, use_threads_if=par, schedule="static"):
            chunk_grad_sums(x, dy, &s, t, co + coeff_offset(&s, t), parts)
        for n in range(N):
            sample_merge(&s, n, parts, rows, False)
            sample_bwd_coeffs(&s, n, rows, weight, rstd, co + n * 4 * C)
        for t in prange(T, num_threads=n_threads, use_threads_if=par, schedule="static"):
            chunk_apply_bwd(dy, x, dx, &s, t, co + coeff_offset(&s, t))
    else:
        if sums == NULL:
            channel_grad_sum_passes(x, dy, &s, mean, parts, rows, totals, totals + C, n_threads, par)
            sums = totals
            count = <double>(N * L)
        channel_bwd_coeffs(C, sums, sums + C, count, weight, mean, rstd, batch_stats, dweight, dbias, co)
        # given statistics: b = c = 0, dx = a * dy, x not read (cl_ops.h)
        for t in prange(T, num_threads=n_threads, use_threads_if=par, schedule="static"):
            chunk_apply_bwd(dy, x, dx, &s, t, co)
    if k:
        channel_sums(rows, rows + N * C, rstd, N, C, k, dweight, dbias)
    free(work)
    return 0
