# Fused reduce + apply for groups of consecutive rows (InstanceNorm: k = 1, GroupNorm: k = C/G).
#
# x is viewed as rows [R, L]; group g is rows g*k .. g*k+k-1, one contiguous run of k*L values;
# row r has channel r % C (its weight and bias).
#
# group_forward:  moments of each group, rstd = 1/sqrt(var + eps), then
#                 y = (x - mean) * (rstd * weight[c]) + bias[c].
# group_backward: per-row sums(dy), sum(dy * (x - mean)) centered on the group mean, then
#                 dx = rstd*w[c] * dy + b * (x - mean) + c with the group's b, c (row_ops.h).
#
# With enough groups each task is one group, done while it sits in cache: x (and dy) are read
# from memory once. With few groups (fewer than FUSED_MIN_GROUPS per thread) the same arithmetic
# runs as separate passes parallel over blocks. Both give the same bits (row_ops.h), so the
# choice, which depends on the thread count, never changes a result.
#
# Included by engine.pyx (one compiled module, so the Plan calls these cdef functions directly).

from cython.parallel import prange

from fused_types cimport floating
from chunking cimport BLOCK, n_blocks, block_len, use_threads
from libc.stdlib cimport free, malloc
from blocks cimport (apply_backward, apply_forward, block_grad_sums, block_moments,
                     merge_block_moments, nc_bwd_coeffs, nc_rstd, sum_parts)

cdef extern from "row_ops.h" nogil:
    void nc_groups_forward_f32(const float* x, float* y, Py_ssize_t g0, Py_ssize_t g1, Py_ssize_t k,
                               Py_ssize_t L, Py_ssize_t C, const double* w, const double* bias, double eps,
                               double* mean, double* m2, double* rstd)
    void nc_groups_forward_f64(const double* x, double* y, Py_ssize_t g0, Py_ssize_t g1, Py_ssize_t k,
                               Py_ssize_t L, Py_ssize_t C, const double* w, const double* bias, double eps,
                               double* mean, double* m2, double* rstd)
    void nc_group_backward_f32(const float* x, const float* dy, float* dx, Py_ssize_t k, Py_ssize_t L,
                               Py_ssize_t c0, Py_ssize_t C, const double* w, double mean, double rstd,
                               double* sdy, double* sdyxc)
    void nc_group_backward_f64(const double* x, const double* dy, double* dx, Py_ssize_t k, Py_ssize_t L,
                               Py_ssize_t c0, Py_ssize_t C, const double* w, double mean, double rstd,
                               double* sdy, double* sdyxc)

cdef enum:
    # Fused (one task per group) when there are at least this many groups per thread.
    FUSED_MIN_GROUPS = 4


cdef inline bint _fused(int n_threads, bint par, Py_ssize_t G) noexcept nogil:
    return not par or G >= FUSED_MIN_GROUPS * n_threads


cdef inline void groups_forward(const floating* x, floating* y, Py_ssize_t g0, Py_ssize_t g1, Py_ssize_t k,
                                Py_ssize_t L, Py_ssize_t C, const double* w, const double* bias, double eps,
                                double* mean, double* m2, double* rstd) noexcept nogil:
    """Groups g0 .. g1-1, each reduced and applied while in cache (row_ops.h)."""
    if floating is float:
        nc_groups_forward_f32(x, y, g0, g1, k, L, C, w, bias, eps, mean, m2, rstd)
    else:
        nc_groups_forward_f64(x, y, g0, g1, k, L, C, w, bias, eps, mean, m2, rstd)


cdef inline void group_backward_one(const floating* x, const floating* dy, floating* dx, Py_ssize_t g, Py_ssize_t k,
                                    Py_ssize_t L, Py_ssize_t C, const double* w, const double* mean,
                                    const double* rstd, double* sdy, double* sdyxc) noexcept nogil:
    """Group g's backward while in cache (row_ops.h)."""
    if floating is float:
        nc_group_backward_f32(x + g * k * L, dy + g * k * L, dx + g * k * L, k, L, g * k, C, w, mean[g], rstd[g],
                              &sdy[g * k], &sdyxc[g * k])
    else:
        nc_group_backward_f64(x + g * k * L, dy + g * k * L, dx + g * k * L, k, L, g * k, C, w, mean[g], rstd[g],
                              &sdy[g * k], &sdyxc[g * k])


def _check(Py_ssize_t R, Py_ssize_t L, Py_ssize_t k, Py_ssize_t C, arrays, per_channel, per_group,
           per_row=()):
    if k < 1 or C < 1 or R % k != 0 or R % C != 0:
        raise ValueError(f"k={k} and C={C} must divide the number of rows {R}")
    for v in arrays:
        if v.shape[0] != R or v.shape[1] != L:
            raise ValueError(f"arrays must have the shape of x ({R}, {L})")
    for v in per_channel:
        if v.shape[0] != C:
            raise ValueError(f"per-channel arrays must have {C} elements, got {v.shape[0]}")
    for v in per_group:
        if v.shape[0] != R // k:
            raise ValueError(f"per-group arrays must have {R // k} elements, got {v.shape[0]}")
    for v in per_row:
        if v.shape[0] != R:
            raise ValueError(f"per-row arrays must have {R} elements, got {v.shape[0]}")
    if L == 0 and R > 0:
        raise ValueError("groups need rows of at least one element")


cdef int group_forward_run(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t L, Py_ssize_t k, Py_ssize_t C,
                           const double* weight, const double* bias, double eps, double* mean, double* m2,
                           double* rstd, int n_threads) except -1 nogil:
    """group_forward on pointers (the engine's entry): x, y [R, L] C-contiguous, R*L > 0, k and C
    dividing R; per-group arrays of R // k doubles. The caller has checked every shape."""
    cdef Py_ssize_t G = R // k, n = k * L
    cdef Py_ssize_t nb, g, t, b, r, p, nt
    cdef double* parts
    cdef bint par = use_threads(n_threads, R * L)
    if _fused(n_threads, par, G):
        # One contiguous range of groups per thread, pipelined (row_ops.h): the ranges change
        # no result, only which thread computes it.
        if not par:
            groups_forward(x, y, 0, G, k, L, C, weight, bias, eps, mean, m2, rstd)
            return 0
        nt = n_threads
        for t in prange(nt, num_threads=n_threads, schedule="static"):
            groups_forward(x, y, G * t // nt, G * (t + 1) // nt, k, L, C, weight, bias, eps, mean, m2, rstd)
        return 0
    nb = n_blocks(n)
    parts = <double*>malloc(2 * G * nb * sizeof(double))
    if parts == NULL:
        with gil:
            raise MemoryError("group forward: no memory for the moments of the blocks")
    for t in prange(G * nb, num_threads=n_threads, use_threads_if=par, schedule="static"):
        g = t // nb
        b = t - g * nb
        block_moments(x + g * n + b * BLOCK, block_len(n, b), &parts[2 * t], &parts[2 * t + 1])
    for g in range(G):
        merge_block_moments(&parts[2 * g * nb], nb, n, BLOCK, &mean[g], &m2[g])
        rstd[g] = nc_rstd(m2[g], <double>n, eps)
    free(parts)
    nb = n_blocks(L)
    for t in prange(R * nb, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        g = r // k
        p = r % C
        apply_forward(x + r * L + b * BLOCK, y + r * L + b * BLOCK, block_len(L, b), mean[g], rstd[g] * weight[p],
                      bias[p])
    return 0


cdef int group_backward_run(const floating* x, const floating* dy, floating* dx, Py_ssize_t R, Py_ssize_t L,
                            Py_ssize_t k, Py_ssize_t C, const double* weight, const double* mean,
                            const double* rstd, double* sdy, double* sdyxc, int n_threads) except -1 nogil:
    """group_backward on pointers (the engine's entry); the contract of group_forward_run, with
    sdy, sdyxc [R] per row. The caller has checked every shape."""
    cdef Py_ssize_t G = R // k
    cdef Py_ssize_t nb, g, t, b, r, j, p
    cdef double* parts
    cdef double* gb
    cdef double* gc
    cdef double s, u, s1, s2
    cdef bint par = use_threads(n_threads, R * L)
    if _fused(n_threads, par, G):
        if not par:
            for g in range(G):
                group_backward_one(x, dy, dx, g, k, L, C, weight, mean, rstd, sdy, sdyxc)
            return 0
        for g in prange(G, num_threads=n_threads, schedule="static"):
            group_backward_one(x, dy, dx, g, k, L, C, weight, mean, rstd, sdy, sdyxc)
        return 0
    nb = n_blocks(L)
    parts = <double*>malloc((2 * R * nb + 2 * G) * sizeof(double))
    if parts == NULL:
        with gil:
            raise MemoryError("group backward: no memory for the partial sums")
    gb = parts + 2 * R * nb
    gc = gb + G
    for t in prange(R * nb, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        block_grad_sums(x + r * L + b * BLOCK, dy + r * L + b * BLOCK, block_len(L, b), mean[r // k],
                        &parts[2 * t], &parts[2 * t + 1])
    for g in range(G):
        s1 = 0.0
        s2 = 0.0
        for j in range(k):
            r = g * k + j
            sum_parts(&parts[2 * r * nb], nb, &s, &u)
            sdy[r] = s
            sdyxc[r] = u
            s1 = s1 + weight[r % C] * s
            s2 = s2 + weight[r % C] * u
        nc_bwd_coeffs(rstd[g], s1, s2, <double>(k * L), &gb[g], &gc[g])
    for t in prange(R * nb, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        g = r // k
        p = r % C
        apply_backward(dy + r * L + b * BLOCK, x + r * L + b * BLOCK, dx + r * L + b * BLOCK, block_len(L, b),
                       mean[g], rstd[g] * weight[p], gb[g], gc[g])
    free(parts)
    return 0


cdef void channel_sums(const double* sdy, const double* sdyxc, const double* rstd, Py_ssize_t N, Py_ssize_t C,
                       Py_ssize_t k, double* dweight, double* dbias) noexcept nogil:
    """The parameter gradients of consecutive-row groups: per channel c, over the batch in order,
    dbias = sum(dy) and dweight = sum(dy * (x - mean) * rstd) of its rows r = n * C + c."""
    cdef Py_ssize_t n, c, r
    cdef double s, u
    for c in range(C):
        s = 0.0
        u = 0.0
        for n in range(N):
            r = n * C + c
            s = s + sdy[r]
            u = u + sdyxc[r] * rstd[r // k]
        dbias[c] = s
        dweight[c] = u


def group_forward(const floating[:, ::1] x,    # IN  [R, L]
                  floating[:, ::1] y,          # OUT [R, L] (may be x itself)
                  Py_ssize_t k,                # rows per group
                  Py_ssize_t C,                # channels: row r has channel r % C
                  const double[::1] weight,    # IN  [C]
                  const double[::1] bias,      # IN  [C]
                  double eps,
                  double[::1] mean,            # OUT [R // k]
                  double[::1] m2,              # OUT [R // k] sum of squared deviations
                  double[::1] rstd,            # OUT [R // k] 1 / sqrt(m2 / (k*L) + eps)
                  int n_threads=1):
    """Normalise each group of k rows with its own statistics; per-channel affine (the checked
    entry point of group_forward_run)."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    _check(R, L, k, C, (x, y), (weight, bias), (mean, m2, rstd))
    if R == 0:
        return
    with nogil:
        group_forward_run(&x[0, 0], &y[0, 0], R, L, k, C, &weight[0], &bias[0], eps, &mean[0], &m2[0], &rstd[0],
                          n_threads)


def group_backward(const floating[:, ::1] x,    # IN  [R, L]
                   const floating[:, ::1] dy,   # IN  [R, L]
                   floating[:, ::1] dx,         # OUT [R, L] (may be dy itself)
                   Py_ssize_t k,
                   Py_ssize_t C,
                   const double[::1] weight,    # IN  [C]
                   const double[::1] mean,      # IN  [R // k] the forward's group means
                   const double[::1] rstd,      # IN  [R // k]
                   double[::1] sdy,             # OUT [R] per-row sum(dy)
                   double[::1] sdyxc,           # OUT [R] per-row sum(dy * (x - mean))
                   int n_threads=1):
    """dx of group_forward (statistics of the groups themselves), and the per-row sums (the
    checked entry point of group_backward_run)."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    _check(R, L, k, C, (x, dy, dx), (weight,), (mean, rstd), (sdy, sdyxc))
    if R == 0:
        return
    with nogil:
        group_backward_run(&x[0, 0], &dy[0, 0], &dx[0, 0], R, L, k, C, &weight[0], &mean[0], &rstd[0], &sdy[0],
                           &sdyxc[0], n_threads)
