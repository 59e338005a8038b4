# Inline per-block work shared by the kernels. A block is at most BLOCK contiguous elements
# of one row. The one-pass float64 sums live in block_sums.h (C, so that `omp simd reduction`
# can vectorise them); this file picks the float32 or float64 version and adds the merge steps.
from fused_types cimport floating

cdef extern from "block_sums.h" nogil:
    void nc_block_moments_f32(const float* x, Py_ssize_t n, double* mean, double* m2)
    void nc_block_moments_f64(const double* x, Py_ssize_t n, double* mean, double* m2)
    void nc_block_grad_sums_f32(const float* x, const float* dy, Py_ssize_t n, double center,
                                double* sum_dy, double* sum_dy_xc)
    void nc_block_grad_sums_f64(const double* x, const double* dy, Py_ssize_t n, double center,
                                double* sum_dy, double* sum_dy_xc)
    void nc_block_grad_sums_weighted_f32(const float* x, const float* dy, const float* w, Py_ssize_t n,
                                         double center, double* sum_wdy, double* sum_wdy_xc)
    void nc_block_grad_sums_weighted_f64(const double* x, const double* dy, const double* w, Py_ssize_t n,
                                         double center, double* sum_wdy, double* sum_wdy_xc)


cdef inline void block_moments(const floating* x, Py_ssize_t n,
                               double* mean, double* m2) noexcept nogil:
    """Mean and M2 = sum((x - mean)^2) of x[0:n], n >= 1 (OUT: mean, m2), in float64."""
    if floating is float:
        nc_block_moments_f32(x, n, mean, m2)
    else:
        nc_block_moments_f64(x, n, mean, m2)


cdef inline void merge_block_moments(const double* parts, Py_ssize_t nb, Py_ssize_t length,
                                     Py_ssize_t block, double* mean, double* m2) noexcept nogil:
    """Merge nb consecutive (mean, M2) pairs of blocks of `block` elements (the last one holds
    the rest of `length`) in block order with Chan's formula (OUT: mean, m2)."""
    cdef Py_ssize_t b
    cdef double na = <double>(block if length > block else length)
    cdef double mu = parts[0], q = parts[1]
    cdef double nb_, n, delta
    for b in range(1, nb):
        nb_ = <double>(length - b * block if length - b * block < block else block)
        n = na + nb_
        delta = parts[2 * b] - mu
        mu = mu + delta * (nb_ / n)
        q = q + parts[2 * b + 1] + delta * delta * (na * nb_ / n)
        na = n
    mean[0] = mu
    m2[0] = q


cdef inline void block_grad_sums(const floating* x, const floating* dy, Py_ssize_t n,
                                 double center, double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """sum(dy) and sum(dy * (x - center)) over n elements, in float64 (OUT: the two sums)."""
    if floating is float:
        nc_block_grad_sums_f32(x, dy, n, center, sum_dy, sum_dy_xc)
    else:
        nc_block_grad_sums_f64(x, dy, n, center, sum_dy, sum_dy_xc)


cdef inline void block_grad_sums_weighted(const floating* x, const floating* dy,
                                          const floating* w, Py_ssize_t n, double center,
                                          double* sum_wdy, double* sum_wdy_xc) noexcept nogil:
    """sum(w * dy) and sum(w * dy * (x - center)) over n elements (w: per-column weight)."""
    if floating is float:
        nc_block_grad_sums_weighted_f32(x, dy, w, n, center, sum_wdy, sum_wdy_xc)
    else:
        nc_block_grad_sums_weighted_f64(x, dy, w, n, center, sum_wdy, sum_wdy_xc)


cdef inline void split_center(double center, floating* hi, floating* lo) noexcept nogil:
    """center = hi + lo to about twice the precision of `floating`, so that
    (x - hi) - lo is the difference x - center rounded once (Sterbenz makes x - hi exact
    when x is near the center): a constant row normalises to exactly its shift."""
    hi[0] = <floating>center
    lo[0] = <floating>(center - <double>hi[0])
