# The per-block and per-run arithmetic shared by the kernels lives in row_ops.h (C templates, so
# that the 16-lane sums vectorise and every entry point is compiled for each instruction set:
# dispatch.h); this file picks the float32 or float64 version and adds the merge of parts
# computed in parallel.
from fused_types cimport floating

cdef extern from "row_ops.h" nogil:
    enum: NC_BLOCK
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
    void nc_apply_rows_f32(const float* x, float* y, Py_ssize_t n, double center, double scale, double shift)
    void nc_apply_rows_f64(const double* x, double* y, Py_ssize_t n, double center, double scale, double shift)
    void nc_apply_rows_bwd_f32(const float* dy, const float* x, float* dx, Py_ssize_t n, double center,
                               double a, double b, double c)
    void nc_apply_rows_bwd_f64(const double* dy, const double* x, double* dx, Py_ssize_t n, double center,
                               double a, double b, double c)
    void nc_apply_rows_range_f32(const float* x, float* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L,
                                 Py_ssize_t period, const double* center, const double* scale,
                                 const double* shift)
    void nc_apply_rows_range_f64(const double* x, double* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L,
                                 Py_ssize_t period, const double* center, const double* scale,
                                 const double* shift)
    void nc_merge_step(double* na, double* mu, double* q, double nb, double mean_b, double m2_b)
    double nc_rstd(double m2, double count, double eps)
    void nc_bwd_coeffs(double rstd, double s1, double s2, double M, double* b, double* c)


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
    the rest of `length`) in block order with Chan's formula (OUT: mean, m2); the same steps
    as a run's moments in row_ops.h."""
    cdef Py_ssize_t b
    cdef double na = 0.0, mu = 0.0, q = 0.0
    for b in range(nb):
        nc_merge_step(&na, &mu, &q, <double>(length - b * block if length - b * block < block else block),
                      parts[2 * b], parts[2 * b + 1])
    mean[0] = mu
    m2[0] = q


cdef inline void sum_parts(const double* parts, Py_ssize_t nb, double* s, double* t) noexcept nogil:
    """The sums of nb consecutive (s, t) pairs of blocks, added in block order (OUT: s, t)."""
    cdef Py_ssize_t b
    cdef double a = parts[0], c = parts[1]
    for b in range(1, nb):
        a = a + parts[2 * b]
        c = c + parts[2 * b + 1]
    s[0] = a
    t[0] = c


cdef inline void merge_equal_rows(const double* mean, const double* m2, Py_ssize_t stride, Py_ssize_t k,
                                  double count, double* out_mean, double* out_m2) noexcept nogil:
    """Merge k rows of `count` elements each, row j's (mean, M2) at mean[j * stride], m2[j * stride],
    in row order with Chan's formula (OUT: out_mean, out_m2). Shifted by the running mean, it
    neither overflows where the values do not (k rows of 1e308: mean 1e308, M2 0; a sum of the
    row means would be inf) nor cancels; the combine step of every grouping, NCHW or
    channels-last."""
    cdef Py_ssize_t j
    cdef double na = 0.0, mu = 0.0, q = 0.0
    for j in range(k):
        nc_merge_step(&na, &mu, &q, count, mean[j * stride], m2[j * stride])
    out_mean[0] = mu
    out_m2[0] = q


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


cdef inline void apply_forward(const floating* x, floating* y, Py_ssize_t n, double center,
                               double scale, double shift) noexcept nogil:
    """y = ((x - hi) - lo) * scale + shift in the array type (center = hi + lo)."""
    if floating is float:
        nc_apply_rows_f32(x, y, n, center, scale, shift)
    else:
        nc_apply_rows_f64(x, y, n, center, scale, shift)


cdef inline void apply_row_range(const floating* x, floating* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L,
                                 Py_ssize_t period, const double* center, const double* scale,
                                 const double* shift) noexcept nogil:
    """apply_forward on the rows [r0, r1) of x and y ([R, L], contiguous), the coefficients of
    row r at r % period: one call for many short rows (no division per row)."""
    if floating is float:
        nc_apply_rows_range_f32(x, y, r0, r1, L, period, center, scale, shift)
    else:
        nc_apply_rows_range_f64(x, y, r0, r1, L, period, center, scale, shift)


cdef inline void apply_backward(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                double center, double a, double b, double c) noexcept nogil:
    """dx = a * dy + (b * (x - center) + c) in float64, rounded once."""
    if floating is float:
        nc_apply_rows_bwd_f32(dy, x, dx, n, center, a, b, c)
    else:
        nc_apply_rows_bwd_f64(dy, x, dx, n, center, a, b, c)
