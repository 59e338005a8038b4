"""Reduce, backward: per-row gradient sums of x, dy viewed as rows [R, L].

row_grad_sums:          sum(dy) and sum(dy * (x - center[r % period])) per row.
row_grad_sums_weighted: the same with dy weighted by a per-column w (LayerNorm's gamma).

Sums are float64, per BLOCK-element block, added in block order: bitwise identical for any
thread count. Centering on the statistics' own mean avoids the cancellation of
sum(dy * x) - mean * sum(dy) when |mean| >> std.
"""
import numpy as np
from cython.parallel import prange

from fused_types cimport floating
from chunking cimport BLOCK, n_blocks, block_len, use_threads
from blocks cimport block_grad_sums, block_grad_sums_weighted, sum_parts


def _check(Py_ssize_t R, Py_ssize_t L, x, dy, center, Py_ssize_t period, s, t, w=None):
    if dy.shape[0] != R or dy.shape[1] != L:
        raise ValueError(f"dy must have the shape of x ({R}, {L}), got {tuple(dy.shape[:2])}")
    if period < 1 or R % period != 0 and R > 0:
        raise ValueError(f"period must divide the number of rows {R}, got {period}")
    if center.shape[0] < min(period, R):
        raise ValueError(f"center needs {min(period, R)} elements, got {center.shape[0]}")
    if s.shape[0] != R or t.shape[0] != R:
        raise ValueError(f"output sums must have {R} elements")
    if w is not None and w.shape[0] != L:
        raise ValueError(f"w must have {L} elements, got {w.shape[0]}")
    if L == 0 and R > 0:
        raise ValueError("row gradient sums need rows of at least one element")


def row_grad_sums(const floating[:, ::1] x,       # IN  [R, L]
                  const floating[:, ::1] dy,      # IN  [R, L]
                  const double[::1] center,       # IN  [period] center of row r: center[r % period]
                  Py_ssize_t period,
                  double[::1] sum_dy,             # OUT [R]
                  double[::1] sum_dy_xc,          # OUT [R]
                  int n_threads=1):
    """Per-row sum(dy) and sum(dy * (x - center))."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t nb, t, r, b
    cdef double[:, ::1] parts
    cdef bint par = use_threads(n_threads, R * L)
    _check(R, L, x, dy, center, period, sum_dy, sum_dy_xc)
    if R == 0:
        return
    nb = n_blocks(L)
    if nb == 1:
        for r in prange(R, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
            block_grad_sums(&x[r, 0], &dy[r, 0], L, center[r % period], &sum_dy[r], &sum_dy_xc[r])
        return
    parts = np.empty((R * nb, 2), dtype=np.float64)
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        block_grad_sums(&x[r, b * BLOCK], &dy[r, b * BLOCK], block_len(L, b), center[r % period],
                        &parts[t, 0], &parts[t, 1])
    for r in prange(R, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        sum_parts(&parts[r * nb, 0], nb, &sum_dy[r], &sum_dy_xc[r])


def row_grad_sums_weighted(const floating[:, ::1] x,   # IN  [R, L]
                           const floating[:, ::1] dy,  # IN  [R, L]
                           const floating[::1] w,      # IN  [L] per-column weight
                           const double[::1] center,   # IN  [period]
                           Py_ssize_t period,
                           double[::1] sum_wdy,        # OUT [R]
                           double[::1] sum_wdy_xc,     # OUT [R]
                           int n_threads=1):
    """Per-row sum(w * dy) and sum(w * dy * (x - center))."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t nb, t, r, b
    cdef double[:, ::1] parts
    cdef bint par = use_threads(n_threads, R * L)
    _check(R, L, x, dy, center, period, sum_wdy, sum_wdy_xc, w)
    if R == 0:
        return
    nb = n_blocks(L)
    if nb == 1:
        for r in prange(R, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
            block_grad_sums_weighted(&x[r, 0], &dy[r, 0], &w[0], L, center[r % period],
                                     &sum_wdy[r], &sum_wdy_xc[r])
        return
    parts = np.empty((R * nb, 2), dtype=np.float64)
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        block_grad_sums_weighted(&x[r, b * BLOCK], &dy[r, b * BLOCK], &w[b * BLOCK],
                                 block_len(L, b), center[r % period], &parts[t, 0], &parts[t, 1])
    for r in prange(R, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        sum_parts(&parts[r * nb, 0], nb, &sum_wdy[r], &sum_wdy_xc[r])
