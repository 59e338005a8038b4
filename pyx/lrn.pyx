"""LocalResponseNorm: a sliding window across channels, forward and backward, in one pass.

    s_c = k + alpha/size * sum_{c' = c - size//2}^{c + (size-1)//2} a_{c'}^2   (zero padding)
    b_c = a_c * s_c^-beta
    da_c = dy_c * s_c^-beta
           - (2 alpha beta / size) * a_c * sum_{c' whose window holds c} dy_{c'} a_{c'} s_{c'}^(-beta-1)

x is viewed as [N, C, P] (P = product of the spatial sizes). A task is one sample and a chunk
of W contiguous spatial positions: lrn_chunk.h walks its channels once up (prefix sums of the
squares) and once down (suffix sums, the window sums, s^-beta and the output), with every inner
loop over the W positions, so it vectorises; the chunk's scratch stays in cache. beta = 0.75 and
0.5 use sqrt and a division instead of pow. Each output depends only on its own spatial column,
never on W or the thread count: bitwise identical for any thread count. Backward recomputes s
from x; forward allocates nothing but its output (and per-thread scratch of a few hundred KB).
"""
from cython.parallel import prange, parallel
from libc.stdlib cimport malloc, free

from fused_types cimport floating
from chunking cimport use_threads

cdef extern from "lrn_chunk.h" nogil:
    void nc_lrn_forward_chunk_f32(const float* x, float* y, Py_ssize_t stride, Py_ssize_t C, Py_ssize_t wn,
                                  Py_ssize_t W, Py_ssize_t size, double alpha, double beta, double k,
                                  double* scratch)
    void nc_lrn_forward_chunk_f64(const double* x, double* y, Py_ssize_t stride, Py_ssize_t C, Py_ssize_t wn,
                                  Py_ssize_t W, Py_ssize_t size, double alpha, double beta, double k,
                                  double* scratch)
    void nc_lrn_backward_chunk_f32(const float* dy, const float* x, float* dx, Py_ssize_t stride, Py_ssize_t C,
                                   Py_ssize_t wn, Py_ssize_t W, Py_ssize_t size, double alpha, double beta,
                                   double k, double* scratch)
    void nc_lrn_backward_chunk_f64(const double* dy, const double* x, double* dx, Py_ssize_t stride, Py_ssize_t C,
                                   Py_ssize_t wn, Py_ssize_t W, Py_ssize_t size, double alpha, double beta,
                                   double k, double* scratch)
    Py_ssize_t nc_lrn_scratch_forward(Py_ssize_t C, Py_ssize_t size, Py_ssize_t W)
    Py_ssize_t nc_lrn_scratch_backward(Py_ssize_t C, Py_ssize_t size, Py_ssize_t W)

cdef enum:
    # Doubles of scratch per thread the chunk width is sized for (256 KB: L2).
    SCRATCH_DOUBLES = 32768


cdef Py_ssize_t _chunk_width(Py_ssize_t per_position, Py_ssize_t P) noexcept nogil:
    """Spatial positions per task: a multiple of 8 (to vectorise), few enough to stay in cache."""
    cdef Py_ssize_t w = SCRATCH_DOUBLES // per_position
    w = (w // 8) * 8
    if w < 8:
        w = 8
    if w > 2048:
        w = 2048
    if w > P:
        w = P
    return w


def _check(x, y, size):
    if x.shape[0] != y.shape[0] or x.shape[1] != y.shape[1] or x.shape[2] != y.shape[2]:
        raise ValueError("arrays must have the shape of x")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")


def lrn_forward(const floating[:, :, ::1] x,   # IN  [N, C, P]
                floating[:, :, ::1] y,         # OUT [N, C, P]
                Py_ssize_t size, double alpha, double beta, double k,
                int n_threads=1):
    """y = x * (k + alpha/size * window sum of x^2)^-beta."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t W, nchunks, t, n, w0
    cdef double* scratch
    cdef int failed = 0
    cdef int* failed_flag = &failed  # written through the pointer: shared by the threads
    cdef bint par = use_threads(n_threads, N * C * P)
    _check(x, y, size)
    if N == 0 or C == 0 or P == 0:
        return
    W = _chunk_width(nc_lrn_scratch_forward(C, size, 1), P)
    nchunks = (P + W - 1) // W
    with nogil, parallel(num_threads=n_threads, use_threads_if=par):
        scratch = <double*>malloc(sizeof(double) * nc_lrn_scratch_forward(C, size, W))
        if scratch == NULL:
            failed_flag[0] = 1
        else:
            for t in prange(N * nchunks, schedule="static"):
                n = t // nchunks
                w0 = (t - n * nchunks) * W
                if floating is float:
                    nc_lrn_forward_chunk_f32(&x[n, 0, w0], &y[n, 0, w0], P, C, min(W, P - w0), W, size,
                                             alpha, beta, k, scratch)
                else:
                    nc_lrn_forward_chunk_f64(&x[n, 0, w0], &y[n, 0, w0], P, C, min(W, P - w0), W, size,
                                             alpha, beta, k, scratch)
            free(scratch)
    if failed:
        raise MemoryError("lrn_forward could not allocate its scratch buffer")


def lrn_backward(const floating[:, :, ::1] dy,  # IN  [N, C, P]
                 const floating[:, :, ::1] x,   # IN  [N, C, P]
                 floating[:, :, ::1] dx,        # OUT [N, C, P]
                 Py_ssize_t size, double alpha, double beta, double k,
                 int n_threads=1):
    """dx of y = x * s^-beta, recomputing s from x."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], P = x.shape[2]
    cdef Py_ssize_t W, nchunks, t, n, w0
    cdef double* scratch
    cdef int failed = 0
    cdef int* failed_flag = &failed
    cdef bint par = use_threads(n_threads, N * C * P)
    _check(x, dx, size)
    _check(x, dy, size)
    if N == 0 or C == 0 or P == 0:
        return
    W = _chunk_width(nc_lrn_scratch_backward(C, size, 1), P)
    nchunks = (P + W - 1) // W
    with nogil, parallel(num_threads=n_threads, use_threads_if=par):
        scratch = <double*>malloc(sizeof(double) * nc_lrn_scratch_backward(C, size, W))
        if scratch == NULL:
            failed_flag[0] = 1
        else:
            for t in prange(N * nchunks, schedule="static"):
                n = t // nchunks
                w0 = (t - n * nchunks) * W
                if floating is float:
                    nc_lrn_backward_chunk_f32(&dy[n, 0, w0], &x[n, 0, w0], &dx[n, 0, w0], P, C, min(W, P - w0),
                                              W, size, alpha, beta, k, scratch)
                else:
                    nc_lrn_backward_chunk_f64(&dy[n, 0, w0], &x[n, 0, w0], &dx[n, 0, w0], P, C, min(W, P - w0),
                                              W, size, alpha, beta, k, scratch)
            free(scratch)
    if failed:
        raise MemoryError("lrn_backward could not allocate its scratch buffer")
