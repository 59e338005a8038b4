"""Combine: merge per-row statistics over the grouping a method wants (tiny [N, C] arrays).

Rows are indexed as [outer, k, inner] and merged over k: BatchNorm (outer=1, k=N, inner=C),
GroupNorm (outer=N*G, k=C/G, inner=1). Rows are merged in row order with Chan's formula
(blocks.merge_equal_rows, also what the fused channels-last kernel uses): no overflow or
cancellation where the data has none. Serial and in a fixed order: deterministic.
"""
from blocks cimport merge_equal_rows



def _check(Py_ssize_t n_in, Py_ssize_t n_out, Py_ssize_t outer, Py_ssize_t k, Py_ssize_t inner):
    if outer < 0 or k < 1 or inner < 0:
        raise ValueError(f"invalid grouping outer={outer}, k={k}, inner={inner}")
    if n_in != outer * k * inner or n_out != outer * inner:
        raise ValueError(f"grouping ({outer}, {k}, {inner}) does not match arrays of {n_in} and {n_out}")


def merge_moments(const double[::1] mean,     # IN  [outer*k*inner] row means
                  const double[::1] m2,       # IN  [outer*k*inner] row M2
                  Py_ssize_t count,           # elements per row
                  Py_ssize_t outer, Py_ssize_t k, Py_ssize_t inner,
                  double[::1] out_mean,       # OUT [outer*inner] group means
                  double[::1] out_m2):        # OUT [outer*inner] group M2
    """Group (mean, M2) of k equal-count rows per group."""
    cdef Py_ssize_t o, i, base
    _check(mean.shape[0], out_mean.shape[0], outer, k, inner)
    if m2.shape[0] != mean.shape[0] or out_m2.shape[0] != out_mean.shape[0]:
        raise ValueError("mean and m2 arrays must have equal lengths")
    if mean.shape[0] == 0:
        return
    with nogil:
        for o in range(outer):
            for i in range(inner):
                base = o * k * inner + i
                merge_equal_rows(&mean[base], &m2[base], inner, k, <double>count,
                                 &out_mean[o * inner + i], &out_m2[o * inner + i])


def sum_groups(const double[::1] v,          # IN  [outer*k*inner]
               Py_ssize_t outer, Py_ssize_t k, Py_ssize_t inner,
               double[::1] out):              # OUT [outer*inner]
    """out[o, i] = sum_j v[o, j, i], j in increasing order."""
    cdef Py_ssize_t o, j, i, base
    cdef double s
    _check(v.shape[0], out.shape[0], outer, k, inner)
    with nogil:
        for o in range(outer):
            for i in range(inner):
                base = o * k * inner + i
                s = 0.0
                for j in range(k):
                    s = s + v[base + j * inner]
                out[o * inner + i] = s
