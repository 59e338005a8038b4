"""Reduce, forward: per-row moments (mean, M2) of x viewed as rows [R, L].

Each row is cut into BLOCK-element blocks; a block's (mean, M2) comes from two passes while
it sits in cache; the blocks of a row are merged in order with Chan's formula. The pieces and
the merge order depend only on L, so the result is bitwise identical for any thread count.
"""
from fused_types cimport floating
from chunking cimport use_threads
from row_loops cimport rows_moments


def row_moments(const floating[:, ::1] x,   # IN  [R, L], L >= 1
                double[::1] mean,            # OUT [R] row means
                double[::1] m2,              # OUT [R] row sums of squared deviations
                int n_threads=1):
    """Per-row mean and M2 = sum((x - mean)^2), accumulated in float64."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef bint par = use_threads(n_threads, R * L)
    if mean.shape[0] != R or m2.shape[0] != R:
        raise ValueError(f"mean and m2 must have {R} elements, got {mean.shape[0]} and {m2.shape[0]}")
    if R == 0:
        return
    if L == 0:
        raise ValueError("row_moments needs rows of at least one element")
    with nogil:
        rows_moments(&x[0, 0], R, L, &mean[0], &m2[0], 1, n_threads, par)
