# LayerNorm, fused per row: statistics over each row of [R, L] and a per-column affine.
# Included by engine.pyx (one compiled module: layer_norm.py calls rows_forward / rows_backward
# there, which call the cdef *_run functions below directly).
#
# layer_forward:  per row, moments, rstd = 1/sqrt(var + eps), then
#                 y[j] = (x[j] - mean) * rstd * weight[j] + bias[j], while the row is in cache.
# layer_backward: per row, sums of g = weight * dy centered on the row mean, then
#                 dx = rstd * g + b * (x - mean) + c (row_ops.h), and in the same pass the
#                 column sums dweight[j] = sum_r dy * (x - mean_r) * rstd_r, dbias[j] = sum_r dy.
#
# x and dy are read from memory once. The column sums run over fixed chunks of rows (their size
# depends only on R), each chunk's partial sums kept apart and added in chunk order: bitwise
# identical for any thread count.
from cython.parallel import prange
from libc.stdlib cimport free, malloc

from fused_types cimport floating
from chunking cimport BLOCK, COL_BLOCK, ROW_CHUNK, block_len, n_blocks, use_threads

cdef extern from "row_ops.h" nogil:
    void nc_layers_forward_f32(const float* x, float* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L,
                               const float* w, const float* bias, double eps, double* mean, double* rstd)
    void nc_layers_forward_f64(const double* x, double* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L,
                               const double* w, const double* bias, double eps, double* mean, double* rstd)
    void nc_layer_backward_f32(const float* x, const float* dy, float* dx, Py_ssize_t r0, Py_ssize_t r1,
                               Py_ssize_t L, const float* w, const double* mean, const double* rstd,
                               double* acc_w, double* acc_b)
    void nc_layer_backward_f64(const double* x, const double* dy, double* dx, Py_ssize_t r0, Py_ssize_t r1,
                               Py_ssize_t L, const double* w, const double* mean, const double* rstd,
                               double* acc_w, double* acc_b)

    void nc_layer_row_coeffs_f32(const float* xr, const float* gr, Py_ssize_t L, const float* w, double m,
                                 double rs, double* b, double* c)
    void nc_layer_row_coeffs_f64(const double* xr, const double* gr, Py_ssize_t L, const double* w, double m,
                                 double rs, double* b, double* c)
    void nc_layer_col_sums_f32(const float* x, const float* dy, Py_ssize_t R, Py_ssize_t L, Py_ssize_t j0,
                               Py_ssize_t n, const double* mean, const double* rstd, double* acc_w, double* acc_b)
    void nc_layer_col_sums_f64(const double* x, const double* dy, Py_ssize_t R, Py_ssize_t L, Py_ssize_t j0,
                               Py_ssize_t n, const double* mean, const double* rstd, double* acc_w, double* acc_b)
    void nc_layer_dx_piece_f32(const float* gr, const float* xr, float* dxr, Py_ssize_t n, double m, double rs,
                               double b, double c, const float* w)
    void nc_layer_dx_piece_f64(const double* gr, const double* xr, double* dxr, Py_ssize_t n, double m, double rs,
                               double b, double c, const double* w)

cdef enum:
    # The column sums of the backward use at most this many row chunks.
    MAX_CHUNKS = 64


cdef inline void layers_forward(const floating* x, floating* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L,
                                const floating* w, const floating* b, double eps, double* mean,
                                double* rstd) noexcept nogil:
    if floating is float:
        nc_layers_forward_f32(x, y, r0, r1, L, w, b, eps, mean, rstd)
    else:
        nc_layers_forward_f64(x, y, r0, r1, L, w, b, eps, mean, rstd)


cdef inline void layers_backward(const floating* x, const floating* dy, floating* dx, Py_ssize_t r0, Py_ssize_t r1,
                                 Py_ssize_t L, const floating* w, const double* mean, const double* rstd,
                                 double* acc_w, double* acc_b) noexcept nogil:
    if floating is float:
        nc_layer_backward_f32(x, dy, dx, r0, r1, L, w, mean, rstd, acc_w, acc_b)
    else:
        nc_layer_backward_f64(x, dy, dx, r0, r1, L, w, mean, rstd, acc_w, acc_b)


cdef int layer_forward_run(const floating* x, floating* y, Py_ssize_t R, Py_ssize_t L, const floating* w,
                           const floating* b, double eps, double* mean, double* rstd,
                           int n_threads) except -1 nogil:
    """layer_forward on pointers (the engine's entry): x, y [R, L] C-contiguous, R >= 1, L >= 1;
    w, b [L] or NULL (b needs w); mean, rstd [R]. The caller has checked every shape."""
    cdef Py_ssize_t t, nt
    if not use_threads(n_threads, R * L):
        layers_forward(x, y, 0, R, L, w, b, eps, mean, rstd)
        return 0
    # One contiguous range of rows per thread, pipelined (row_ops.h): the ranges change no
    # result, only which thread computes it.
    nt = n_threads
    for t in prange(nt, num_threads=n_threads, schedule="static"):
        layers_forward(x, y, R * t // nt, R * (t + 1) // nt, L, w, b, eps, mean, rstd)
    return 0


cdef int layer_backward_run(const floating* x, const floating* dy, floating* dx, Py_ssize_t R, Py_ssize_t L,
                            const floating* w, const double* mean, const double* rstd, double* dweight,
                            double* dbias, int n_threads) except -1 nogil:
    """layer_backward on pointers: x, dy, dx [R, L] C-contiguous, R >= 1, L >= 1; w [L] or NULL;
    dweight and dbias [L] both, or both NULL (not wanted)."""
    cdef Py_ssize_t rows_per_chunk, nch, ch, r0, r1, j
    cdef double* parts
    cdef double sw, sb
    cdef bint want = dweight != NULL
    cdef bint par = use_threads(n_threads, R * L)
    # At most MAX_CHUNKS chunks of at least ROW_CHUNK rows, whatever the thread count: the
    # partial column sums stay small next to x (nch * 2 * L doubles <= 1/16 of x in float32).
    rows_per_chunk = max(<Py_ssize_t>ROW_CHUNK, (R + MAX_CHUNKS - 1) // MAX_CHUNKS)
    nch = (R + rows_per_chunk - 1) // rows_per_chunk
    if nch == 1 and par:
        return layer_backward_split(x, dy, dx, R, L, w, mean, rstd, dweight, dbias, n_threads)
    if nch == 1 or not par and not want:
        # One chunk, or no column sums: the whole range at once (a chunk's sums are the result).
        layers_backward(x, dy, dx, 0, R, L, w, mean, rstd, dweight, dbias)
        return 0
    parts = NULL
    if want:
        parts = <double*>malloc(nch * 2 * L * sizeof(double))
        if parts == NULL:
            with gil:
                raise MemoryError("LayerNorm backward: no memory for the column sums of the chunks")
    for ch in prange(nch, num_threads=n_threads, use_threads_if=par, schedule="static"):
        r0 = ch * rows_per_chunk
        r1 = min(r0 + rows_per_chunk, R)
        layers_backward(x, dy, dx, r0, r1, L, w, mean, rstd, &parts[2 * ch * L] if want else NULL,
                        &parts[(2 * ch + 1) * L] if want else NULL)
    if not want:
        return 0
    for j in prange(L, num_threads=n_threads, use_threads_if=par, schedule="static"):
        sw = parts[j]
        sb = parts[L + j]
        for ch in range(1, nch):
            sw = sw + parts[2 * ch * L + j]
            sb = sb + parts[(2 * ch + 1) * L + j]
        dweight[j] = sw
        dbias[j] = sb
    free(parts)
    return 0


cdef int layer_backward_split(const floating* x, const floating* dy, floating* dx, Py_ssize_t R, Py_ssize_t L,
                              const floating* w, const double* mean, const double* rstd, double* dweight,
                              double* dbias, int n_threads) except -1 nogil:
    """Few long rows (one chunk) on several threads: the steps of nc_layer_backward one after the
    other, each parallel (rows; column blocks; pieces of rows), with the same bits."""
    cdef Py_ssize_t r, t, k, nb, ncb, j0, n
    cdef double* bc = <double*>malloc(2 * R * sizeof(double))
    if bc == NULL:
        with gil:
            raise MemoryError("LayerNorm backward: no memory for the row coefficients")
    for r in prange(R, num_threads=n_threads, schedule="static"):
        if floating is float:
            nc_layer_row_coeffs_f32(x + r * L, dy + r * L, L, w, mean[r], rstd[r], &bc[2 * r], &bc[2 * r + 1])
        else:
            nc_layer_row_coeffs_f64(x + r * L, dy + r * L, L, w, mean[r], rstd[r], &bc[2 * r], &bc[2 * r + 1])
    if dweight != NULL:
        # Before dx is written: dx may be dy itself.
        ncb = (L + COL_BLOCK - 1) // COL_BLOCK
        for t in prange(ncb, num_threads=n_threads, schedule="static"):
            j0 = t * COL_BLOCK
            n = min(<Py_ssize_t>COL_BLOCK, L - j0)
            if floating is float:
                nc_layer_col_sums_f32(x, dy, R, L, j0, n, mean, rstd, dweight, dbias)
            else:
                nc_layer_col_sums_f64(x, dy, R, L, j0, n, mean, rstd, dweight, dbias)
    nb = n_blocks(L)
    for t in prange(R * nb, num_threads=n_threads, schedule="static"):
        r = t // nb
        k = t - r * nb
        if floating is float:
            nc_layer_dx_piece_f32(dy + r * L + k * BLOCK, x + r * L + k * BLOCK, dx + r * L + k * BLOCK,
                                  block_len(L, k), mean[r], rstd[r], bc[2 * r], bc[2 * r + 1],
                                  (w + k * BLOCK) if w != NULL else w)
        else:
            nc_layer_dx_piece_f64(dy + r * L + k * BLOCK, x + r * L + k * BLOCK, dx + r * L + k * BLOCK,
                                  block_len(L, k), mean[r], rstd[r], bc[2 * r], bc[2 * r + 1],
                                  (w + k * BLOCK) if w != NULL else w)
    free(bc)
    return 0


def _check_rows(Py_ssize_t R, Py_ssize_t L, arrays, per_row, per_col):
    for v in arrays:
        if v.shape[0] != R or v.shape[1] != L:
            raise ValueError(f"arrays must have the shape of x ({R}, {L})")
    for v in per_row:
        if v.shape[0] != R:
            raise ValueError(f"per-row arrays must have {R} elements, got {v.shape[0]}")
    for v in per_col:
        if v is not None and v.shape[0] != L:
            raise ValueError(f"per-column arrays must have {L} elements, got {v.shape[0]}")
    if L == 0 and R > 0:
        raise ValueError("LayerNorm needs rows of at least one element")


def layer_forward(const floating[:, ::1] x,   # IN  [R, L]
                  floating[:, ::1] y,         # OUT [R, L] (may be x itself)
                  const floating[::1] weight, # IN  [L] or None (no affine)
                  const floating[::1] bias,   # IN  [L] or None (no shift); needs weight
                  double eps,
                  double[::1] mean,           # OUT [R]
                  double[::1] rstd,           # OUT [R]
                  int n_threads=1):
    """y = (x - mean) * rstd * weight + bias per row (the checked entry point of
    layer_forward_run)."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef const floating* w = NULL
    cdef const floating* b = NULL
    _check_rows(R, L, (x, y), (mean, rstd), (weight, bias))
    if bias is not None and weight is None:
        raise ValueError("bias needs a weight (pass ones)")
    if R == 0:
        return
    if weight is not None:
        w = &weight[0]
    if bias is not None:
        b = &bias[0]
    with nogil:
        layer_forward_run(&x[0, 0], &y[0, 0], R, L, w, b, eps, &mean[0], &rstd[0], n_threads)


def layer_backward(const floating[:, ::1] x,    # IN  [R, L]
                   const floating[:, ::1] dy,   # IN  [R, L]
                   floating[:, ::1] dx,         # OUT [R, L] (may be dy itself)
                   const floating[::1] weight,  # IN  [L] or None
                   const double[::1] mean,      # IN  [R] the forward's row means
                   const double[::1] rstd,      # IN  [R]
                   double[::1] dweight,         # OUT [L] or None (not wanted)
                   double[::1] dbias,           # OUT [L] or None together with dweight
                   int n_threads=1):
    """dx of layer_forward and, when asked, the weight and bias gradients (the checked entry
    point of layer_backward_run)."""
    cdef Py_ssize_t R = x.shape[0], L = x.shape[1]
    cdef bint want = dweight is not None
    cdef const floating* w = NULL
    cdef double* dw = NULL
    cdef double* db = NULL
    _check_rows(R, L, (x, dy, dx), (mean, rstd), (weight, dweight, dbias))
    if want != (dbias is not None):
        raise ValueError("dweight and dbias come together")
    if want and R == 0:
        dweight[:] = 0.0
        dbias[:] = 0.0
    if R == 0:
        return
    if weight is not None:
        w = &weight[0]
    if want:
        dw = &dweight[0]
        db = &dbias[0]
    with nogil:
        layer_backward_run(&x[0, 0], &dy[0, 0], &dx[0, 0], R, L, w, &mean[0], &rstd[0], dw, db, n_threads)
