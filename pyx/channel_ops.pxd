# BatchNorm's block kernels for short NCHW rows (channel_ops.h): the float32 or float64 version
# picked by the fused type.
from fused_types cimport floating

cdef extern from "channel_ops.h" nogil:
    enum: NC_SHORT_ROW
    enum: NC_FUSED_CHANNEL_BYTES
    void nc_channel_block_moments_f32(const float* x, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c,
                                      Py_ssize_t n0, Py_ssize_t n1, double* mean, double* m2)
    void nc_channel_block_moments_f64(const double* x, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c,
                                      Py_ssize_t n0, Py_ssize_t n1, double* mean, double* m2)
    void nc_channel_block_grad_sums_f32(const float* x, const float* dy, Py_ssize_t C, Py_ssize_t L,
                                        Py_ssize_t c, Py_ssize_t n0, Py_ssize_t n1, double center,
                                        double* sum_dy, double* sum_dy_xc)
    void nc_channel_block_grad_sums_f64(const double* x, const double* dy, Py_ssize_t C, Py_ssize_t L,
                                        Py_ssize_t c, Py_ssize_t n0, Py_ssize_t n1, double center,
                                        double* sum_dy, double* sum_dy_xc)
    void nc_channel_backward_f32(const float* x, const float* dy, float* dx, Py_ssize_t N, Py_ssize_t C,
                                 Py_ssize_t L, Py_ssize_t c, double w, double mean, double rstd, int batch_stats,
                                 double* dweight, double* dbias)
    void nc_channel_backward_f64(const double* x, const double* dy, double* dx, Py_ssize_t N, Py_ssize_t C,
                                 Py_ssize_t L, Py_ssize_t c, double w, double mean, double rstd, int batch_stats,
                                 double* dweight, double* dbias)
    void nc_channel_bwd_combine(double rstd, double w, double mean, double sum_dy, double sum_dy_xc, double M,
                                int batch_stats, double* dweight, double* a, double* b, double* c,
                                double* center)
    void nc_apply_rows_bwd_range_f32(const float* dy, const float* x, float* dx, Py_ssize_t r0,
                                     Py_ssize_t r1, Py_ssize_t L, Py_ssize_t period, const double* center,
                                     const double* a, const double* b, const double* c)
    void nc_apply_rows_bwd_range_f64(const double* dy, const double* x, double* dx, Py_ssize_t r0,
                                     Py_ssize_t r1, Py_ssize_t L, Py_ssize_t period, const double* center,
                                     const double* a, const double* b, const double* c)


cdef inline void channel_block_moments(const floating* x, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c,
                                       Py_ssize_t n0, Py_ssize_t n1, double* mean, double* m2) noexcept nogil:
    """(mean, M2) of rows n0 .. n1-1 of channel c of x [N, C, L] (OUT: mean, m2)."""
    if floating is float:
        nc_channel_block_moments_f32(x, C, L, c, n0, n1, mean, m2)
    else:
        nc_channel_block_moments_f64(x, C, L, c, n0, n1, mean, m2)


cdef inline void channel_block_grad_sums(const floating* x, const floating* dy, Py_ssize_t C, Py_ssize_t L,
                                         Py_ssize_t c, Py_ssize_t n0, Py_ssize_t n1, double center,
                                         double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """sum(dy) and sum(dy * (x - center)) over rows n0 .. n1-1 of channel c (OUT: the sums)."""
    if floating is float:
        nc_channel_block_grad_sums_f32(x, dy, C, L, c, n0, n1, center, sum_dy, sum_dy_xc)
    else:
        nc_channel_block_grad_sums_f64(x, dy, C, L, c, n0, n1, center, sum_dy, sum_dy_xc)


cdef inline void apply_backward_row_range(const floating* dy, const floating* x, floating* dx, Py_ssize_t r0,
                                          Py_ssize_t r1, Py_ssize_t L, Py_ssize_t period, const double* center,
                                          const double* a, const double* b, const double* c) noexcept nogil:
    """dx = a * dy + (b * (x - center) + c) on rows [r0, r1), coefficients of row r at r % period."""
    if floating is float:
        nc_apply_rows_bwd_range_f32(dy, x, dx, r0, r1, L, period, center, a, b, c)
    else:
        nc_apply_rows_bwd_range_f64(dy, x, dx, r0, r1, L, period, center, a, b, c)


cdef inline void channel_backward_fused(const floating* x, const floating* dy, floating* dx, Py_ssize_t N,
                                        Py_ssize_t C, Py_ssize_t L, Py_ssize_t c, double w, double mean,
                                        double rstd, bint batch_stats, double* dweight,
                                        double* dbias) noexcept nogil:
    """BatchNorm's backward of channel c while it is in cache (OUT: its dx, dweight, dbias)."""
    if floating is float:
        nc_channel_backward_f32(x, dy, dx, N, C, L, c, w, mean, rstd, batch_stats, dweight, dbias)
    else:
        nc_channel_backward_f64(x, dy, dx, N, C, L, c, w, mean, rstd, batch_stats, dweight, dbias)
