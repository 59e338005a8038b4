# The parallel loops over the rows [R, L] of a contiguous array that several kernels share
# (cimported, so compiled into each kernel that uses them). Pieces and merge order depend only
# on R and L: the results are bitwise identical for any thread count.
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

from fused_types cimport floating
from chunking cimport BLOCK, n_blocks, block_len
from blocks cimport apply_row_range, block_moments, merge_block_moments

cdef enum:
    # Rows shorter than a block are applied in tasks of about this many values.
    TASK_VALUES = 4096


cdef inline int rows_moments(const floating* x, Py_ssize_t R, Py_ssize_t L, double* mean, double* m2,
                             Py_ssize_t stride, int n_threads, bint par) except -1 nogil:
    """mean[r * stride] and m2[r * stride] of each row r of x (L >= 1): a row's BLOCK-sized
    pieces, each in two passes while in cache, merged in order with Chan's formula."""
    cdef Py_ssize_t nb = n_blocks(L), t, r, b
    cdef double* parts
    if nb == 1:
        if not par:
            for r in range(R):
                block_moments(x + r * L, L, &mean[r * stride], &m2[r * stride])
            return 0
        for r in prange(R, num_threads=n_threads, schedule="static"):
            block_moments(x + r * L, L, &mean[r * stride], &m2[r * stride])
        return 0
    parts = <double*>malloc(2 * R * nb * sizeof(double))
    if parts == NULL:
        with gil:
            raise MemoryError("row moments: no memory for the partial moments of the blocks")
    for t in prange(R * nb, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        block_moments(x + r * L + b * BLOCK, block_len(L, b), &parts[2 * t], &parts[2 * t + 1])
    for r in prange(R, num_threads=n_threads, use_threads_if=par, schedule="static"):
        merge_block_moments(&parts[2 * r * nb], nb, L, BLOCK, &mean[r * stride], &m2[r * stride])
    free(parts)
    return 0


cdef inline void apply_short_rows(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t L,
                                  Py_ssize_t period, const double* center, const double* scale,
                                  const double* shift, int n_threads, bint par) noexcept nogil:
    """y = (x - center) * scale + shift per row (coefficients at r % period) for rows of at most
    one block: tasks of several rows, one call each, no division per row. The apply is
    element-wise: how rows are grouped into tasks changes no bit."""
    cdef Py_ssize_t per = TASK_VALUES // L if L < TASK_VALUES else 1
    cdef Py_ssize_t t
    if not par:  # one call, no OpenMP region (that costs about a microsecond even serially)
        apply_row_range(x, y, 0, R, L, period, center, scale, shift)
        return
    for t in prange((R + per - 1) // per, num_threads=n_threads, schedule="static"):
        apply_row_range(x, y, t * per, min(R, t * per + per), L, period, center, scale, shift)
