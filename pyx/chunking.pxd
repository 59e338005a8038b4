# How work is cut into pieces. Every size here is a constant: the pieces, and the order in
# which their partial results are merged, never depend on the number of threads, so the
# output is bitwise identical for any thread count.

cdef extern from "row_ops.h":
    # Elements of one row handled as one block (NC_BLOCK = 4096): its partial statistics are
    # computed in one pass while the block sits in L1/L2 cache, then blocks are merged in order.
    enum: BLOCK "NC_BLOCK"

cdef enum:
    # Below this many elements a call runs on the calling thread: no thread team is started.
    PARALLEL_MIN = 65536
    # Rows per chunk of a column reduction (LayerNorm's weight and bias gradients).
    ROW_CHUNK = 64
    # Columns per task of a column reduction.
    COL_BLOCK = 1024


cdef inline Py_ssize_t n_blocks(Py_ssize_t length) noexcept nogil:
    """Number of BLOCK-sized blocks covering a row of `length` >= 1 elements."""
    return (length + BLOCK - 1) // BLOCK


cdef inline Py_ssize_t block_len(Py_ssize_t length, Py_ssize_t b) noexcept nogil:
    """Number of elements in block `b` of a row of `length` elements."""
    cdef Py_ssize_t rest = length - b * BLOCK
    return BLOCK if rest > BLOCK else rest


cdef inline bint use_threads(int n_threads, Py_ssize_t n_elements) noexcept nogil:
    return n_threads > 1 and n_elements >= PARALLEL_MIN
