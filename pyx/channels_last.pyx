"""Reduce and apply for channels-last input: x (N, C, *spatial) whose memory is (N, *spatial, C),
viewed without a copy as [N, L, C] (one sample: L positions of C contiguous channels).

cl_moments:          mean and M2 per (n, c) over the L positions  (the [N*C] rows of NCHW)
cl_grad_sums:        sum(dy), sum(dy * (x - center)) per (n, c)
cl_apply:            y  = (x - center) * scale + shift            per (n, c)
cl_apply_backward:   dx = a * dy + b * (x - center) + c          per (n, c)

Per-(n, c) values are in NCHW row order, index n * C + c; coefficient arrays are indexed by
(n * C + c) % period, so BatchNorm passes per-channel arrays (period C) and the others per-row
ones (period N * C), exactly as for apply_rows. The combine step between them is the same as
for NCHW. Work is cut into chunks of at most NC_CL_CHUNK positions of one sample (cl_ops.h),
merged in order: bitwise identical for any thread count.
"""
import numpy as np
from cython.parallel import prange, threadid
from libc.math cimport sqrt

from fused_types cimport floating
from chunking cimport use_threads
from blocks cimport merge_equal_rows, nc_merge_step

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


cdef inline Py_ssize_t _chunk_rows(Py_ssize_t L, Py_ssize_t ch) noexcept nogil:
    cdef Py_ssize_t rest = L - ch * NC_CL_CHUNK
    return NC_CL_CHUNK if rest > NC_CL_CHUNK else rest


cdef inline void _chunk_moments(const floating* x, Py_ssize_t nrows, Py_ssize_t C, double* scratch,
                                double* out) noexcept nogil:
    """Column moments of one chunk (scratch: 2*C doubles; out: C means then C M2)."""
    if floating is float:
        nc_cl_moments_f32(x, nrows, C, scratch, scratch + C, out, out + C)
    else:
        nc_cl_moments_f64(x, nrows, C, scratch, scratch + C, out, out + C)


cdef inline void _merge_chunks(const double* parts, Py_ssize_t nch, Py_ssize_t L, Py_ssize_t C,
                               double* mean, double* m2) noexcept nogil:
    """One sample's chunk moments (parts: nch blocks of 2*C) merged in order per column."""
    cdef Py_ssize_t c, ch
    cdef double na, mu, q
    for c in range(C):
        na = 0.0
        mu = 0.0
        q = 0.0
        for ch in range(nch):
            nc_merge_step(&na, &mu, &q, <double>_chunk_rows(L, ch), parts[ch * 2 * C + c],
                          parts[ch * 2 * C + C + c])
        mean[c] = mu
        m2[c] = q


def _check(x, arrays, Py_ssize_t period, coeffs, per_row=()):
    N, L, C = x.shape[0], x.shape[1], x.shape[2]
    for v in arrays:
        if tuple(v.shape[:3]) != (N, L, C):
            raise ValueError(f"arrays must have the shape of x ({N}, {L}, {C})")
    if N * C > 0 and (period < 1 or (N * C) % period != 0 or period % C != 0):
        raise ValueError(f"period must be a multiple of C={C} dividing N*C={N * C}, got {period}")
    for v in coeffs:
        if v.shape[0] < min(period, N * C):
            raise ValueError(f"coefficient arrays need {min(period, N * C)} elements, got {v.shape[0]}")
    for v in per_row:
        if v.shape[0] != N * C:
            raise ValueError(f"per-(n, c) arrays must have {N * C} elements, got {v.shape[0]}")
    if L == 0 and N * C > 0 and per_row:
        raise ValueError("channels-last sums need at least one position")


def cl_moments(const floating[:, :, ::1] x,   # IN  [N, L, C]
               double[::1] mean,              # OUT [N*C]
               double[::1] m2,                # OUT [N*C]
               int n_threads=1):
    """Mean and M2 per (n, c) over the L positions of sample n."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2]
    cdef Py_ssize_t nch, t, n, ch, tid
    cdef double[:, :, ::1] parts
    cdef double[:, ::1] scratch
    cdef bint par = use_threads(n_threads, N * L * C)
    _check(x, (), C, (), (mean, m2))
    if N * C == 0:
        return
    nch = (L + NC_CL_CHUNK - 1) // NC_CL_CHUNK
    parts = np.empty((N * nch, 2, C), dtype=np.float64)
    scratch = np.empty((max(n_threads, 1), 2 * C), dtype=np.float64)
    for t in prange(N * nch, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        n = t // nch
        ch = t - n * nch
        tid = threadid()
        _chunk_moments(&x[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch), C, &scratch[tid, 0], &parts[t, 0, 0])
    for n in prange(N, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        _merge_chunks(&parts[n * nch, 0, 0], nch, L, C, &mean[n * C], &m2[n * C])


def cl_grad_sums(const floating[:, :, ::1] x,    # IN  [N, L, C]
                 const floating[:, :, ::1] dy,   # IN  [N, L, C]
                 const double[::1] center,       # IN  [period]
                 Py_ssize_t period,
                 double[::1] sum_dy,             # OUT [N*C]
                 double[::1] sum_dy_xc,          # OUT [N*C]
                 int n_threads=1):
    """sum(dy) and sum(dy * (x - center)) per (n, c)."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2]
    cdef Py_ssize_t nch, t, n, ch, c
    cdef double s, u
    cdef double[:, :, ::1] parts
    cdef bint par = use_threads(n_threads, N * L * C)
    _check(x, (dy,), period, (center,), (sum_dy, sum_dy_xc))
    if N * C == 0:
        return
    nch = (L + NC_CL_CHUNK - 1) // NC_CL_CHUNK
    parts = np.empty((N * nch, 2, C), dtype=np.float64)
    for t in prange(N * nch, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        n = t // nch
        ch = t - n * nch
        if floating is float:
            nc_cl_grad_sums_f32(&x[n, ch * NC_CL_CHUNK, 0], &dy[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch),
                                C, &center[(n * C) % period], &parts[t, 0, 0], &parts[t, 1, 0])
        else:
            nc_cl_grad_sums_f64(&x[n, ch * NC_CL_CHUNK, 0], &dy[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch),
                                C, &center[(n * C) % period], &parts[t, 0, 0], &parts[t, 1, 0])
    for n in prange(N, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        for c in range(C):
            s = parts[n * nch, 0, c]
            u = parts[n * nch, 1, c]
            for ch in range(1, nch):
                s = s + parts[n * nch + ch, 0, c]
                u = u + parts[n * nch + ch, 1, c]
            sum_dy[n * C + c] = s
            sum_dy_xc[n * C + c] = u


def cl_apply(const floating[:, :, ::1] x,    # IN  [N, L, C]
             floating[:, :, ::1] y,          # OUT [N, L, C] (may be x itself)
             const double[::1] center,       # IN  [period]
             const double[::1] scale,        # IN  [period]
             const double[::1] shift,        # IN  [period]
             Py_ssize_t period,
             int n_threads=1):
    """y = (x - center) * scale + shift, coefficients of (n, c) at (n*C + c) % period, in the
    array type with the center split in two parts (as apply_rows)."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2]
    cdef Py_ssize_t nch, t, n, ch, i, off, P
    cdef floating[:, ::1] co
    cdef bint par = use_threads(n_threads, N * L * C)
    _check(x, (y,), period, (center, scale, shift))
    if N * C == 0 or L == 0:
        return
    P = min(period, N * C)
    co = np.empty((4, P), dtype=np.float32 if floating is float else np.float64)
    for i in range(P):
        co[0, i] = <floating>center[i]
        co[1, i] = <floating>(center[i] - <double>co[0, i])
        co[2, i] = <floating>scale[i]
        co[3, i] = <floating>shift[i]
    nch = (L + NC_CL_CHUNK - 1) // NC_CL_CHUNK
    for t in prange(N * nch, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        n = t // nch
        ch = t - n * nch
        off = (n * C) % P
        if floating is float:
            nc_cl_apply_f32(&x[n, ch * NC_CL_CHUNK, 0], &y[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch), C,
                            &co[0, off], &co[1, off], &co[2, off], &co[3, off])
        else:
            nc_cl_apply_f64(&x[n, ch * NC_CL_CHUNK, 0], &y[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch), C,
                            &co[0, off], &co[1, off], &co[2, off], &co[3, off])


def cl_apply_backward(const floating[:, :, ::1] dy,   # IN  [N, L, C]
                      const floating[:, :, ::1] x,    # IN  [N, L, C]
                      floating[:, :, ::1] dx,         # OUT [N, L, C] (may be dy itself)
                      const double[::1] center,       # IN  [period]
                      const double[::1] a,            # IN  [period]
                      const double[::1] b,            # IN  [period]
                      const double[::1] c,            # IN  [period]
                      Py_ssize_t period,
                      int n_threads=1):
    """dx = a * dy + b * (x - center) + c in float64, rounded once."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2]
    cdef Py_ssize_t nch, t, n, ch, off
    cdef bint par = use_threads(n_threads, N * L * C)
    _check(x, (dy, dx), period, (center, a, b, c))
    if N * C == 0 or L == 0:
        return
    nch = (L + NC_CL_CHUNK - 1) // NC_CL_CHUNK
    for t in prange(N * nch, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        n = t // nch
        ch = t - n * nch
        off = (n * C) % period
        if floating is float:
            nc_cl_apply_bwd_f32(&dy[n, ch * NC_CL_CHUNK, 0], &x[n, ch * NC_CL_CHUNK, 0], &dx[n, ch * NC_CL_CHUNK, 0],
                                _chunk_rows(L, ch), C, &center[off], &a[off], &b[off], &c[off])
        else:
            nc_cl_apply_bwd_f64(&dy[n, ch * NC_CL_CHUNK, 0], &x[n, ch * NC_CL_CHUNK, 0], &dx[n, ch * NC_CL_CHUNK, 0],
                                _chunk_rows(L, ch), C, &center[off], &a[off], &b[off], &c[off])


def cl_group_forward(const floating[:, :, ::1] x,   # IN  [N, L, C]
                     floating[:, :, ::1] y,         # OUT [N, L, C] (may be x itself)
                     Py_ssize_t G,                  # groups per sample: C/G consecutive channels
                     const double[::1] weight,      # IN  [C]
                     const double[::1] bias,        # IN  [C]
                     double eps,
                     double[::1] row_mean,          # OUT [N*C] per (n, c)
                     double[::1] row_m2,            # OUT [N*C]
                     double[::1] mean,              # OUT [N*G] per (n, group)
                     double[::1] m2,                # OUT [N*G]
                     double[::1] rstd,              # OUT [N*G]
                     int n_threads=1):
    """InstanceNorm (G = C) and GroupNorm forward with their own statistics, one sample per
    task while it is in cache: cl_moments, then the groups merged as combine.merge_moments
    does (blocks.merge_equal_rows: Chan's formula in row order), rstd, and
    cl_apply with center mean, scale rstd * weight[c], shift bias[c]. The same bits as those
    three steps run one after the other."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], C = x.shape[2]
    cdef Py_ssize_t k, nch, n, ch, c, g, j, tid, r
    cdef double s, sc
    cdef double[:, :, ::1] parts
    cdef double[:, ::1] scratch
    cdef floating[:, :, ::1] co
    cdef bint par = use_threads(n_threads, N * L * C)
    if G < 1 or (C > 0 and C % G != 0):
        raise ValueError(f"G={G} must divide C={C}")
    _check(x, (y,), C, (weight, bias), (row_mean, row_m2))
    if mean.shape[0] != N * G or m2.shape[0] != N * G or rstd.shape[0] != N * G:
        raise ValueError(f"per-group arrays must have {N * G} elements")
    if N * C == 0:
        return
    k = C // G
    nch = (L + NC_CL_CHUNK - 1) // NC_CL_CHUNK
    parts = np.empty((N * nch, 2, C), dtype=np.float64)
    scratch = np.empty((max(n_threads, 1), 2 * C), dtype=np.float64)
    co = np.empty((max(n_threads, 1), 4, C), dtype=np.float32 if floating is float else np.float64)
    for n in prange(N, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        tid = threadid()
        for ch in range(nch):
            _chunk_moments(&x[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch), C, &scratch[tid, 0],
                           &parts[n * nch + ch, 0, 0])
        _merge_chunks(&parts[n * nch, 0, 0], nch, L, C, &row_mean[n * C], &row_m2[n * C])
        for g in range(G):
            r = n * C + g * k
            merge_equal_rows(&row_mean[r], &row_m2[r], 1, k, <double>L, &mean[n * G + g], &m2[n * G + g])
            s = mean[n * G + g]
            rstd[n * G + g] = 1.0 / sqrt(max(m2[n * G + g] / (k * L), 0.0) + eps)
            for j in range(k):
                c = g * k + j
                co[tid, 0, c] = <floating>s
                co[tid, 1, c] = <floating>(s - <double>co[tid, 0, c])
                sc = rstd[n * G + g] * weight[c]
                co[tid, 2, c] = <floating>sc
                co[tid, 3, c] = <floating>bias[c]
        for ch in range(nch):
            if floating is float:
                nc_cl_apply_f32(&x[n, ch * NC_CL_CHUNK, 0], &y[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch), C,
                                &co[tid, 0, 0], &co[tid, 1, 0], &co[tid, 2, 0], &co[tid, 3, 0])
            else:
                nc_cl_apply_f64(&x[n, ch * NC_CL_CHUNK, 0], &y[n, ch * NC_CL_CHUNK, 0], _chunk_rows(L, ch), C,
                                &co[tid, 0, 0], &co[tid, 1, 0], &co[tid, 2, 0], &co[tid, 3, 0])
