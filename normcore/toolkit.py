"""The public toolkit for writing normalization methods outside normcore (stable API).

These are the kernels behind the built-in layers, with checked arguments. A method built on
them computes its statistics and applies its affine maps at C speed (OpenMP threads, float64
accumulation, bitwise identical for any thread count) and writes only its combine step, on
tiny (N, C) arrays, in NumPy.

Data arrays are (N, C, *) float32 or float64 of any layout (non-contiguous ones are copied);
a *row* is one (n, c) slice of L = prod(*) values. Per-row coefficients are float64-convertible
arrays of shape (N, C) (one per row), (C,) (one per channel) or scalars.

    mean, m2 = row_moments(x)                       # (N, C) each; var = m2 / L
    count, mean, m2 = merge_moments(counts, means, m2s)  # parts merged in order (the combine)
    y = apply_rows(x, center, scale, shift)         # (x - center) * scale + shift, per row
    s_dy, s_dyxc = row_grad_sums(x, dy, center)     # sum(dy), sum(dy * (x - center)) per row
    dx = apply_rows_backward(dy, x, a, center, b, c)  # a * dy + b * (x - center) + c, per row

Input checks the built-ins use: as_float_array(x) (float32/float64 or TypeError) and
check_grad_output(dy, shape, dtype) (dy of backward: the forward input's shape, cast to its dtype);
write_arrays([(name, array, value), ...]) writes a layer's new state all or none (every
destination checked and every value cast before the first write);
constructor checks with the built-ins' exception types and words: check_positive_int(value, name),
check_eps(eps), check_finite_real(value, name), check_bool(value, name), check_dtype_arg(dtype).
"""
import math

import numpy as np

from normcore._kernels.apply_rows import apply_rows as _apply_rows
from normcore._kernels.apply_rows import apply_rows_backward as _apply_rows_backward
from normcore._kernels.engine import merge_in_order as _merge_in_order
from normcore._kernels.grad_sums import row_grad_sums as _row_grad_sums
from normcore._kernels.moments import row_moments as _row_moments
from normcore.module import write_arrays
from normcore.threads import get_num_threads
from normcore.validation import (
    as_float_array,
    check_bool,
    check_dtype_arg,
    check_eps,
    check_finite_real,
    check_grad_output,
    check_positive_int,
)

__all__ = ["as_float_array", "check_grad_output", "check_positive_int", "check_eps", "check_finite_real",
           "check_bool", "check_dtype_arg", "write_arrays", "as_rows", "row_moments", "merge_moments", "row_grad_sums",
           "apply_rows", "apply_rows_backward"]


def as_rows(x, name="x"):
    """x (N, C, *) as a C-contiguous [N*C, L] float array (a view when x is C-contiguous), and (N, C, L).

    Row ``n * C + c`` holds the L = prod(x.shape[2:]) values of sample n, channel c: the
    view of an array that every toolkit kernel works on.

    Parameters
    ----------
    x : array_like
        (N, C, *), float32 or float64, at least 2 dims, any memory layout.
    name : str, default "x"
        What to call `x` in error messages.

    Returns
    -------
    rows : ndarray of shape (N * C, L)
        `x`'s values as rows: a view of `x` when it is C-contiguous, else a contiguous copy.
    sizes : tuple of ints
        (N, C, L).

    Raises
    ------
    TypeError
        `x` is not a float32 or float64 array.
    ValueError
        `x` has fewer than 2 dims.

    Examples
    --------
    >>> rows, (N, C, L) = nc.toolkit.as_rows(np.zeros((2, 3, 4, 5)))
    >>> rows.shape, (N, C, L)
    ((6, 20), (2, 3, 20))
    """
    x = as_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (N, C, *), got {x.ndim}")
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    return np.ascontiguousarray(x).reshape(N * C, L), (N, C, L)


def _coefficients(values, N, C, name):
    """Per-row coefficients as (float64 array, period): (C,) -> period C, (N, C) -> N*C."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 0:
        return np.full(C, float(a)), C
    if a.shape == (C,):
        return np.ascontiguousarray(a), C
    if a.shape == (N, C):
        return np.ascontiguousarray(a).reshape(N * C), N * C
    raise ValueError(f"{name} must be a scalar or have shape ({C},) or ({N}, {C}), got {a.shape}")


def _same_period(N, C, *pairs):
    """Bring coefficient arrays to one period (per-channel ones expanded when others are per row)."""
    period = max(p for _, p in pairs)
    return [a if p == period else np.tile(a, N) for a, p in pairs], period


def row_moments(x):
    """Per-row mean and M2 = sum((x - mean)^2) of x (N, C, *), float64 arrays of shape (N, C).

    The count of every row is L = prod(x.shape[2:]) (>= 1): the biased variance is m2 / L,
    the unbiased one m2 / (L - 1). One pass over `x`, accumulated in float64 from values
    shifted by a value of the row and merged with Chan's formula: accurate also when
    |mean| >> std. Merge rows into the statistics of a group (a channel over the batch, a
    group of channels) with the same formula on these (N, C) arrays.

    Parameters
    ----------
    x : array_like
        (N, C, *), float32 or float64, rows of at least one value.

    Returns
    -------
    mean : ndarray of shape (N, C), float64
        The mean of each row.
    m2 : ndarray of shape (N, C), float64
        The sum of squared deviations from the mean of each row.

    Raises
    ------
    TypeError
        `x` is not a float32 or float64 array.
    ValueError
        `x` has fewer than 2 dims, or empty rows (a 0 in ``x.shape[2:]`` with N * C > 0).

    Examples
    --------
    >>> x = np.array([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])    # N=1, C=2, L=3
    >>> mean, m2 = nc.toolkit.row_moments(x)
    >>> mean.tolist(), m2.tolist()
    ([[2.0, 5.0]], [[2.0, 0.0]])
    """
    x2, (N, C, L) = as_rows(x)
    if L == 0 and N * C:
        raise ValueError("row_moments needs rows of at least one value (x.shape[2:] holds a 0)")
    mean = np.empty(N * C)
    m2 = np.empty(N * C)
    _row_moments(x2, mean, m2, get_num_threads())
    return mean.reshape(N, C), m2.reshape(N, C)


def merge_moments(counts, means, m2s):
    """The (count, mean, M2) of the union of K parts from each part's, merged in part order with
    Chan's formula: the combine step of the built-in layers and of SyncBatchNorm (its ranks'
    statistics), here for any grouping a method wants.

    Shifted by the running mean, the merge neither overflows where the values do not nor
    cancels; the order is fixed, so the bits are too. Parts with count 0 are skipped.

    Parameters
    ----------
    counts : array_like of shape (K,)
        The number of values of each part, K >= 1.
    means, m2s : array_like of shape (K, C) or (K,)
        Each part's means and sums of squared deviations (M2), for C quantities at once
        (channels, say); (K,) for one.

    Returns
    -------
    count : float
        The total count.
    mean, m2 : ndarray of shape (C,), float64 (float64 scalars for (K,) input)
        The merged moments; zeros where every part is empty.

    Raises
    ------
    ValueError
        K is 0, the shapes do not match, or a count is negative or not finite.

    Examples
    --------
    >>> row_mean, row_m2 = np.array([[1.0], [4.0]]), np.array([[2.0], [0.0]])  # [0, 1, 2] and [4]
    >>> count, mean, m2 = nc.toolkit.merge_moments([3, 1], row_mean, row_m2)
    >>> count, mean.tolist(), m2.tolist()
    (4.0, [1.75], [8.75])
    """
    counts = np.ascontiguousarray(counts, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    one = means.ndim == 1
    if counts.ndim != 1 or counts.shape[0] == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    if means.ndim not in (1, 2) or means.shape[0] != counts.shape[0] or m2s.shape != means.shape:
        raise ValueError(f"means and m2s must both have shape (K,) or (K, C) with K = {counts.shape[0]} "
                         f"parts, got {means.shape} and {m2s.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"counts must be finite and non-negative, got {counts}")
    count, mean, m2 = _merge_in_order(counts, np.ascontiguousarray(means.reshape(counts.shape[0], -1)),
                                      np.ascontiguousarray(m2s.reshape(counts.shape[0], -1)))
    return (count, mean[0], m2[0]) if one else (count, mean, m2)


def row_grad_sums(x, dy, center):
    """Per-row sum(dy) and sum(dy * (x - center)), float64 arrays of shape (N, C).

    Centering on the statistics' mean (the row mean, or the mean the forward used) keeps the
    second sum accurate when |mean| >> std. These two sums are all that the backward of a
    normalization needs from a pass over `x` and `dy`.

    Parameters
    ----------
    x : array_like
        (N, C, *), float32 or float64: the forward's input.
    dy : array_like
        The gradient with respect to the forward's output, of `x`'s shape (cast to its dtype).
    center : float or array_like of shape (C,) or (N, C)
        What is subtracted from `x`: one value for all rows, one per channel or one per row.

    Returns
    -------
    s_dy : ndarray of shape (N, C), float64
        sum(dy) of each row.
    s_dyxc : ndarray of shape (N, C), float64
        sum(dy * (x - center)) of each row.

    Raises
    ------
    TypeError
        `x` or `dy` is not a float32 or float64 array.
    ValueError
        `dy` does not have `x`'s shape, `x` has fewer than 2 dims, or `center` has another
        shape than those above.

    Examples
    --------
    >>> x = np.array([[[1.0, 2.0, 3.0]]])
    >>> dy = np.array([[[1.0, 1.0, 2.0]]])
    >>> s_dy, s_dyxc = nc.toolkit.row_grad_sums(x, dy, 2.0)   # 1*(-1) + 1*0 + 2*1
    >>> s_dy.tolist(), s_dyxc.tolist()
    ([[4.0]], [[1.0]])
    """
    shape = np.shape(x)
    x2, (N, C, L) = as_rows(x)
    dy = as_float_array(dy, "dy")
    if dy.shape != shape:
        raise ValueError(f"dy must have the shape of x {shape}, got {dy.shape}")
    dy2 = np.ascontiguousarray(dy, dtype=x2.dtype).reshape(x2.shape)
    ctr, period = _coefficients(center, N, C, "center")
    s_dy = np.empty(N * C)
    s_dyxc = np.empty(N * C)
    if N * C and L:
        _row_grad_sums(x2, dy2, ctr, period, s_dy, s_dyxc, get_num_threads())
    else:
        s_dy[:] = 0.0
        s_dyxc[:] = 0.0
    return s_dy.reshape(N, C), s_dyxc.reshape(N, C)


def apply_rows(x, center, scale, shift, out=None):
    """y = (x - center) * scale + shift, coefficients per row; y has x's shape and dtype.

    Computed in x's dtype with the center split in two parts of that type, so a row equal to
    its center maps exactly to its shift. `out` may be given (x's shape and dtype, C-contiguous;
    it may be x itself). The apply step of every normalization's forward, in one pass.

    Parameters
    ----------
    x : array_like
        (N, C, *), float32 or float64.
    center, scale, shift : float or array_like of shape (C,) or (N, C)
        The coefficients: one value for all rows, one per channel or one per row (float64,
        for the built-ins the mean, ``rstd * weight`` and ``bias``).
    out : ndarray or None, default None
        Where to write y.

    Returns
    -------
    ndarray
        y (`out` when given), of `x`'s shape and dtype.

    Raises
    ------
    TypeError
        `x` is not a float32 or float64 array.
    ValueError
        A coefficient of another shape than those above, `x` of fewer than 2 dims, or an
        `out` that is not a writeable C-contiguous array of `x`'s shape and dtype.

    Examples
    --------
    Per-row normalization from ``row_moments``:

    >>> x = np.array([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    >>> mean, m2 = nc.toolkit.row_moments(x)
    >>> rstd = 1.0 / np.sqrt(m2 / 3 + 1e-5)
    >>> nc.toolkit.apply_rows(x, mean, rstd, 0.0).round(4).tolist()
    [[[-1.2247, 0.0, 1.2247], [0.0, 0.0, 0.0]]]
    """
    x2, (N, C, L) = as_rows(x)
    shape = np.shape(x)
    (c, s, b), period = _same_period(N, C, _coefficients(center, N, C, "center"),
                                     _coefficients(scale, N, C, "scale"), _coefficients(shift, N, C, "shift"))
    y2 = _output(out, shape, x2)
    if N * C:
        _apply_rows(x2, y2, c, s, b, period, get_num_threads())
    return y2.reshape(shape)


def apply_rows_backward(dy, x, a, center, b, c, out=None):
    """dx = a * dy + b * (x - center) + c, coefficients per row, computed in float64 and
    rounded once to x's dtype (the form of every normalization's input gradient).

    Parameters
    ----------
    dy : array_like
        The gradient with respect to the forward's output, of `x`'s shape (cast to its dtype).
    x : array_like
        (N, C, *), float32 or float64: the forward's input.
    a, center, b, c : float or array_like of shape (C,) or (N, C)
        The coefficients: one value for all rows, one per channel or one per row.
    out : ndarray or None, default None
        Where to write dx: a writeable C-contiguous array of `x`'s shape and dtype.

    Returns
    -------
    ndarray
        dx (`out` when given), of `x`'s shape and dtype.

    Raises
    ------
    TypeError
        `x` or `dy` is not a float32 or float64 array.
    ValueError
        `dy` does not have `x`'s shape, a coefficient has another shape than those above,
        or `out` does not fit.

    Examples
    --------
    >>> x = np.array([[[1.0, 2.0, 3.0]]])
    >>> dx = nc.toolkit.apply_rows_backward(np.ones_like(x), x, 2.0, 2.0, 0.5, 1.0)
    >>> dx.tolist()                                  # 2 * 1 + 0.5 * (x - 2) + 1
    [[[2.5, 3.0, 3.5]]]
    """
    x2, (N, C, L) = as_rows(x)
    shape = np.shape(x)
    dy = as_float_array(dy, "dy")
    if dy.shape != shape:
        raise ValueError(f"dy must have the shape of x {shape}, got {dy.shape}")
    dy2 = np.ascontiguousarray(dy, dtype=x2.dtype).reshape(x2.shape)
    (a_, ctr, b_, c_), period = _same_period(
        N, C, _coefficients(a, N, C, "a"), _coefficients(center, N, C, "center"),
        _coefficients(b, N, C, "b"), _coefficients(c, N, C, "c"))
    dx2 = _output(out, shape, x2)
    if N * C:
        _apply_rows_backward(dy2, x2, dx2, ctr, a_, b_, c_, period, get_num_threads())
    return dx2.reshape(shape)


def _output(out, shape, x2):
    if out is None:
        return np.empty_like(x2)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != x2.dtype \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous {x2.dtype} array of shape {shape}")
    return out.reshape(x2.shape)
