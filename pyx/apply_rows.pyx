"""Apply, per row: one pass of an affine map whose coefficients are constant along a row.

forward:  y  = ((x - center) * scale) + shift      (in the array type)
backward: dx = a * dy + b * (x - center) + c       (in float64, rounded once)

Coefficients are float64 arrays indexed by r % period (period = C lets BatchNorm pass
per-channel arrays for rows (n, c); period = R gives one coefficient per row). The arithmetic
of the forward is in the array type, with the center split in two parts of that type so
x - center is formed without losing digits to a large mean (a constant row maps exactly to its
shift).
"""
from cython.parallel import prange

from fused_types cimport floating
from chunking cimport BLOCK, n_blocks, block_len, use_threads
from blocks cimport apply_forward, apply_backward
from row_loops cimport apply_short_rows


def _check_coeffs(Py_ssize_t R, Py_ssize_t period, *coeffs):
    if period < 1 or (R > 0 and R % period != 0):
        raise ValueError(f"period must divide the number of rows {R}, got {period}")
    for v in coeffs:
        if v.shape[0] < min(period, R):
            raise ValueError(f"coefficient arrays need {min(period, R)} elements, got {v.shape[0]}")


def apply_rows(const floating[:, ::1] x,      # IN  [R, L]
               floating[:, ::1] y,            # OUT [R, L] (may be x itself)
               const double[::1] center,      # IN  [period]
               const double[::1] scale,       # IN  [period]
               const double[::1] shift,       # IN  [period]
               Py_ssize_t period,
               int n_threads=1):
    """y = (x - center[r % period]) * scale[r % period] + shift[r % period]."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t nb, t, r, b, p
    cdef bint par = use_threads(n_threads, R * L)
    if y.shape[0] != R or y.shape[1] != L:
        raise ValueError("y must have the shape of x")
    _check_coeffs(R, period, center, scale, shift)
    if R == 0 or L == 0:
        return
    nb = n_blocks(L)
    if nb == 1:
        with nogil:
            apply_short_rows(&x[0, 0], &y[0, 0], R, L, period, &center[0], &scale[0], &shift[0], n_threads, par)
        return
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        p = r % period
        apply_forward(&x[r, b * BLOCK], &y[r, b * BLOCK], block_len(L, b), center[p], scale[p], shift[p])


def apply_rows_backward(const floating[:, ::1] dy,   # IN  [R, L]
                        const floating[:, ::1] x,    # IN  [R, L]
                        floating[:, ::1] dx,         # OUT [R, L] (may be dy itself)
                        const double[::1] center,    # IN  [period]
                        const double[::1] a,         # IN  [period]
                        const double[::1] b,         # IN  [period]
                        const double[::1] c,         # IN  [period]
                        Py_ssize_t period,
                        int n_threads=1):
    """dx = a * dy + b * (x - center) + c, coefficients of row r at r % period."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t nb, t, r, k, p
    cdef bint par = use_threads(n_threads, R * L)
    if dy.shape[0] != R or dy.shape[1] != L or dx.shape[0] != R or dx.shape[1] != L:
        raise ValueError("dy and dx must have the shape of x")
    _check_coeffs(R, period, center, a, b, c)
    if R == 0 or L == 0:
        return
    nb = n_blocks(L)
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        k = t - r * nb
        p = r % period
        apply_backward(&dy[r, k * BLOCK], &x[r, k * BLOCK], &dx[r, k * BLOCK], block_len(L, k),
                  center[p], a[p], b[p], c[p])
