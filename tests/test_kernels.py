"""Every Cython kernel against a plain float64 NumPy twin that states what it must compute.

The twins below are written for clarity: float64 throughout, no blocking, no tricks. The
kernels accumulate every sum in float64, so a float32 input is compared with the float64
result *of the same float32 data* (``x.astype(float64)``). Tolerances:

* sums and moments (float64 outputs): 1e-12 relative to the sum of the magnitudes of the
  terms (the bound a float64 summation meets), for float32 and float64 inputs alike;
* element-wise outputs in the array type: 1e-12 (float64) or 1e-6 (float32) relative to the
  magnitude of the terms of the formula.

Sizes that matter (pyx/chunking.pxd): BLOCK = 4096 elements of a row per block,
PARALLEL_MIN = 65536 elements before any thread is started, ROW_CHUNK = 64 and
COL_BLOCK = 1024 for the column sums of col_param_grads.
"""
import math

import numpy as np
import pytest

from normcore._kernels.apply_cols import apply_cols, apply_cols_backward, col_param_grads
from normcore._kernels.apply_rows import apply_rows, apply_rows_backward
from normcore._kernels.combine import merge_moments, sum_groups
from normcore._kernels.grad_sums import row_grad_sums, row_grad_sums_weighted
from normcore._kernels.moments import row_moments

BLOCK = 4096
PARALLEL_MIN = 65536
ROW_CHUNK = 64
COL_BLOCK = 1024

DTYPES = [np.float32, np.float64]
RTOL_SUM = 1e-12
RTOL_OUT = {np.float32: 1e-6, np.float64: 1e-12}

# (R, L) shapes: one row; one element per row; rows shorter than the 4-way unrolled loops;
# L not a multiple of 4; exactly one block and one past it; several blocks with a tail; many
# short rows. The last two are over PARALLEL_MIN, so with n_threads=3 they run threaded.
SHAPES = [
    (1, 10),
    (1, 1),
    (7, 1),
    (5, 2),
    (5, 3),
    (3, 4),
    (4, 13),
    (2, BLOCK),
    (2, BLOCK + 1),
    (2, 3 * BLOCK + 5),
    (3000, 3),
    (6, 3 * BLOCK + 5),
    (30001, 3),
]
THREADS = [1, 3]


def f64(a):
    return np.asarray(a, dtype=np.float64)


def rows_of(R, period):
    """Index of the coefficient of each row: r % period."""
    return np.arange(R) % period


def assert_within(got, want, scale, rtol, what):
    """|got - want| <= rtol * scale, element-wise (scale: magnitude of the terms of `want`)."""
    got, want, scale = f64(got), f64(want), f64(scale)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bad = ~(err <= rtol * scale)  # also catches NaN
    if bad.any():
        i = np.flatnonzero(bad.ravel())[0]
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} outside rtol={rtol}; first at flat index {i}: "
            f"got {got.ravel()[i]!r}, want {want.ravel()[i]!r}, scale {scale.ravel()[i]!r}")


def make(rng, shape, dtype, loc=0.0, spread=1.0):
    return (loc + spread * rng.standard_normal(shape)).astype(dtype)


def divisors_of(R):
    """period = 1, a C that divides R (when R has one besides 1 and R), and period = R."""
    c = next((d for d in range(2, R) if R % d == 0), None)
    return sorted({1, R} | ({c} if c else set()))


# -------------------------------------------------------------------------------- twins

def np_row_moments(x):
    xd = f64(x)
    mean = xd.mean(1)
    m2 = ((xd - mean[:, None]) ** 2).sum(1)
    return mean, m2


def np_row_grad_sums(x, dy, center, period, w=None):
    """sum(g) and sum(g * (x - center[r % period])) per row, g = dy (times w[j] if given)."""
    g = f64(dy) if w is None else f64(dy) * f64(w)[None, :]
    xc = f64(x) - center[rows_of(len(x), period)][:, None]
    return g.sum(1), (g * xc).sum(1), np.abs(g).sum(1), np.abs(g * xc).sum(1)


def np_apply_rows(x, center, scale, shift, period):
    p = rows_of(len(x), period)
    t = (f64(x) - center[p][:, None]) * scale[p][:, None]
    return t + shift[p][:, None], np.abs(t) + np.abs(shift[p])[:, None]


def np_apply_rows_backward(dy, x, center, a, b, c, period):
    p = rows_of(len(x), period)
    t1 = a[p][:, None] * f64(dy)
    t2 = b[p][:, None] * (f64(x) - center[p][:, None])
    t3 = c[p][:, None] + 0 * t1
    return t1 + t2 + t3, np.abs(t1) + np.abs(t2) + np.abs(t3)


def np_apply_cols(x, center, scale, weight, bias):
    t = (f64(x) - center[:, None]) * scale[:, None] * f64(weight)[None, :]
    bb = np.zeros(x.shape[1]) if bias is None else f64(bias)
    return t + bb[None, :], np.abs(t) + np.abs(bb)[None, :]


def np_apply_cols_backward(dy, x, center, a, b, c, weight):
    t1 = a[:, None] * f64(weight)[None, :] * f64(dy)
    t2 = b[:, None] * (f64(x) - center[:, None])
    t3 = c[:, None] + 0 * t1
    return t1 + t2 + t3, np.abs(t1) + np.abs(t2) + np.abs(t3)


def np_col_param_grads(x, dy, center, scale):
    """dweight[j] = sum_r dy * (x - center[r]) * scale[r];  dbias[j] = sum_r dy."""
    t = f64(dy) * (f64(x) - center[:, None]) * scale[:, None]
    g = f64(dy)
    return t.sum(0), g.sum(0), np.abs(t).sum(0), np.abs(g).sum(0)


# ------------------------------------------------------------------------ row_moments

@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_moments(dtype, shape, n_threads):
    rng = np.random.default_rng(1)
    x = make(rng, shape, dtype, loc=3.0, spread=2.0)
    mean, m2 = np.full(shape[0], np.nan), np.full(shape[0], np.nan)
    row_moments(x, mean, m2, n_threads)
    want_mean, want_m2 = np_row_moments(x)
    assert_within(mean, want_mean, np.abs(f64(x)).max(1), RTOL_SUM, "mean")
    assert_within(m2, want_m2, want_m2, RTOL_SUM, "M2")
    if shape[1] == 1:
        assert np.all(m2 == 0.0) and np.array_equal(mean, f64(x[:, 0]))


@pytest.mark.parametrize("L", [5, 3 * BLOCK + 5, 100_003])
def test_row_moments_large_mean_float32(L):
    """x = 1e4 + N(0, 1) in float32: var to 1e-10 relative (no E[x^2] - E[x]^2 anywhere)."""
    rng = np.random.default_rng(2)
    x = make(rng, (3, L), np.float32, loc=1e4)
    mean, m2 = np.empty(3), np.empty(3)
    row_moments(x, mean, m2)
    want_mean, want_m2 = np_row_moments(x)
    var, want_var = m2 / L, want_m2 / L
    assert np.all(np.abs(var - want_var) < 1e-10 * want_var), (var, want_var)
    assert np.all(np.abs(mean - want_mean) < 1e-14 * 1e4), (mean, want_mean)


@pytest.mark.parametrize("L", [1, 3, 5, BLOCK, 3 * BLOCK + 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_moments_constant_rows(dtype, L):
    """A constant row: M2 exactly 0, mean exactly the value; and it normalises to exactly
    its shift (apply_rows and apply_cols split the center so x - center is exact)."""
    values = np.array([1e4 + 0.37, -3.1, 0.0], dtype=dtype)
    x = np.repeat(values[:, None], L, axis=1)
    mean, m2 = np.empty(3), np.empty(3)
    row_moments(x, mean, m2)
    assert np.array_equal(mean, f64(values))
    assert np.array_equal(m2, np.zeros(3))
    shift = np.array([0.25, -1.5, 7.0])
    rstd = 1.0 / np.sqrt(m2 / L + 1e-5)
    y = np.empty_like(x)
    apply_rows(x, y, mean, rstd, shift, 3)
    assert np.array_equal(y, np.repeat(shift.astype(dtype)[:, None], L, axis=1))
    bias = np.linspace(-1, 1, L).astype(dtype)
    apply_cols(x, y, mean, rstd, np.full(L, 2.0, dtype), bias)
    assert np.array_equal(y, np.broadcast_to(bias, x.shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("L", [1, 5, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_moments_non_finite_propagates(dtype, L, bad):
    """A row holding NaN or inf has an undefined variance: M2 must be NaN (as NumPy's), for
    every row length, not 0. The other rows are unaffected."""
    x = np.ones((2, L), dtype)
    x[0, L // 2] = bad
    mean, m2 = np.empty(2), np.empty(2)
    row_moments(x, mean, m2)
    with np.errstate(invalid="ignore"):
        assert np.isnan(np_row_moments(x)[1][0])
    assert (mean[1], m2[1]) == (1.0, 0.0)
    assert np.isnan(m2[0]), f"M2 of a row holding {bad} is {m2[0]}"


# ---------------------------------------------------------------------- row_grad_sums

@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_grad_sums(dtype, shape, n_threads, weighted):
    rng = np.random.default_rng(3)
    R, L = shape
    x = make(rng, shape, dtype, loc=5.0, spread=3.0)
    dy = make(rng, shape, dtype)
    w = make(rng, L, dtype, loc=1.0, spread=0.5) if weighted else None
    for period in divisors_of(R):
        center = 5.0 + rng.standard_normal(period)
        s, t = np.full(R, np.nan), np.full(R, np.nan)
        if weighted:
            row_grad_sums_weighted(x, dy, w, center, period, s, t, n_threads)
        else:
            row_grad_sums(x, dy, center, period, s, t, n_threads)
        want_s, want_t, scale_s, scale_t = np_row_grad_sums(x, dy, center, period, w)
        assert_within(s, want_s, scale_s, RTOL_SUM, f"sum(dy) period={period}")
        assert_within(t, want_t, scale_t, RTOL_SUM, f"sum(dy*(x-c)) period={period}")


# ------------------------------------------------------------------------- apply_rows

@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rows(dtype, shape, n_threads):
    rng = np.random.default_rng(4)
    R, L = shape
    x = make(rng, shape, dtype, loc=2.0, spread=3.0)
    for period in divisors_of(R):
        center = 2.0 + rng.standard_normal(period)
        scale = rng.uniform(0.2, 3.0, period)
        shift = rng.standard_normal(period)
        want, mag = np_apply_rows(x, center, scale, shift, period)
        y = np.full_like(x, np.nan)
        apply_rows(x, y, center, scale, shift, period, n_threads)
        assert y.dtype == dtype
        assert_within(y, want, mag, RTOL_OUT[dtype], f"y period={period}")
        # In place (y is x): the same values.
        xi = x.copy()
        apply_rows(xi, xi, center, scale, shift, period, n_threads)
        assert np.array_equal(xi, y)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rows_backward(dtype, shape, n_threads):
    rng = np.random.default_rng(5)
    R, L = shape
    x = make(rng, shape, dtype, loc=-1.0, spread=2.0)
    dy = make(rng, shape, dtype)
    for period in divisors_of(R):
        center = -1.0 + rng.standard_normal(period)
        a, b, c = rng.uniform(0.5, 2.0, period), rng.standard_normal(period), rng.standard_normal(period)
        want, mag = np_apply_rows_backward(dy, x, center, a, b, c, period)
        dx = np.full_like(x, np.nan)
        apply_rows_backward(dy, x, dx, center, a, b, c, period, n_threads)
        assert_within(dx, want, mag, RTOL_OUT[dtype], f"dx period={period}")
        dyi = dy.copy()  # dx may be dy itself
        apply_rows_backward(dyi, x, dyi, center, a, b, c, period, n_threads)
        assert np.array_equal(dyi, dx)


# ------------------------------------------------------------------------- apply_cols

@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_cols(dtype, shape, n_threads, with_bias):
    rng = np.random.default_rng(6)
    R, L = shape
    x = make(rng, shape, dtype, loc=4.0, spread=2.0)
    center = 4.0 + rng.standard_normal(R)
    scale = rng.uniform(0.2, 3.0, R)
    weight = make(rng, L, dtype, loc=1.0, spread=0.5)
    bias = make(rng, L, dtype) if with_bias else None
    want, mag = np_apply_cols(x, center, scale, weight, bias)
    y = np.full_like(x, np.nan)
    apply_cols(x, y, center, scale, weight, bias, n_threads)
    assert_within(y, want, mag, RTOL_OUT[dtype], "y")
    xi = x.copy()  # y may be x itself
    apply_cols(xi, xi, center, scale, weight, bias, n_threads)
    assert np.array_equal(xi, y)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_cols_backward(dtype, shape, n_threads):
    rng = np.random.default_rng(7)
    R, L = shape
    x = make(rng, shape, dtype, loc=1.0, spread=2.0)
    dy = make(rng, shape, dtype)
    center = 1.0 + rng.standard_normal(R)
    a, b, c = rng.uniform(0.5, 2.0, R), rng.standard_normal(R), rng.standard_normal(R)
    weight = make(rng, L, dtype, loc=1.0, spread=0.5)
    want, mag = np_apply_cols_backward(dy, x, center, a, b, c, weight)
    dx = np.full_like(x, np.nan)
    apply_cols_backward(dy, x, dx, center, a, b, c, weight, n_threads)
    assert_within(dx, want, mag, RTOL_OUT[dtype], "dx")
    dyi = dy.copy()  # dx may be dy itself
    apply_cols_backward(dyi, x, dyi, center, a, b, c, weight, n_threads)
    assert np.array_equal(dyi, dx)


# -------------------------------------------------------------------- col_param_grads

# Rows around ROW_CHUNK (one chunk, one full chunk, one past it), more than 64 * 64 rows
# (rows_per_chunk = ceil(R / 64) > 64, 64 chunks with a short last one), and columns around
# and past COL_BLOCK.
COL_SHAPES = SHAPES + [
    (ROW_CHUNK - 1, 5),
    (ROW_CHUNK, 5),
    (ROW_CHUNK + 1, 5),
    (130, COL_BLOCK),
    (130, COL_BLOCK + 1),
    (64 * 64 + 1, 7),
    (4161, COL_BLOCK + 6),
]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", COL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_col_param_grads(dtype, shape, n_threads):
    rng = np.random.default_rng(8)
    R, L = shape
    x = make(rng, shape, dtype, loc=3.0, spread=2.0)
    dy = make(rng, shape, dtype)
    center = 3.0 + rng.standard_normal(R)
    scale = rng.uniform(0.2, 3.0, R)
    dw, db = np.full(L, np.nan), np.full(L, np.nan)
    col_param_grads(x, dy, center, scale, dw, db, n_threads)
    want_w, want_b, scale_w, scale_b = np_col_param_grads(x, dy, center, scale)
    assert_within(dw, want_w, scale_w, RTOL_SUM, "dweight")
    assert_within(db, want_b, scale_b, RTOL_SUM, "dbias")


# ------------------------------------------------------------------------------ combine

# (outer, k, inner): BatchNorm (1, N, C), InstanceNorm (N*C, 1, 1), GroupNorm (N*G, C/G, 1),
# and a general one.
GROUPINGS = [(1, 4, 3), (6, 1, 1), (4, 3, 1), (2, 5, 3), (1, 1, 1)]


@pytest.mark.parametrize("count", [1, 2, 7, 100])
@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_merge_moments(grouping, count):
    """Merging row moments gives the moments of the whole group's data."""
    outer, k, inner = grouping
    rng = np.random.default_rng(9)
    # Row (o, j, i) holds `count` values; group (o, i) is the union of its k rows.
    data = 10.0 + rng.standard_normal((outer, k, inner, count)) * rng.uniform(0.5, 2, (1, k, 1, 1))
    row_mean, row_m2 = np_row_moments(data.reshape(-1, count))
    mean, m2 = np.full(outer * inner, np.nan), np.full(outer * inner, np.nan)
    merge_moments(row_mean, row_m2, count, outer, k, inner, mean, m2)
    want_mean, want_m2 = np_row_moments(data.transpose(0, 2, 1, 3).reshape(outer * inner, k * count))
    assert_within(mean, want_mean, np.abs(data).max(axis=(1, 3)).ravel(), RTOL_SUM, "group mean")
    assert_within(m2, want_m2, want_m2, RTOL_SUM, "group M2")


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_sum_groups(grouping):
    """out[o, i] = sum over j of v[o, j, i], added in increasing j (bitwise that order)."""
    outer, k, inner = grouping
    v = np.random.default_rng(10).standard_normal(outer * k * inner) * 1e3
    out = np.full(outer * inner, np.nan)
    sum_groups(v, outer, k, inner, out)
    v3 = v.reshape(outer, k, inner)
    want = np.zeros((outer, inner))
    for j in range(k):
        want = want + v3[:, j, :]
    assert np.array_equal(out, want.ravel())


# -------------------------------------------------------------------------- empty input

@pytest.mark.parametrize("dtype", DTYPES)
def test_no_rows(dtype):
    """R = 0: nothing to do, nothing raised; col_param_grads gives zero sums."""
    x = np.empty((0, 5), dtype)
    e = np.empty(0)
    row_moments(x, e, e)
    row_grad_sums(x, x, e, 1, e, e)
    apply_rows(x, x.copy(), e, e, e, 1)
    apply_cols(x, x.copy(), e, e, np.ones(5, dtype), None)
    dw, db = np.full(5, np.nan), np.full(5, np.nan)
    col_param_grads(x, x, e, e, dw, db)
    assert np.array_equal(dw, np.zeros(5)) and np.array_equal(db, np.zeros(5))


# ---------------------------------------------------------------------- invalid arguments

def _invalid_calls():
    x = np.ones((6, 5))
    dy = np.ones((6, 5))
    r6, r5, r3, r4, r2 = np.ones(6), np.ones(5), np.ones(3), np.ones(4), np.ones(2)
    c5 = np.ones(5)
    y = np.empty((6, 5))
    return {
        "moments: mean too short": lambda: row_moments(x, r5, r6),
        "moments: m2 too long": lambda: row_moments(x, r6, np.ones(7)),
        "moments: L == 0": lambda: row_moments(np.ones((2, 0)), np.ones(2), np.ones(2)),
        "grad_sums: dy shape": lambda: row_grad_sums(x, np.ones((6, 4)), r6, 6, r6, r6),
        "grad_sums: period does not divide R": lambda: row_grad_sums(x, dy, r6, 4, r6, r6),
        "grad_sums: period 0": lambda: row_grad_sums(x, dy, r6, 0, r6, r6),
        "grad_sums: center shorter than period": lambda: row_grad_sums(x, dy, r2, 3, r6, r6),
        "grad_sums: outputs too short": lambda: row_grad_sums(x, dy, r6, 6, r5, r6),
        "grad_sums_weighted: w length": lambda: row_grad_sums_weighted(x, dy, r6, r6, 6, r6, r6),
        "grad_sums_weighted: period": lambda: row_grad_sums_weighted(x, dy, c5, r6, 4, r6, r6),
        "apply_rows: y shape": lambda: apply_rows(x, np.empty((6, 4)), r6, r6, r6, 6),
        "apply_rows: period does not divide R": lambda: apply_rows(x, y, r4, r4, r4, 4),
        "apply_rows: period 0": lambda: apply_rows(x, y, r6, r6, r6, 0),
        "apply_rows: coefficients shorter than period": lambda: apply_rows(x, y, r3, r2, r3, 3),
        "apply_rows_backward: dx shape": lambda: apply_rows_backward(dy, x, np.empty((5, 5)), r6, r6, r6, r6, 6),
        "apply_rows_backward: dy shape": lambda: apply_rows_backward(np.ones((6, 4)), x, y, r6, r6, r6, r6, 6),
        "apply_rows_backward: period": lambda: apply_rows_backward(dy, x, y, r4, r4, r4, r4, 4),
        "apply_rows_backward: short c": lambda: apply_rows_backward(dy, x, y, r3, r3, r3, r2, 3),
        "apply_cols: y shape": lambda: apply_cols(x, np.empty((6, 4)), r6, r6, c5, c5),
        "apply_cols: center length": lambda: apply_cols(x, y, r5, r6, c5, c5),
        "apply_cols: weight length": lambda: apply_cols(x, y, r6, r6, r6, c5),
        "apply_cols: bias length": lambda: apply_cols(x, y, r6, r6, c5, r6),
        "apply_cols_backward: dy shape": lambda: apply_cols_backward(np.ones((6, 4)), x, y, r6, r6, r6, r6, c5),
        "apply_cols_backward: c length": lambda: apply_cols_backward(dy, x, y, r6, r6, r6, r5, c5),
        "apply_cols_backward: weight length": lambda: apply_cols_backward(dy, x, y, r6, r6, r6, r6, r6),
        "col_param_grads: dy shape": lambda: col_param_grads(x, np.ones((5, 5)), r6, r6, c5, c5),
        "col_param_grads: scale length": lambda: col_param_grads(x, dy, r6, r5, c5, c5),
        "col_param_grads: dweight length": lambda: col_param_grads(x, dy, r6, r6, r6, c5),
        "col_param_grads: dbias length": lambda: col_param_grads(x, dy, r6, r6, c5, r6),
        "merge_moments: grouping mismatch": lambda: merge_moments(r6, r6, 3, 1, 4, 2, r2, r2),
        "merge_moments: output mismatch": lambda: merge_moments(r6, r6, 3, 1, 3, 2, r3, r3),
        "merge_moments: m2 length": lambda: merge_moments(r6, r5, 3, 1, 3, 2, r2, r2),
        "merge_moments: out_m2 length": lambda: merge_moments(r6, r6, 3, 1, 3, 2, r2, r3),
        "merge_moments: k == 0": lambda: merge_moments(np.ones(0), np.ones(0), 3, 1, 0, 2, r2, r2),
        "sum_groups: grouping mismatch": lambda: sum_groups(r6, 2, 2, 2, np.ones(4)),
        "sum_groups: output mismatch": lambda: sum_groups(r6, 2, 3, 1, r3),
    }


INVALID = _invalid_calls()


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_arguments_raise_value_error(name):
    with pytest.raises(ValueError):
        INVALID[name]()


def test_shapes_cover_what_they_claim():
    """Guard against the shape lists drifting away from the cases they are meant to hit."""
    assert any(R * L >= PARALLEL_MIN and L > BLOCK and L % BLOCK for R, L in SHAPES)
    assert any(R * L >= PARALLEL_MIN and L < 4 for R, L in SHAPES)
    assert any(R > 64 * ROW_CHUNK and L > COL_BLOCK and math.ceil(R / 64) > ROW_CHUNK for R, L in COL_SHAPES)
