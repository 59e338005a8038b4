"""Reduce, forward: per-row moments (mean, M2) of x viewed as rows [R, L].

Each row is cut into BLOCK-element blocks; a block's (mean, M2) comes from two passes while
it sits in cache; the blocks of a row are merged in order with Chan's formula. The pieces and
the merge order depend only on L, so the result is bitwise identical for any thread count.
"""
import numpy as np
from cython.parallel import prange

from fused_types cimport floating
from chunking cimport BLOCK, n_blocks, block_len, use_threads
from blocks cimport block_moments, merge_block_moments


def row_moments(const floating[:, ::1] x,   # IN  [R, L], L >= 1
                double[::1] mean,            # OUT [R] row means
                double[::1] m2,              # OUT [R] row sums of squared deviations
                int n_threads=1):
    """Per-row mean and M2 = sum((x - mean)^2), accumulated in float64."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef Py_ssize_t nb, t, r, b
    cdef double[:, ::1] parts
    cdef bint par = use_threads(n_threads, R * L)
    if mean.shape[0] != R or m2.shape[0] != R:
        raise ValueError(f"mean and m2 must have {R} elements, got {mean.shape[0]} and {m2.shape[0]}")
    if R == 0:
        return
    if L == 0:
        raise ValueError("row_moments needs rows of at least one element")
    nb = n_blocks(L)
    if nb == 1:
        for r in prange(R, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
            block_moments(&x[r, 0], L, &mean[r], &m2[r])
        return
    parts = np.empty((R * nb, 2), dtype=np.float64)
    for t in prange(R * nb, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r = t // nb
        b = t - r * nb
        block_moments(&x[r, b * BLOCK], block_len(L, b), &parts[t, 0], &parts[t, 1])
    for r in prange(R, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        merge_block_moments(&parts[r * nb, 0], nb, L, BLOCK, &mean[r], &m2[r])
