# LocalResponseNorm: a sliding window across channels, forward and backward, in one pass.
#
#     s_c = k + alpha/size * sum_{c' = c - size//2}^{c + (size-1)//2} a_{c'}^2   (zero padding)
#     b_c = a_c * s_c^-beta
#     da_c = dy_c * s_c^-beta
#            - (2 alpha beta / size) * a_c * sum_{c' whose window holds c} dy_{c'} a_{c'} s_{c'}^(-beta-1)
#
# x is viewed as [N, C, P] (P = product of the spatial sizes). A task is one sample and a chunk
# of W contiguous spatial positions: lrn_chunk.h walks its channels once up (prefix sums of the
# squares) and once down (suffix sums, the window sums, s^-beta and the output), with every inner
# loop over the W positions, so it vectorises; the chunk's scratch stays in cache. beta = 0.75 and
# 0.5 use sqrt and a division instead of pow. Each output depends only on its own spatial column,
# never on W or the thread count: bitwise identical for any thread count. Backward recomputes s
# from x; forward allocates nothing but its output (and per-thread scratch of a few hundred KB).
#
# Included by engine.pyx: local_response_norm.py calls window_forward / window_backward
# there, which call the cdef *_run functions below directly.
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


cdef inline void lrn_chunk(const floating* dy, const floating* x, floating* out, Py_ssize_t C, Py_ssize_t P,
                           Py_ssize_t t, Py_ssize_t nchunks, Py_ssize_t W, Py_ssize_t size, double alpha,
                           double beta, double k, double* scratch) noexcept nogil:
    """Task t (sample t // nchunks, a chunk of W positions): forward when dy is NULL (out = y),
    else backward (out = dx)."""
    cdef Py_ssize_t n = t // nchunks
    cdef Py_ssize_t w0 = (t - n * nchunks) * W
    cdef Py_ssize_t off = n * C * P + w0
    cdef Py_ssize_t wn = min(W, P - w0)
    if dy == NULL:
        if floating is float:
            nc_lrn_forward_chunk_f32(x + off, out + off, P, C, wn, W, size, alpha, beta, k, scratch)
        else:
            nc_lrn_forward_chunk_f64(x + off, out + off, P, C, wn, W, size, alpha, beta, k, scratch)
    elif floating is float:
        nc_lrn_backward_chunk_f32(dy + off, x + off, out + off, P, C, wn, W, size, alpha, beta, k, scratch)
    else:
        nc_lrn_backward_chunk_f64(dy + off, x + off, out + off, P, C, wn, W, size, alpha, beta, k, scratch)


cdef int lrn_run(const floating* dy, const floating* x, floating* out, Py_ssize_t N, Py_ssize_t C, Py_ssize_t P,
                 Py_ssize_t size, double alpha, double beta, double k, int n_threads) except -1 nogil:
    """LocalResponseNorm on pointers (the engine's entry): x, out (and dy) [N, C, P] C-contiguous,
    N, C, P >= 1, size >= 1; forward (out = y) when dy is NULL, else backward (out = dx)."""
    cdef Py_ssize_t per = nc_lrn_scratch_forward(C, size, 1) if dy == NULL else nc_lrn_scratch_backward(C, size, 1)
    cdef Py_ssize_t W = _chunk_width(per, P)
    cdef Py_ssize_t nchunks = (P + W - 1) // W
    cdef Py_ssize_t need = nc_lrn_scratch_forward(C, size, W) if dy == NULL else nc_lrn_scratch_backward(C, size, W)
    cdef Py_ssize_t t
    cdef double* scratch
    cdef int failed = 0
    cdef int* failed_flag = &failed  # written through the pointer: shared by the threads
    if not use_threads(n_threads, N * C * P):
        scratch = <double*>malloc(sizeof(double) * need)
        if scratch == NULL:
            failed = 1
        else:
            for t in range(N * nchunks):
                lrn_chunk(dy, x, out, C, P, t, nchunks, W, size, alpha, beta, k, scratch)
            free(scratch)
    else:
        with parallel(num_threads=n_threads):
            scratch = <double*>malloc(sizeof(double) * need)
            if scratch == NULL:
                failed_flag[0] = 1
            else:
                for t in prange(N * nchunks, schedule="static"):
                    lrn_chunk(dy, x, out, C, P, t, nchunks, W, size, alpha, beta, k, scratch)
                free(scratch)
    if failed:
        with gil:
            raise MemoryError("LocalResponseNorm could not allocate its scratch buffer")
    return 0
