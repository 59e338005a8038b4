# BatchNorm's forward and backward, each in one call: statistics per channel over
# (N, *spatial), then the apply; the gradient sums per channel, the combine, then the apply.
#
# x is viewed as rows [R, L], R = N*C, row r = (n, c) with c = r % C. With batch statistics:
# rows shorter than SHORT_ROW are summed in blocks of whole rows of one channel (channel_ops.h:
# one fold per block instead of one per row), longer rows per row (blocks merged in order,
# parallel over rows and blocks); either way the parts are merged per channel in order with
# Chan's formula (row_ops.h nc_merge_step), which keeps a constant channel exact: equal means
# merge with delta = 0.
# With given statistics (running mean and var), those. Then rstd = 1/sqrt(max(var, 0) + eps) and
# y = (x - mean_c) * (rstd_c * weight_c) + bias_c. Everything between the two passes over x is
# done here, in C, so that a tiny input costs one Python call (no NumPy temporaries), and the
# row buffers of an input with few rows live on the stack.
#
# Included by engine.pyx (one compiled module, so the Plan calls these cdef functions directly).

from cython.parallel import prange
from libc.stdlib cimport free, malloc

from fused_types cimport floating
from chunking cimport BLOCK, n_blocks, block_len, use_threads
from blocks cimport (apply_backward, apply_forward, block_grad_sums, merge_block_moments, nc_merge_step, nc_rstd,
                    sum_parts)
from channel_ops cimport (NC_FUSED_CHANNEL_BYTES, NC_SHORT_ROW, apply_backward_row_range, channel_backward_fused,
                          channel_block_grad_sums, channel_block_moments, nc_channel_bwd_combine)
from row_loops cimport TASK_VALUES, apply_short_rows, rows_moments

cdef enum:
    STACK_ROWS = 256   # row statistics of at most this many rows stay on the stack

# Rows shorter than this are reduced in blocks of several rows of a channel (channel_ops.h).
SHORT_ROW = NC_SHORT_ROW
cdef enum:
    # The short-row backward runs one channel per task (fused: x and dy read from memory once)
    # when there are at least this many channels per thread; else in separate parallel passes
    # over blocks, which give the same bits.
    FUSED_MIN_CHANNELS_ = 4
FUSED_MIN_CHANNELS = FUSED_MIN_CHANNELS_


cdef inline Py_ssize_t rows_per_block(Py_ssize_t L) noexcept nogil:
    """Rows of one channel per block of the block path (L <= BLOCK)."""
    return BLOCK // L


cdef inline bint channel_in_cache(Py_ssize_t N, Py_ssize_t L, Py_ssize_t itemsize) noexcept nogil:
    """Whether a channel's x and dy (N rows of L values) fit NC_FUSED_CHANNEL_BYTES."""
    return L <= BLOCK and 2 * N * L * itemsize <= NC_FUSED_CHANNEL_BYTES


cdef inline bint backward_blocks(Py_ssize_t N, Py_ssize_t L, Py_ssize_t itemsize) noexcept nogil:
    """Whether the backward sums a channel in blocks of rows (else row by row): short rows, or
    a channel in cache. A function of the shape alone, so the bits are too."""
    return L < NC_SHORT_ROW or channel_in_cache(N, L, itemsize)


cdef int short_row_moments(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, double* mean,
                           double* m2, int n_threads, bint par) except -1 nogil:
    """Per-channel (mean, M2) of x [N, C, L], L < NC_SHORT_ROW: each channel's rows in blocks of
    rows_per_block(L) rows (channel_ops.h), in parallel, then the blocks merged in order."""
    cdef Py_ssize_t per = rows_per_block(L)
    cdef Py_ssize_t nblk = (N + per - 1) // per
    cdef Py_ssize_t t, c, n0
    cdef double* parts = <double*>malloc(2 * C * nblk * sizeof(double))
    if parts == NULL:
        with gil:
            raise MemoryError("channel moments: no memory for the moments of the blocks")
    if par:
        for t in prange(C * nblk, num_threads=n_threads, schedule="static"):
            c = t // nblk
            n0 = (t - c * nblk) * per
            channel_block_moments(x, C, L, c, n0, min(N, n0 + per), &parts[2 * t], &parts[2 * t + 1])
    else:  # no OpenMP region at all (one costs about a microsecond even when it runs serially)
        for t in range(C * nblk):
            c = t // nblk
            n0 = (t - c * nblk) * per
            channel_block_moments(x, C, L, c, n0, min(N, n0 + per), &parts[2 * t], &parts[2 * t + 1])
    for c in range(C):
        merge_block_moments(&parts[2 * c * nblk], nblk, N * L, per * L, &mean[c], &m2[c])
    free(parts)
    return 0



cdef int channel_moments_run(const floating* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, double* mean,
                             double* m2, int n_threads) except -1 nogil:
    """Per-channel (mean, M2) of x [N*C, L] C-contiguous, N*C*L > 0 (OUT: mean[C], m2[C]): the
    reduce and combine of channel_forward_run with batch statistics."""
    cdef Py_ssize_t R = N * C, c, n
    cdef double s, q, d
    cdef double stack_buf[2 * STACK_ROWS]
    cdef double* rows = stack_buf
    cdef bint par = use_threads(n_threads, R * L)
    if L < NC_SHORT_ROW:
        return short_row_moments(x, N, C, L, mean, m2, n_threads, par)
    if R > STACK_ROWS:
        rows = <double*>malloc(2 * R * sizeof(double))
        if rows == NULL:
            with gil:
                raise MemoryError("channel moments: no memory for the row moments")
    rows_moments(x, R, L, rows, rows + 1, 2, n_threads, par)
    for c in range(C):
        d = 0.0
        s = 0.0
        q = 0.0
        for n in range(N):
            nc_merge_step(&d, &s, &q, <double>L, rows[2 * (n * C + c)], rows[2 * (n * C + c) + 1])
        mean[c] = s
        m2[c] = q
    if rows != stack_buf:
        free(rows)
    return 0


cdef int channel_forward_run(const floating* x, floating* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                             const double* weight, const double* bias, double eps, double* mean, double* m2,
                             double* rstd, bint batch_stats, int n_threads) except -1 nogil:
    """channel_forward on pointers (the engine's entry): x, y [N*C, L] C-contiguous, N*C*L > 0;
    per-channel arrays of C doubles. The caller has checked every shape."""
    cdef Py_ssize_t R = N * C
    cdef Py_ssize_t nb = n_blocks(L), t, r, b, c
    cdef double stack_buf[2 * STACK_ROWS]
    cdef double* scale
    cdef bint par = use_threads(n_threads, R * L)
    if batch_stats:
        channel_moments_run(x, N, C, L, mean, m2, n_threads)
        for c in range(C):
            rstd[c] = nc_rstd(m2[c], <double>(N * L), eps)
    else:
        for c in range(C):
            rstd[c] = nc_rstd(m2[c], 1.0, eps)
    # the scale per channel: on the stack for up to 2 * STACK_ROWS channels
    scale = <double*>malloc(C * sizeof(double)) if C > 2 * STACK_ROWS else stack_buf
    if scale == NULL:
        with gil:
            raise MemoryError("channel forward: no memory for the scales")
    for c in range(C):
        scale[c] = rstd[c] * weight[c]
    if nb == 1:
        apply_short_rows(x, y, R, L, C, mean, scale, bias, n_threads, par)
    else:
        for t in prange(R * nb, num_threads=n_threads, use_threads_if=par, schedule="static"):
            r = t // nb
            b = t - r * nb
            c = r % C
            apply_forward(x + r * L + b * BLOCK, y + r * L + b * BLOCK, block_len(L, b), mean[c], scale[c], bias[c])
    if scale != stack_buf:
        free(scale)
    return 0


def channel_forward(const floating[:, ::1] x,   # IN  [R, L], R = N * C
                    floating[:, ::1] y,         # OUT [R, L] (may be x itself)
                    Py_ssize_t C,
                    const double[::1] weight,   # IN  [C]
                    const double[::1] bias,     # IN  [C]
                    double eps,
                    double[::1] mean,           # OUT [C] batch mean, or IN: the given mean
                    double[::1] m2,             # OUT [C] batch M2, or IN: the given variance
                    double[::1] rstd,           # OUT [C]
                    bint batch_stats,
                    int n_threads=1):
    """Normalise per channel; batch_stats False: mean and m2 hold the given mean and variance.
    The checked entry point of channel_forward_run (tests, tools); the engine calls that."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    if C < 1 or R % C != 0:
        raise ValueError(f"C={C} must divide the number of rows {R}")
    if y.shape[0] != R or y.shape[1] != L:
        raise ValueError("y must have the shape of x")
    if (weight.shape[0] != C or bias.shape[0] != C or mean.shape[0] != C or m2.shape[0] != C
            or rstd.shape[0] != C):
        raise ValueError(f"per-channel arrays must have {C} elements")
    if R == 0 or L == 0:
        return
    with nogil:
        channel_forward_run(&x[0, 0], &y[0, 0], R // C, C, L, &weight[0], &bias[0], eps, &mean[0], &m2[0],
                            &rstd[0], batch_stats, n_threads)


cdef int channel_grad_sums(const floating* x, const floating* dy, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                           const double* center, double* sum_dy, double* sum_dy_xc, bint blocks, int n_threads,
                           bint par) except -1 nogil:
    """Per channel c: sum(dy) and sum(dy * (x - center[c])) over its N rows of L values, in
    float64 (OUT: sum_dy[C], sum_dy_xc[C]). blocks (backward_blocks): blocks of rows of a
    channel; else per-row sums of BLOCK-sized pieces (grad_sums.row_grad_sums); either way the
    partial sums are added in a fixed order."""
    cdef Py_ssize_t per, nblk, nb, t, c, b, n0, r, n
    cdef Py_ssize_t n_parts
    cdef double s, u, rs, ru
    cdef double* parts
    if blocks:
        per = rows_per_block(L)
        nblk = (N + per - 1) // per
        n_parts = C * nblk
    else:
        nb = n_blocks(L)
        n_parts = N * C * nb
    parts = <double*>malloc(2 * n_parts * sizeof(double))
    if parts == NULL:
        with gil:
            raise MemoryError("channel gradient sums: no memory for the partial sums")
    if blocks:
        for t in prange(n_parts, num_threads=n_threads, use_threads_if=par, schedule="static"):
            c = t // nblk
            n0 = (t - c * nblk) * per
            channel_block_grad_sums(x, dy, C, L, c, n0, min(N, n0 + per), center[c], &parts[2 * t],
                                    &parts[2 * t + 1])
        for c in range(C):
            s = 0.0
            u = 0.0
            for b in range(nblk):
                s = s + parts[2 * (c * nblk + b)]
                u = u + parts[2 * (c * nblk + b) + 1]
            sum_dy[c] = s
            sum_dy_xc[c] = u
    else:
        for t in prange(n_parts, num_threads=n_threads, use_threads_if=par, schedule="static"):
            r = t // nb
            b = t - r * nb
            block_grad_sums(x + r * L + b * BLOCK, dy + r * L + b * BLOCK, block_len(L, b), center[r % C],
                            &parts[2 * t], &parts[2 * t + 1])
        for c in range(C):
            s = 0.0
            u = 0.0
            for n in range(N):
                # a row's blocks in order, then the rows in batch order
                r = n * C + c
                sum_parts(&parts[2 * r * nb], nb, &rs, &ru)
                s = s + rs
                u = u + ru
            sum_dy[c] = s
            sum_dy_xc[c] = u
    free(parts)
    return 0


cdef int channel_backward_run(const floating* x, const floating* dy, floating* dx, Py_ssize_t N, Py_ssize_t C,
                              Py_ssize_t L, const double* weight, const double* mean, const double* rstd,
                              bint batch_stats, double* dweight, double* dbias, const double* sums, double count,
                              int n_threads) except -1 nogil:
    """channel_backward on pointers (the engine's entry): x, dy, dx [N*C, L] C-contiguous,
    N*C*L > 0; per-channel arrays of C doubles. sums NULL: the gradient sums of x and dy, over
    N*L values; else given ones (sums[0:C] sum(dy), sums[C:2C] sum(dy * (x - mean)), over
    `count` values: a batch split over processes, SyncBatchNorm). The caller has checked every
    shape."""
    cdef Py_ssize_t R = N * C
    cdef Py_ssize_t nb, t, r, k, p, c, per
    cdef bint blocks
    cdef double* coef
    cdef double *a
    cdef double *b
    cdef double *cc
    cdef double *center
    cdef double *sxc
    cdef const floating* xa
    cdef bint par = use_threads(n_threads, R * L)
    if (sums == NULL and channel_in_cache(N, L, sizeof(floating))
            and (not par or C >= FUSED_MIN_CHANNELS_ * n_threads)):
        # one channel per task, read from memory once: the bits of the passes below
        if par:
            for c in prange(C, num_threads=n_threads, schedule="static"):
                channel_backward_fused(x, dy, dx, N, C, L, c, weight[c], mean[c], rstd[c], batch_stats,
                                       &dweight[c], &dbias[c])
        else:
            for c in range(C):
                channel_backward_fused(x, dy, dx, N, C, L, c, weight[c], mean[c], rstd[c], batch_stats,
                                       &dweight[c], &dbias[c])
        return 0
    coef = <double*>malloc(5 * C * sizeof(double))
    if coef == NULL:
        with gil:
            raise MemoryError("channel backward: no memory for the coefficients")
    a, b, cc, center, sxc = coef, coef + C, coef + 2 * C, coef + 3 * C, coef + 4 * C
    blocks = backward_blocks(N, L, sizeof(floating))
    try:
        if sums == NULL:
            channel_grad_sums(x, dy, N, C, L, mean, dbias, sxc, blocks, n_threads, par)
            count = <double>(N * L)
        else:
            for c in range(C):
                dbias[c] = sums[c]
                sxc[c] = sums[C + c]
        for c in range(C):
            nc_channel_bwd_combine(rstd[c], weight[c], mean[c], dbias[c], sxc[c], count, batch_stats,
                                   &dweight[c], &a[c], &b[c], &cc[c], &center[c])
        # given statistics: the apply reads dy in place of x (b = c = 0: dx = a * dy)
        xa = x if batch_stats else dy
        if blocks:
            per = TASK_VALUES // L
            for t in prange((R + per - 1) // per, num_threads=n_threads, use_threads_if=par, schedule="static"):
                apply_backward_row_range(dy, xa, dx, t * per, min(R, t * per + per), L, C, center, a, b, cc)
        else:
            nb = n_blocks(L)
            for t in prange(R * nb, num_threads=n_threads, use_threads_if=par, schedule="static"):
                r = t // nb
                k = t - r * nb
                p = r % C
                apply_backward(dy + r * L + k * BLOCK, xa + r * L + k * BLOCK, dx + r * L + k * BLOCK,
                               block_len(L, k), center[p], a[p], b[p], cc[p])
    finally:
        free(coef)
    return 0


def channel_backward(const floating[:, ::1] x,    # IN  [R, L], R = N * C: the forward's input
                     const floating[:, ::1] dy,   # IN  [R, L]
                     floating[:, ::1] dx,         # OUT [R, L] (may be dy itself)
                     Py_ssize_t C,
                     const double[::1] weight,    # IN  [C] the forward's weight (ones without)
                     const double[::1] mean,      # IN  [C] the forward's mean (batch or given)
                     const double[::1] rstd,      # IN  [C] the forward's 1 / sqrt(var + eps)
                     bint batch_stats,
                     double[::1] dweight,         # OUT [C]
                     double[::1] dbias,           # OUT [C]
                     int n_threads=1):
    """BatchNorm's backward per channel in one call: the gradient sums, the combine and the
    apply (the contract of grouped.backward; the caller has checked the shapes).

    dbias = sum(dy), dweight = sum(dy * (x - mean)) * rstd per channel over (N, L). With batch
    statistics dx = a * dy + b * (x - mean) + c, a = rstd * w, b = -rstd^3 * w * sum(dy * (x -
    mean)) / M, c = -rstd * w * sum(dy) / M (M = N * L); with given statistics (constants)
    dx = rstd * w * dy exactly, reading neither x nor the mean.
    """
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    if R == 0 or L == 0:
        dweight[:] = 0.0
        dbias[:] = 0.0
        return
    with nogil:
        channel_backward_run(&x[0, 0], &dy[0, 0], &dx[0, 0], R // C, C, L, &weight[0], &mean[0], &rstd[0],
                             batch_stats, &dweight[0], &dbias[0], NULL, 0.0, n_threads)
