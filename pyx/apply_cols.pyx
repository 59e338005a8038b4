"""LayerNorm's element-wise affine: per-row statistics, per-column weight and bias.

apply_cols:          y  = (x - center[r]) * scale[r] * weight[j] + bias[j]
apply_cols_backward: dx = a[r] * weight[j] * dy + b[r] * (x - center[r]) + c[r]
col_param_grads:     dweight[j] = sum_r dy * (x - center[r]) * scale[r];  dbias[j] = sum_r dy

The column sums run over fixed chunks of rows (their size depends only on R), each chunk's
partial sums kept apart and added in chunk order: bitwise identical for any thread count.
"""
import numpy as np
from cython.parallel import prange

from fused_types cimport floating
from chunking cimport BLOCK, ROW_CHUNK, COL_BLOCK, n_blocks, block_len, use_threads
from blocks cimport split_center


cdef inline void _forward(const floating* x, floating* y, const floating* w, const floating* bias,
                          bint has_bias, Py_ssize_t n, double center, double scale) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating hi, lo
    cdef floating s = <floating>scale
    split_center(center, &hi, &lo)
    if has_bias:
        for j in range(n):
            y[j] = (((x[j] - hi) - lo) * s) * w[j] + bias[j]
    else:
        for j in range(n):
            y[j] = (((x[j] - hi) - lo) * s) * w[j]


cdef inline void _backward(const floating* dy, const floating* x, floating* dx, const floating* w,
                           Py_ssize_t n, double center, double a, double b, double c) noexcept nogil:
    # In float64, rounded once (see apply_rows._backward).
    cdef Py_ssize_t j
    for j in range(n):
        dx[j] = <floating>(a * (<double>w[j] * dy[j]) + (b * (<double>x[j] - center) + c))


def _check_rows(Py_ssize_t R, Py_ssize_t L, arrays, vectors, w):
    for v in arrays:
        if v.shape[0] != R or v.shape[1] != L:
            raise ValueError(f"arrays must have the shape of x ({R}, {L})")
    for v in vectors:
        if v.shape[0] != R:
            raise ValueError(f"per-row arrays must have {R} elements, got {v.shape[0]}")
    if w is not None and w.shape[0] != L:
        raise ValueError(f"per-column arrays must have {L} elements, got {w.shape[0]}")


def apply_cols(const floating[:, ::1] x,         # IN  [R, L]
               floating[:, ::1] y,               # OUT [R, L] (may be x itself)
               const double[::1] center,         # IN  [R]
               const double[::1] scale,          # IN  [R]
               const floating[::1] weight not None,  # IN  [L]
               const floating[::1] bias,         # IN  [L] or None
               int n_threads=1):
    """y = (x - center[r]) * scale[r] * weight[j] + bias[j] (bias None: no shift)."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t nb, t, r, k
    cdef bint par = use_threads(n_threads, R * L)
    cdef bint has_bias = bias is not None
    cdef const floating* bptr = NULL
    _check_rows(R, L, (y,), (center, scale), weight)
    if has_bias:
        _check_rows(R, L, (), (), bias)
    if R == 0 or L == 0:
        return
    if has_bias:
        bptr = &bias[0]
    nb = n_blocks(L)
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        k = t - r * nb
        _forward(&x[r, k * BLOCK], &y[r, k * BLOCK], &weight[k * BLOCK],
                 (bptr + k * BLOCK) if has_bias else bptr, has_bias,
                 block_len(L, k), center[r], scale[r])


def apply_cols_backward(const floating[:, ::1] dy,       # IN  [R, L]
                        const floating[:, ::1] x,        # IN  [R, L]
                        floating[:, ::1] dx,             # OUT [R, L] (may be dy itself)
                        const double[::1] center,        # IN  [R]
                        const double[::1] a,             # IN  [R]
                        const double[::1] b,             # IN  [R]
                        const double[::1] c,             # IN  [R]
                        const floating[::1] weight not None,  # IN  [L]
                        int n_threads=1):
    """dx = a[r] * weight[j] * dy + b[r] * (x - center[r]) + c[r]."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t nb, t, r, k
    cdef bint par = use_threads(n_threads, R * L)
    _check_rows(R, L, (dy, dx), (center, a, b, c), weight)
    if R == 0 or L == 0:
        return
    nb = n_blocks(L)
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        k = t - r * nb
        _backward(&dy[r, k * BLOCK], &x[r, k * BLOCK], &dx[r, k * BLOCK], &weight[k * BLOCK],
                  block_len(L, k), center[r], a[r], b[r], c[r])


cdef inline void _col_chunk(const floating* x, const floating* dy, Py_ssize_t stride,
                            Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t j0, Py_ssize_t j1,
                            const double* center, const double* scale,
                            double* acc_w, double* acc_b) noexcept nogil:
    """Add rows r0..r1 of columns j0..j1 into acc_w[j], acc_b[j] (row order fixed)."""
    cdef Py_ssize_t r, j
    cdef double cr, sr
    cdef const floating* xr
    cdef const floating* gr
    for j in range(j0, j1):
        acc_w[j] = 0.0
        acc_b[j] = 0.0
    for r in range(r0, r1):
        xr = x + r * stride
        gr = dy + r * stride
        cr = center[r]
        sr = scale[r]
        for j in range(j0, j1):
            acc_w[j] += gr[j] * ((<double>xr[j] - cr) * sr)
            acc_b[j] += gr[j]


def col_param_grads(const floating[:, ::1] x,     # IN  [R, L]
                    const floating[:, ::1] dy,    # IN  [R, L]
                    const double[::1] center,     # IN  [R]
                    const double[::1] scale,      # IN  [R]
                    double[::1] dweight,          # OUT [L]
                    double[::1] dbias,            # OUT [L]
                    int n_threads=1):
    """dweight[j] = sum_r dy * (x - center[r]) * scale[r];  dbias[j] = sum_r dy."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t rows_per_chunk, nch, ncb, t, ch, cb, j0, j1, r0, r1, j
    cdef double[:, :, ::1] parts
    cdef double sw, sb
    cdef bint par = use_threads(n_threads, R * L)
    _check_rows(R, L, (dy,), (center, scale), dweight)
    if dbias.shape[0] != L:
        raise ValueError(f"dbias must have {L} elements")
    if L == 0:
        return
    if R == 0:
        dweight[:] = 0.0
        dbias[:] = 0.0
        return
    # At most 64 chunks, whatever R: the partial sums stay small next to x.
    rows_per_chunk = max(<Py_ssize_t>ROW_CHUNK, (R + 63) // 64)
    nch = (R + rows_per_chunk - 1) // rows_per_chunk
    ncb = (L + COL_BLOCK - 1) // COL_BLOCK
    if nch == 1:
        # One chunk: its sums are the result; no buffer (it would outweigh x for few rows).
        for cb in prange(ncb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
            j0 = cb * COL_BLOCK
            j1 = min(j0 + COL_BLOCK, L)
            _col_chunk(&x[0, 0], &dy[0, 0], L, 0, R, j0, j1, &center[0], &scale[0], &dweight[0], &dbias[0])
        return
    # nch <= R / 64 partial rows of 2 * L doubles: at most 1/16 of x's bytes for float32.
    parts = np.empty((nch, 2, L), dtype=np.float64)
    for t in prange(nch * ncb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        ch = t // ncb
        cb = t - ch * ncb
        r0 = ch * rows_per_chunk
        r1 = min(r0 + rows_per_chunk, R)
        j0 = cb * COL_BLOCK
        j1 = min(j0 + COL_BLOCK, L)
        _col_chunk(&x[0, 0], &dy[0, 0], L, r0, r1, j0, j1, &center[0], &scale[0],
                   &parts[ch, 0, 0], &parts[ch, 1, 0])
    for j in prange(L, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        sw = parts[0, 0, j]
        sb = parts[0, 1, j]
        for ch in range(1, nch):
            sw = sw + parts[ch, 0, j]
            sb = sb + parts[ch, 1, j]
        dweight[j] = sw
        dbias[j] = sb
