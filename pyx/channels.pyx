"""BatchNorm's forward in one call: statistics per channel over (N, *spatial), then the apply.

x is viewed as rows [R, L], R = N*C, row r = (n, c) with c = r % C. With batch statistics:
per-row moments (blocks merged in order, parallel over rows and blocks), merged per channel
over n in order with Chan's formula (row_ops.h nc_merge_step), which keeps a constant channel
exact: equal row means merge with delta = 0.
With given statistics (running mean and var), those. Then rstd = 1/sqrt(max(var, 0) + eps) and
y = (x - mean_c) * (rstd_c * weight_c) + bias_c. Everything between the two passes over x is
done here, in C, so that a tiny input costs one Python call (no NumPy temporaries), and the
row buffers of an input with few rows live on the stack.
"""
import numpy as np
from cython.parallel import prange
from libc.stdlib cimport free, malloc

from fused_types cimport floating
from chunking cimport BLOCK, n_blocks, block_len, use_threads
from blocks cimport apply_forward, nc_merge_step, nc_rstd
from row_loops cimport apply_short_rows, rows_moments

cdef enum:
    STACK_ROWS = 256   # row statistics of at most this many rows stay on the stack


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
    """Normalise per channel; batch_stats False: mean and m2 hold the given mean and variance."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t N, nb, t, r, b, c, n
    cdef double[::1] scale
    cdef double s, q, d
    cdef double stack_buf[2 * STACK_ROWS]
    cdef double* rows = stack_buf
    cdef bint par = use_threads(n_threads, R * L)
    if C < 1 or R % C != 0:
        raise ValueError(f"C={C} must divide the number of rows {R}")
    if y.shape[0] != R or y.shape[1] != L:
        raise ValueError("y must have the shape of x")
    if (weight.shape[0] != C or bias.shape[0] != C or mean.shape[0] != C or m2.shape[0] != C
            or rstd.shape[0] != C):
        raise ValueError(f"per-channel arrays must have {C} elements")
    if R == 0 or L == 0:
        return
    N = R // C
    nb = n_blocks(L)
    if batch_stats:
        if R > STACK_ROWS:
            rows = <double*>malloc(2 * R * sizeof(double))
            if rows == NULL:
                raise MemoryError()
        try:
            with nogil:
                rows_moments(&x[0, 0], R, L, rows, rows + 1, 2, n_threads, par)
                for c in range(C):
                    d = 0.0
                    s = 0.0
                    q = 0.0
                    for n in range(N):
                        nc_merge_step(&d, &s, &q, <double>L, rows[2 * (n * C + c)], rows[2 * (n * C + c) + 1])
                    mean[c] = s
                    m2[c] = q
                    rstd[c] = nc_rstd(q, <double>(N * L), eps)
        finally:
            if rows != stack_buf:
                free(rows)
    else:
        for c in range(C):
            rstd[c] = nc_rstd(m2[c], 1.0, eps)
    scale = np.empty(C)
    for c in range(C):
        scale[c] = rstd[c] * weight[c]
    if nb == 1:
        with nogil:
            apply_short_rows(&x[0, 0], &y[0, 0], R, L, C, &mean[0], &scale[0], &bias[0], n_threads, par)
        return
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        c = r % C
        apply_forward(&x[r, b * BLOCK], &y[r, b * BLOCK], block_len(L, b), mean[c], scale[c], bias[c])
