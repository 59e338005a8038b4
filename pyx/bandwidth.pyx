"""A parallel copy, the yardstick of the benchmark harness (`python -m benchmarks.harness`): the
memory bandwidth this machine gives a kernel like ours (plain loads and stores, fixed chunks, the
same thread team) at a given thread count. Useful traffic of a copy of n bytes: n read + n written.
"""
from cython.parallel import prange

from chunking cimport use_threads

cdef enum:
    COPY_CHUNK = 16384   # float32 elements per task


cdef inline void _copy(const float* src, float* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = src[i]


def copy(const float[::1] src,   # IN  [n]
         float[::1] dst,         # OUT [n]
         int n_threads=1):
    """dst[:] = src, in fixed chunks of COPY_CHUNK elements spread over n_threads."""
    cdef Py_ssize_t n = src.shape[0]
    cdef Py_ssize_t nchunks, t, start, rest
    cdef bint par = use_threads(n_threads, n)
    if dst.shape[0] != n:
        raise ValueError(f"dst must have {n} elements, got {dst.shape[0]}")
    nchunks = (n + COPY_CHUNK - 1) // COPY_CHUNK
    for t in prange(nchunks, nogil=True, num_threads=n_threads, use_threads_if=par, schedule="static"):
        start = t * COPY_CHUNK
        rest = n - start
        _copy(&src[start], &dst[start], COPY_CHUNK if rest > COPY_CHUNK else rest)
