"""The engine: one compiled call per forward and per backward of BatchNorm, InstanceNorm and
GroupNorm (NCHW or channels-last), of LayerNorm's rows and of LocalResponseNorm's window.

A Plan describes a grouping once: x of shape (N, C, *) as rows [N*C, L] (row r = (n, c), L
contiguous values), grouped as [outer, k, inner] and merged over k (normcore.grouped.Grouping):

    per channel       outer=1,   k=N,   inner=C   BatchNorm; any layer with given statistics
    consecutive rows  outer=R/k, k,     inner=1   InstanceNorm (k=1), GroupNorm (k=C/G)

Plan.forward runs reduce -> combine -> apply, Plan.backward the gradient sums -> combine ->
apply, each in compiled code from the Python call to the result: the arrays are read through
their data pointers (the caller has checked dtype, layout and shapes: this is the kernels'
contract, and normcore's public functions are where it is enforced), the per-group statistics
come back in one float64 array, and no thread team starts below the kernels' size threshold.
A Plan made with channels_last=True reads x in channels-last memory, (N, C, *spatial) stored as
(N, *spatial, C), through its [N, L, C] view, with the same groupings, and writes y and dx in
that layout. Plan.moments, Plan.grad_sums and Plan.backward with given sums are the pieces of
a per-channel forward and backward that SyncBatchNorm runs around its collectives, and
merge_in_order is the combine of parts in order (its ranks; toolkit.merge_moments).

The loops themselves are in channels.pxi, groups.pxi, channels_last.pxi, layer_rows.pxi and
lrn.pxi, included here (their cdef *_run functions; the def functions of channels.pxi and
groups.pxi are the same kernels with checked arguments, for the tests). LayerNorm's rows are
statistics per row with a per-column affine: rows_forward and rows_backward, with the same
contract as a Plan's methods; LocalResponseNorm's window across channels is window_forward and
window_backward. running_values and commit_running are BatchNorm's running statistics.
"""
cimport numpy as cnp
import numpy as np
from libc.math cimport NAN, isinf
from libc.stdlib cimport free, malloc

cnp.import_array()

# The per-channel kernels (BatchNorm) and the consecutive-row group kernels (InstanceNorm,
# GroupNorm): their cdef *_run functions, and the checked def entry points the tests call.
include "channels.pxi"
include "groups.pxi"
# The same groupings on channels-last memory ([N, L, C]).
include "channels_last.pxi"
# LayerNorm's rows (per-column affine): rows_forward / rows_backward below call them.
include "layer_rows.pxi"
# LocalResponseNorm's window across channels: window_forward / window_backward below.
include "lrn.pxi"

cdef inline bint is_float32(cnp.ndarray a) noexcept:
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32


cdef inline double* f64(cnp.ndarray a) noexcept:
    return <double*>cnp.PyArray_DATA(a)


cdef cnp.ndarray float64_matrix(Py_ssize_t rows, Py_ssize_t cols):
    """A new uninitialised C-contiguous float64 array (rows, cols)."""
    cdef cnp.npy_intp dims[2]
    dims[0] = rows
    dims[1] = cols
    return cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)


cdef inline double element(cnp.ndarray a, Py_ssize_t i) noexcept:
    """a[i] of a 1-D float32 or float64 array of any stride, as a double."""
    cdef char* p = <char*>cnp.PyArray_DATA(a) + i * cnp.PyArray_STRIDE(a, 0)
    if is_float32(a):
        return (<float*>p)[0]
    return (<double*>p)[0]


cdef cnp.ndarray as_vector(object v, Py_ssize_t n):
    """v as a 1-D float32 or float64 array of n values in native byte order (itself when it is
    one already, any stride; else a float64 copy)."""
    cdef cnp.ndarray a
    if isinstance(v, cnp.ndarray):
        a = <cnp.ndarray>v
        if (cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIM(a, 0) == n and cnp.PyArray_ISNOTSWAPPED(a)
                and (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 or cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64)):
            return a
    return np.ascontiguousarray(v, dtype=np.float64).reshape(n)


cdef enum:
    STACK_CHANNELS = 128   # Plan.forward reads the bias of up to this many channels on the stack


cdef cnp.ndarray vector_copy(object v, Py_ssize_t n, double fill):
    """A new C-contiguous float64 array of n values: v's (as_vector), or `fill` when v is None."""
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_FLOAT64, 0)
    cdef double* o = f64(out)
    cdef cnp.ndarray a
    cdef Py_ssize_t i
    if v is None:
        for i in range(n):
            o[i] = fill
        return out
    a = as_vector(v, n)
    for i in range(n):
        o[i] = element(a, i)
    return out


cdef class Plan:
    """How one input shape is normalised: the grouping (N, C, L, outer, k, inner), the layout
    (NCHW rows [N*C, L], or channels-last [N, L, C]) and the thread count. Built once per layer,
    shape and layout; forward and backward are one call each.

    The statistics array a forward returns, float64 of shape (3, G) with G = outer * inner:
    row 0 the group means, row 1 the group M2 (sum of squared deviations; with given statistics
    var + eps), row 2 rstd = 1 / sqrt(var + eps).
    """

    cdef readonly Py_ssize_t N, C, L, outer, k, inner, G
    cdef readonly int n_threads
    cdef readonly bint per_channel, channels_last

    def __cinit__(self, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t outer, Py_ssize_t k,
                  Py_ssize_t inner, int n_threads, bint channels_last=False):
        if N < 1 or C < 1 or L < 1 or outer * k * inner != N * C or n_threads < 1:
            raise ValueError(f"a Plan needs a non-empty grouping, got N={N}, C={C}, L={L}, "
                             f"(outer, k, inner)=({outer}, {k}, {inner}), n_threads={n_threads}")
        self.per_channel = outer == 1 and inner == C
        if not self.per_channel and (inner != 1 or C % k != 0):
            raise ValueError(f"a Plan groups rows per channel or in runs of consecutive rows, got "
                             f"(outer, k, inner)=({outer}, {k}, {inner}) for C={C}")
        self.N, self.C, self.L = N, C, L
        self.outer, self.k, self.inner = outer, k, inner
        self.G = outer * inner
        self.n_threads = n_threads
        self.channels_last = channels_last

    @property
    def sample_tasks(self):
        """Whether a channels-last plan with consecutive-row groups runs one sample per task
        (reduce, combine and apply while it is in cache; the same bits as the separate passes)."""
        return (self.channels_last and not self.per_channel
                and cl_sample_tasks(self.N, self.n_threads, use_threads(self.n_threads, self.N * self.C * self.L)))

    def forward(self, cnp.ndarray x, object weight, object bias, double eps, object given_mean=None,
                object given_var=None):
        """(y, stats, weight64) for x: C-contiguous float32 or float64 of N*C*L values, of any
        shape whose memory is rows [N*C, L] (NCHW: (N, C, *) itself) or, for a channels-last
        plan, [N, L, C]; y has x's shape. weight and bias: None (ones, zeros) or C values of
        any dtype (read in place when float32 or float64, any stride, else converted: the
        layers pass their own parameters); weight64 is the weight the forward used, a new
        float64 array [C] (what the backward takes: the parameter may change in between). With
        given_mean and given_var (per channel, any float dtype; a per-channel plan), those
        statistics: rstd = 1 / sqrt(var + eps), NaN where var + eps is negative, as PyTorch;
        else the statistics of x."""
        if given_mean is not None and not self.per_channel:
            raise ValueError("given statistics take a per-channel plan")
        cdef cnp.ndarray y = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
        cdef cnp.ndarray stats = float64_matrix(3, self.G)
        cdef cnp.ndarray w64 = vector_copy(weight, self.C, 1.0)
        cdef Py_ssize_t c
        cdef cnp.ndarray bv
        cdef double stack_bias[STACK_CHANNELS]
        cdef double* b = stack_bias
        if self.C > STACK_CHANNELS:
            b = <double*>malloc(self.C * sizeof(double))
            if b == NULL:
                raise MemoryError("Plan.forward: no memory for the bias")
        if bias is None:
            for c in range(self.C):
                b[c] = 0.0
        else:
            bv = as_vector(bias, self.C)
            for c in range(self.C):
                b[c] = element(bv, c)
        try:
            self._forward(x, y, stats, f64(w64), b, eps, given_mean, given_var)
        finally:
            if b != stack_bias:
                free(b)
        return y, stats, w64

    cdef int _forward(self, cnp.ndarray x, cnp.ndarray y, cnp.ndarray stats, const double* w, const double* b,
                      double eps, object given_mean, object given_var) except -1:
        cdef double* mean = f64(stats)
        cdef double* m2 = mean + self.G
        cdef double* rstd = m2 + self.G
        cdef bint batch = given_mean is None
        cdef Py_ssize_t c
        cdef double v
        cdef cnp.ndarray gm, gv
        cdef void* xp = cnp.PyArray_DATA(x)
        cdef void* yp = cnp.PyArray_DATA(y)
        if not batch:
            gm = as_vector(given_mean, self.C)
            gv = as_vector(given_var, self.C)
            for c in range(self.C):
                mean[c] = element(gm, c)
                v = element(gv, c) + eps
                # the kernels clamp a variance at 0 (a guard for batch statistics): a negative
                # var + eps must give NaN, not a finite scale
                m2[c] = v if v >= 0.0 else NAN
            eps = 0.0
        if self.channels_last:
            if is_float32(x):
                with nogil:
                    cl_forward_run(<const float*>xp, <float*>yp, self.N, self.L, self.C, self._cl_k(), w, b, eps,
                                   mean, m2, rstd, batch, self.n_threads)
            else:
                with nogil:
                    cl_forward_run(<const double*>xp, <double*>yp, self.N, self.L, self.C, self._cl_k(), w, b, eps,
                                   mean, m2, rstd, batch, self.n_threads)
        elif self.per_channel:
            if is_float32(x):
                with nogil:
                    channel_forward_run(<const float*>xp, <float*>yp, self.N, self.C, self.L, w, b, eps, mean, m2,
                                        rstd, batch, self.n_threads)
            else:
                with nogil:
                    channel_forward_run(<const double*>xp, <double*>yp, self.N, self.C, self.L, w, b, eps, mean,
                                        m2, rstd, batch, self.n_threads)
        elif is_float32(x):
            with nogil:
                group_forward_run(<const float*>xp, <float*>yp, self.N * self.C, self.L, self.k, self.C, w, b, eps,
                                  mean, m2, rstd, self.n_threads)
        else:
            with nogil:
                group_forward_run(<const double*>xp, <double*>yp, self.N * self.C, self.L, self.k, self.C, w, b,
                                  eps, mean, m2, rstd, self.n_threads)
        return 0

    cdef inline Py_ssize_t _cl_k(self) noexcept nogil:
        """channels_last.pxi's grouping: 0 per channel, else k consecutive channels."""
        return 0 if self.per_channel else self.k

    def moments(self, cnp.ndarray x):
        """Per-channel (mean, M2) of x (a per-channel plan; x as for forward): float64 (2, C),
        the reduce and combine of forward, bit for bit, without the apply."""
        self._require_per_channel("moments")
        cdef cnp.ndarray out = float64_matrix(2, self.C)
        cdef double* mean = f64(out)
        cdef void* xp = cnp.PyArray_DATA(x)
        if self.channels_last:
            if is_float32(x):
                with nogil:
                    cl_moments_run(<const float*>xp, self.N, self.L, self.C, mean, mean + self.C, self.n_threads)
            else:
                with nogil:
                    cl_moments_run(<const double*>xp, self.N, self.L, self.C, mean, mean + self.C, self.n_threads)
        elif is_float32(x):
            with nogil:
                channel_moments_run(<const float*>xp, self.N, self.C, self.L, mean, mean + self.C, self.n_threads)
        else:
            with nogil:
                channel_moments_run(<const double*>xp, self.N, self.C, self.L, mean, mean + self.C, self.n_threads)
        return out

    def grad_sums(self, cnp.ndarray x, cnp.ndarray dy, cnp.ndarray mean_):
        """Per channel sum(dy) and sum(dy * (x - mean[c])) (a per-channel plan; x and dy as for
        backward, mean_ float64 [C] C-contiguous): float64 (2, C), in a fixed order."""
        self._require_per_channel("grad_sums")
        cdef cnp.ndarray out = float64_matrix(2, self.C)
        cdef double* sdy = f64(out)
        cdef const double* mean = f64(mean_)
        cdef void* xp = cnp.PyArray_DATA(x)
        cdef void* dyp = cnp.PyArray_DATA(dy)
        cdef bint par = use_threads(self.n_threads, self.N * self.C * self.L)
        cdef bint blocks
        if self.channels_last:
            if is_float32(x):
                with nogil:
                    cl_grad_sums_run(<const float*>xp, <const float*>dyp, self.N, self.L, self.C, mean, sdy,
                                     sdy + self.C, self.n_threads)
            else:
                with nogil:
                    cl_grad_sums_run(<const double*>xp, <const double*>dyp, self.N, self.L, self.C, mean, sdy,
                                     sdy + self.C, self.n_threads)
        elif is_float32(x):
            blocks = backward_blocks(self.N, self.L, sizeof(float))
            with nogil:
                channel_grad_sums(<const float*>xp, <const float*>dyp, self.N, self.C, self.L, mean, sdy,
                                  sdy + self.C, blocks, self.n_threads, par)
        else:
            blocks = backward_blocks(self.N, self.L, sizeof(double))
            with nogil:
                channel_grad_sums(<const double*>xp, <const double*>dyp, self.N, self.C, self.L, mean, sdy,
                                  sdy + self.C, blocks, self.n_threads, par)
        return out

    cdef int _require_per_channel(self, str what) except -1:
        if not self.per_channel:
            raise ValueError(f"{what} takes a per-channel plan")
        return 0

    def backward(self, cnp.ndarray x, cnp.ndarray dy, cnp.ndarray mean_, cnp.ndarray rstd_, cnp.ndarray weight,
                 bint batch_stats, cnp.ndarray sums_=None, double count=0.0):
        """(dx, grads) for the forward of x whose group means and rstd (float64 [G], rows 0 and 2
        of its statistics) are mean_ and rstd_, with the weight64 it returned; dy C-contiguous
        with x's number of values, dx of x's shape. grads: float64 (2, C), dweight then dbias.

        sums_ (a per-channel plan with batch statistics): the gradient sums of a batch of which x
        is a slice, float64 (2, C) C-contiguous (sum(dy), sum(dy * (x - mean)): grad_sums' over
        every slice), over `count` values: the combine and apply of that batch's backward on
        this slice (SyncBatchNorm); grads then come from those sums."""
        cdef cnp.ndarray dx = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
        cdef cnp.ndarray grads = float64_matrix(2, self.C)
        cdef double* dweight = f64(grads)
        cdef double* dbias = dweight + self.C
        cdef const double* mean = f64(mean_)
        cdef const double* rstd = f64(rstd_)
        cdef const double* w = f64(weight)
        cdef void* xp = cnp.PyArray_DATA(x)
        cdef void* dyp = cnp.PyArray_DATA(dy)
        cdef void* dxp = cnp.PyArray_DATA(dx)
        cdef Py_ssize_t R = self.N * self.C
        cdef cnp.ndarray rows
        cdef double* sums
        cdef const double* given = NULL
        if not batch_stats and not self.per_channel:
            raise ValueError("given statistics take a per-channel plan")
        if sums_ is not None:
            if not (self.per_channel and batch_stats):
                raise ValueError("given gradient sums take a per-channel plan with batch statistics")
            given = f64(sums_)
        if self.channels_last:
            if is_float32(x):
                with nogil:
                    cl_backward_run(<const float*>xp, <const float*>dyp, <float*>dxp, self.N, self.L, self.C,
                                    self._cl_k(), w, mean, rstd, batch_stats, dweight, dbias, given, count,
                                    self.n_threads)
            else:
                with nogil:
                    cl_backward_run(<const double*>xp, <const double*>dyp, <double*>dxp, self.N, self.L, self.C,
                                    self._cl_k(), w, mean, rstd, batch_stats, dweight, dbias, given, count,
                                    self.n_threads)
            return dx, grads
        if self.per_channel:
            if is_float32(x):
                with nogil:
                    channel_backward_run(<const float*>xp, <const float*>dyp, <float*>dxp, self.N, self.C, self.L,
                                         w, mean, rstd, batch_stats, dweight, dbias, given, count,
                                         self.n_threads)
            else:
                with nogil:
                    channel_backward_run(<const double*>xp, <const double*>dyp, <double*>dxp, self.N, self.C,
                                         self.L, w, mean, rstd, batch_stats, dweight, dbias, given, count,
                                         self.n_threads)
            return dx, grads
        rows = float64_matrix(2, R)  # per-row sum(dy), sum(dy * (x - mean)), one after the other
        sums = f64(rows)
        if is_float32(x):
            with nogil:
                group_backward_run(<const float*>xp, <const float*>dyp, <float*>dxp, R, self.L, self.k, self.C, w,
                                   mean, rstd, sums, sums + R, self.n_threads)
        else:
            with nogil:
                group_backward_run(<const double*>xp, <const double*>dyp, <double*>dxp, R, self.L, self.k, self.C,
                                   w, mean, rstd, sums, sums + R, self.n_threads)
        channel_sums(sums, sums + R, rstd, self.N, self.C, self.k, dweight, dbias)
        return dx, grads


def merge_in_order(cnp.ndarray counts, cnp.ndarray means, cnp.ndarray m2s):
    """(count, mean, M2) of the union of K parts (K >= 1), merged in part order with Chan's
    formula (the combine step of every grouping, row_ops.h nc_merge_step): counts float64
    [K], means and m2s float64 [K, C], all C-contiguous. Parts of count 0 are skipped; with
    none left, count 0 and zeros. SyncBatchNorm merges its ranks' statistics with it, rank 0
    first, so every rank holds the same bits."""
    cdef Py_ssize_t K = cnp.PyArray_DIM(means, 0), C = cnp.PyArray_DIM(means, 1), j, c
    cdef cnp.ndarray out = float64_matrix(2, C)
    cdef double* mean = f64(out)
    cdef const double* n = f64(counts)
    cdef const double* mu = f64(means)
    cdef const double* q = f64(m2s)
    cdef double na, total = 0.0
    for j in range(K):
        total = total + n[j]
    for c in range(C):
        na = 0.0
        mean[c] = 0.0
        mean[C + c] = 0.0
        for j in range(K):
            if n[j] != 0.0:
                nc_merge_step(&na, &mean[c], &mean[C + c], n[j], mu[j * C + c], q[j * C + c])
    return total, out[0], out[1]


def running_values(cnp.ndarray running_mean, cnp.ndarray running_var, cnp.ndarray mean_, cnp.ndarray m2_,
                   double factor, double count):
    """BatchNorm's new running statistics, written nowhere: float64 (2, C), row 0
    (1 - factor) * running_mean + factor * mean, row 1 the same for running_var with the
    unbiased batch variance M2 / (count - 1). mean_ and m2_: the batch's, C-contiguous float64
    [C] (rows 0 and 1 of a per-channel plan's statistics). The buffers: C values, read in
    place when float32 or float64 (any stride), else converted. The operations and their
    order are NumPy's on float64 arrays."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(mean_, 0), c
    cdef cnp.ndarray new = float64_matrix(2, C)
    cdef double* out = f64(new)
    cdef const double* mean = f64(mean_)
    cdef const double* m2 = f64(m2_)
    cdef double keep = 1.0 - factor
    running_mean = as_vector(running_mean, C)
    running_var = as_vector(running_var, C)
    for c in range(C):
        out[c] = keep * element(running_mean, c) + factor * mean[c]
        out[C + c] = keep * element(running_var, c) + factor * (m2[c] / (count - 1.0))
    return new


cdef inline bint is_running_buffer(cnp.ndarray a, Py_ssize_t C) noexcept:
    """A writeable 1-D float32 or float64 array of C values, aligned, in native byte order (any
    stride)."""
    return (cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIM(a, 0) == C and cnp.PyArray_ISWRITEABLE(a)
            and cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_ISALIGNED(a)
            and (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 or cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64))


def commit_running(cnp.ndarray num_batches_tracked, long long count, cnp.ndarray running_mean,
                   cnp.ndarray running_var, cnp.ndarray new):
    """A BatchNorm training step's state, written in place all or none: num_batches_tracked (a
    writeable 0-d int64 array) = count, running_mean and running_var (is_running_buffer, one
    dtype) = new[0] and new[1] (running_values' float64 (2, C)) cast to their dtype. True when
    written. False, with nothing written, for any other kind of buffer or when a cast to float32
    would overflow (NumPy's cast would warn): the caller then takes write_arrays' path, which
    checks, casts and warns as NumPy does."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(new, 1), i
    cdef const double* v = f64(new)
    cdef float f
    if not (is_running_buffer(running_mean, C) and is_running_buffer(running_var, C)
            and cnp.PyArray_TYPE(running_mean) == cnp.PyArray_TYPE(running_var)
            and cnp.PyArray_NDIM(num_batches_tracked) == 0 and cnp.PyArray_TYPE(num_batches_tracked) == cnp.NPY_INT64
            and cnp.PyArray_ISWRITEABLE(num_batches_tracked) and cnp.PyArray_ISNOTSWAPPED(num_batches_tracked)
            and cnp.PyArray_ISALIGNED(num_batches_tracked)):
        return False
    if is_float32(running_mean):
        for i in range(2 * C):
            f = <float>v[i]
            if isinf(f) and not isinf(v[i]):
                return False
    (<cnp.int64_t*>cnp.PyArray_DATA(num_batches_tracked))[0] = count
    write_vector(running_mean, v, C)
    write_vector(running_var, v + C, C)
    return True


cdef void write_vector(cnp.ndarray a, const double* v, Py_ssize_t n) noexcept:
    """a[i] = v[i] cast to a's dtype (a 1-D float32 or float64 array of any stride)."""
    cdef char* p = <char*>cnp.PyArray_DATA(a)
    cdef Py_ssize_t stride = cnp.PyArray_STRIDE(a, 0), i
    if is_float32(a):
        for i in range(n):
            (<float*>(p + i * stride))[0] = <float>v[i]
    else:
        for i in range(n):
            (<double*>(p + i * stride))[0] = v[i]


def rows_forward(cnp.ndarray x, object weight, object bias, double eps, int n_threads):
    """(y, stats) of LayerNorm's rows: x [R, L] C-contiguous float32 or float64, R, L >= 1;
    weight and bias None or C-contiguous [L] of x's dtype (a bias needs a weight). stats:
    float64 (2, R), the row means then rstd = 1 / sqrt(var + eps)."""
    cdef Py_ssize_t R = cnp.PyArray_DIM(x, 0), L = cnp.PyArray_DIM(x, 1)
    cdef cnp.ndarray y = cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
    cdef cnp.ndarray stats = float64_matrix(2, R)
    cdef double* mean = f64(stats)
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* yp = cnp.PyArray_DATA(y)
    cdef void* w = NULL
    cdef void* b = NULL
    if weight is not None:
        w = cnp.PyArray_DATA(<cnp.ndarray>weight)
    if bias is not None:
        b = cnp.PyArray_DATA(<cnp.ndarray>bias)
    if is_float32(x):
        with nogil:
            layer_forward_run(<const float*>xp, <float*>yp, R, L, <const float*>w, <const float*>b, eps, mean,
                              mean + R, n_threads)
    else:
        with nogil:
            layer_forward_run(<const double*>xp, <double*>yp, R, L, <const double*>w, <const double*>b, eps, mean,
                              mean + R, n_threads)
    return y, stats


def rows_backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray mean_, cnp.ndarray rstd_, object weight,
                  int n_threads):
    """(dx, grads) for the rows_forward of x (C-contiguous [R, L], R, L >= 1) whose row means and
    rstd (float64 [R], C-contiguous) are mean_ and rstd_, with the weight it used (None or
    [L] of x's dtype); dy C-contiguous like x. grads: float64 (2, L), the column sums
    sum_r dy * (x - mean_r) * rstd_r (dweight) then sum_r dy (dbias)."""
    cdef Py_ssize_t R = cnp.PyArray_DIM(x, 0), L = cnp.PyArray_DIM(x, 1)
    cdef cnp.ndarray dx = cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
    cdef cnp.ndarray grads = float64_matrix(2, L)
    cdef double* dw = f64(grads)
    cdef void* w = NULL
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* dyp = cnp.PyArray_DATA(dy)
    cdef void* dxp = cnp.PyArray_DATA(dx)
    cdef const double* mean = f64(mean_)
    cdef const double* rstd = f64(rstd_)
    if weight is not None:
        w = cnp.PyArray_DATA(<cnp.ndarray>weight)
    if is_float32(x):
        with nogil:
            layer_backward_run(<const float*>xp, <const float*>dyp, <float*>dxp, R, L, <const float*>w, mean, rstd,
                               dw, dw + L, n_threads)
    else:
        with nogil:
            layer_backward_run(<const double*>xp, <const double*>dyp, <double*>dxp, R, L, <const double*>w, mean,
                               rstd, dw, dw + L, n_threads)
    return dx, grads


def window_forward(cnp.ndarray x, Py_ssize_t size, double alpha, double beta, double k, int n_threads):
    """y of LocalResponseNorm: x [N, C, P] C-contiguous float32 or float64, N, C, P >= 1;
    size >= 1 (the caller's window: at most 2C + 1)."""
    return window_run(None, x, size, alpha, beta, k, n_threads)


def window_backward(cnp.ndarray dy, cnp.ndarray x, Py_ssize_t size, double alpha, double beta, double k,
                    int n_threads):
    """dx of window_forward's y for x, recomputing its window sums; dy C-contiguous like x."""
    return window_run(dy, x, size, alpha, beta, k, n_threads)


cdef cnp.ndarray window_run(object dy, cnp.ndarray x, Py_ssize_t size, double alpha, double beta, double k,
                            int n_threads):
    """lrn_run on the arrays: y of x when dy is None, else dx."""
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(3, cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
    cdef Py_ssize_t N = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1), P = cnp.PyArray_DIM(x, 2)
    cdef void* dyp = NULL if dy is None else cnp.PyArray_DATA(<cnp.ndarray>dy)
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* op = cnp.PyArray_DATA(out)
    if is_float32(x):
        with nogil:
            lrn_run(<const float*>dyp, <const float*>xp, <float*>op, N, C, P, size, alpha, beta, k, n_threads)
    else:
        with nogil:
            lrn_run(<const double*>dyp, <const double*>xp, <double*>op, N, C, P, size, alpha, beta, k, n_threads)
    return out
