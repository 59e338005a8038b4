"""Every Cython kernel against a plain float64 NumPy twin that states what it must compute.

The twins below are written for clarity: float64 throughout, no blocking, no tricks. The
kernels accumulate every sum in float64, so a float32 input is compared with the float64
result *of the same float32 data* (``x.astype(float64)``). Tolerances:

* sums and moments (float64 outputs): 1e-12 relative to the sum of the magnitudes of the
  terms (the bound a float64 summation meets), for float32 and float64 inputs alike;
* element-wise outputs in the array type: 1e-12 (float64) or 1e-6 (float32) relative to the
  magnitude of the terms of the formula.

* layer_backward's dx and group_backward's dx are a * g + b * (x - mean) + c with b, c made
  from sums: the magnitude is |a * g| + |b| * |x - mean| + |c| with b, c computed from the
  sums of the magnitudes of the terms (so the 1e-12 error of the sums is covered).

Sizes that matter (pyx/chunking.pxd, row_ops.h): BLOCK = 4096 elements of a row per block,
summed in LANES = 16 lanes; PARALLEL_MIN = 65536 elements before any thread is started;
layer_backward's column sums run over chunks of max(ROW_CHUNK, ceil(R / MAX_CHUNKS)) rows
(ROW_CHUNK = MAX_CHUNKS = 64); group_forward / group_backward run one task per group
("fused") when n_threads == 1, below PARALLEL_MIN or with G >= FUSED_MIN_GROUPS * n_threads
groups, and otherwise separate passes over blocks ("split"), which must give the same bits.
channel_forward keeps the statistics of up to STACK_ROWS = 256 rows on the stack and mallocs
them for more rows; rows of L > BLOCK take a separate path (per-block moments merged in order).
"""
import math

import numpy as np
import pytest

import normcore as nc

from normcore._kernels.apply_rows import apply_rows, apply_rows_backward
from normcore._kernels.engine import (FUSED_MIN_CHANNELS, SHORT_ROW, Plan, channel_backward, channel_forward,
                                      commit_running, group_backward, group_forward, merge_in_order,
                                      running_values)
from normcore._kernels.grad_sums import row_grad_sums, row_grad_sums_weighted
from normcore._kernels.engine import layer_backward, layer_forward
from normcore._kernels.moments import row_moments

BLOCK = 4096
LANES = 16
PARALLEL_MIN = 65536
ROW_CHUNK = 64
MAX_CHUNKS = 64
FUSED_MIN_GROUPS = 4
STACK_ROWS = 256
EPS = 1e-5

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


def groups_of(R, k):
    """Index of the group of each row: r // k."""
    return np.arange(R) // k


def own_stats_scale(dtype, mag, mag_terms):
    """Scale for an output normalised with statistics the kernel computes itself: the
    rounding of the apply (RTOL_OUT relative to `mag`) plus the error of the statistics
    (RTOL_SUM relative to `mag_terms`, the magnitude of x * rstd * w and mean * rstd * w),
    which matters where x is close to the mean."""
    return mag + (RTOL_SUM / RTOL_OUT[dtype]) * mag_terms


def np_layer_forward(x, weight, bias, eps):
    """LayerNorm of each row: (mean, rstd, y, magnitude of the terms of the apply y = t + bias,
    magnitude of the terms x * rstd * w and mean * rstd * w)."""
    L = x.shape[1]
    mean, m2 = np_row_moments(x)
    rstd = 1.0 / np.sqrt(np.maximum(m2 / L, 0.0) + eps)
    t = (f64(x) - mean[:, None]) * rstd[:, None]
    terms = (np.abs(f64(x)) + np.abs(mean)[:, None]) * rstd[:, None]
    if weight is not None:
        t = t * f64(weight)[None, :]
        terms = terms * np.abs(f64(weight))[None, :]
    bb = np.zeros(L) if bias is None else f64(bias)
    return mean, rstd, t + bb[None, :], np.abs(t) + np.abs(bb)[None, :], terms


def np_layer_backward(x, dy, weight, mean, rstd):
    """dx of LayerNorm (g = weight * dy, or dy), its magnitude, and the column sums
    dweight = sum_r dy * (x - mean_r) * rstd_r, dbias = sum_r dy with their magnitudes."""
    L = x.shape[1]
    g = f64(dy) if weight is None else f64(dy) * f64(weight)[None, :]
    xc = f64(x) - mean[:, None]
    b = -rstd ** 3 * (g * xc).sum(1) / L
    c = -rstd * g.sum(1) / L
    b_mag = rstd ** 3 * np.abs(g * xc).sum(1) / L
    c_mag = rstd * np.abs(g).sum(1) / L
    t1 = rstd[:, None] * g
    dx = t1 + b[:, None] * xc + c[:, None]
    mag = np.abs(t1) + b_mag[:, None] * np.abs(xc) + c_mag[:, None]
    tw = f64(dy) * xc * rstd[:, None]
    return dx, mag, tw.sum(0), f64(dy).sum(0), np.abs(tw).sum(0), np.abs(f64(dy)).sum(0)


def np_group_forward(x, k, C, weight, bias, eps):
    """Groups of k consecutive rows normalised with their own statistics; row r has channel
    r % C. (mean, m2, rstd, y, magnitudes as np_layer_forward's)."""
    R, L = x.shape
    mean, m2 = np_row_moments(f64(x).reshape(R // k, k * L))
    rstd = 1.0 / np.sqrt(np.maximum(m2 / (k * L), 0.0) + eps)
    g, c = groups_of(R, k), rows_of(R, C)
    a = (rstd[g] * weight[c])[:, None]
    t = (f64(x) - mean[g][:, None]) * a
    terms = (np.abs(f64(x)) + np.abs(mean[g])[:, None]) * np.abs(a)
    return mean, m2, rstd, t + bias[c][:, None], np.abs(t) + np.abs(bias[c])[:, None], terms


def np_group_backward(x, dy, k, C, weight, mean, rstd):
    """dx of group_forward and the per-row sums sum(dy), sum(dy * (x - mean_g)), each with
    its magnitude: (dx, mag, sdy, sdyxc, sdy_mag, sdyxc_mag)."""
    R, L = x.shape
    G, M = R // k, k * L
    gi, w = groups_of(R, k), weight[rows_of(R, C)]
    d = f64(dy)
    xc = f64(x) - mean[gi][:, None]
    sdy, sdyxc = d.sum(1), (d * xc).sum(1)
    sdy_mag, sdyxc_mag = np.abs(d).sum(1), np.abs(d * xc).sum(1)
    s1, s2 = (w * sdy).reshape(G, k).sum(1), (w * sdyxc).reshape(G, k).sum(1)
    s1_mag = (np.abs(w) * sdy_mag).reshape(G, k).sum(1)
    s2_mag = (np.abs(w) * sdyxc_mag).reshape(G, k).sum(1)
    b, c = -rstd ** 3 * s2 / M, -rstd * s1 / M
    b_mag, c_mag = rstd ** 3 * s2_mag / M, rstd * s1_mag / M
    t1 = (rstd[gi] * w)[:, None] * d
    dx = t1 + b[gi][:, None] * xc + c[gi][:, None]
    mag = np.abs(t1) + b_mag[gi][:, None] * np.abs(xc) + c_mag[gi][:, None]
    return dx, mag, sdy, sdyxc, sdy_mag, sdyxc_mag


def np_channel_forward(x, C, weight, bias, eps, given=None):
    """BatchNorm's forward: row r of x [R, L] has channel c = r % C (R = N * C).
    given None: the statistics of each channel's N * L values, mean and M2;
    given (mean, var): those (then m2 here is var, the kernel's unchanged input).
    rstd = 1 / sqrt(max(var, 0) + eps), y = (x - mean_c) * (rstd_c * weight_c) + bias_c.
    (mean, m2, rstd, y, magnitudes as np_group_forward's)."""
    R, L = x.shape
    N = R // C
    xd = f64(x)
    if given is None:
        mean, m2 = np_row_moments(xd.reshape(N, C, L).transpose(1, 0, 2).reshape(C, N * L))
        var = m2 / (N * L)
    else:
        mean, m2 = f64(given[0]).copy(), f64(given[1]).copy()
        var = m2
    rstd = 1.0 / np.sqrt(np.maximum(var, 0.0) + eps)
    c = rows_of(R, C)
    a = (rstd * weight)[c][:, None]
    t = (xd - mean[c][:, None]) * a
    terms = (np.abs(xd) + np.abs(mean[c])[:, None]) * np.abs(a)
    return mean, m2, rstd, t + bias[c][:, None], np.abs(t) + np.abs(bias[c])[:, None], terms


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
    its shift (apply_rows and layer_forward split the center so x - center is exact)."""
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
    lmean, lrstd = np.empty(3), np.empty(3)
    layer_forward(x, y, np.full(L, 2.0, dtype), bias, 1e-5, lmean, lrstd)
    assert np.array_equal(y, np.broadcast_to(bias, x.shape))
    assert np.array_equal(lmean, f64(values)) and np.array_equal(lrstd, rstd)
    layer_forward(x, y, None, None, 1e-5, lmean, lrstd)
    assert np.array_equal(y, np.zeros_like(x))


# Lengths around the 16 lanes of a block's sums (tail of n % 16 elements) and around BLOCK.
LANE_LENGTHS = [1, LANES - 1, LANES, LANES + 1, BLOCK - 1, BLOCK, BLOCK + 1, 10000]


@pytest.mark.parametrize("L", LANE_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lane_lengths(dtype, L):
    """row_moments and the gradient sums on rows whose length is around a multiple of the
    16 lanes and of BLOCK, against the twins."""
    rng = np.random.default_rng(11)
    x = make(rng, (3, L), dtype, loc=3.0, spread=2.0)
    dy = make(rng, (3, L), dtype)
    w = make(rng, L, dtype, loc=1.0, spread=0.5)
    mean, m2 = np.full(3, np.nan), np.full(3, np.nan)
    row_moments(x, mean, m2)
    want_mean, want_m2 = np_row_moments(x)
    assert_within(mean, want_mean, np.abs(f64(x)).max(1), RTOL_SUM, "mean")
    assert_within(m2, want_m2, want_m2, RTOL_SUM, "M2")
    center = 3.0 + rng.standard_normal(3)
    for weighted in (False, True):
        s, t = np.full(3, np.nan), np.full(3, np.nan)
        if weighted:
            row_grad_sums_weighted(x, dy, w, center, 3, s, t)
        else:
            row_grad_sums(x, dy, center, 3, s, t)
        want_s, want_t, scale_s, scale_t = np_row_grad_sums(x, dy, center, 3, w if weighted else None)
        assert_within(s, want_s, scale_s, RTOL_SUM, f"sum(g) weighted={weighted}")
        assert_within(t, want_t, scale_t, RTOL_SUM, f"sum(g*(x-c)) weighted={weighted}")


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


# ------------------------------------------------------------------- layer_forward/backward

# Rows around one chunk of the column sums (one chunk; one past it: two chunks), R >= 128,
# more than 64 * 64 rows (ceil(R / 64) > ROW_CHUNK rows per chunk, the last chunk short),
# and rows over PARALLEL_MIN with several blocks.
LAYER_SHAPES = SHAPES + [
    (ROW_CHUNK - 1, 5),
    (ROW_CHUNK, 5),
    (ROW_CHUNK + 1, 5),
    (128, 17),
    (130, 33),
    (MAX_CHUNKS * ROW_CHUNK + 1, 7),
    (4161, 20),
]
AFFINE = ["weight_bias", "weight", "none"]


def layer_params(rng, L, dtype, affine):
    weight = make(rng, L, dtype, loc=1.0, spread=0.5) if affine != "none" else None
    bias = make(rng, L, dtype) if affine == "weight_bias" else None
    return weight, bias


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_forward(dtype, shape, n_threads, affine):
    rng = np.random.default_rng(6)
    R, L = shape
    x = make(rng, shape, dtype, loc=4.0, spread=2.0)
    weight, bias = layer_params(rng, L, dtype, affine)
    want_mean, want_rstd, want, mag, terms = np_layer_forward(x, weight, bias, EPS)
    y = np.full_like(x, np.nan)
    mean, rstd = np.full(R, np.nan), np.full(R, np.nan)
    layer_forward(x, y, weight, bias, EPS, mean, rstd, n_threads)
    assert y.dtype == dtype
    assert_within(mean, want_mean, np.abs(f64(x)).max(1), RTOL_SUM, "mean")
    assert_within(rstd, want_rstd, want_rstd, RTOL_SUM, "rstd")
    assert_within(y, want, own_stats_scale(dtype, mag, terms), RTOL_OUT[dtype], "y")
    # In place (y is x): the same values.
    xi = x.copy()
    mean_i, rstd_i = np.empty(R), np.empty(R)
    layer_forward(xi, xi, weight, bias, EPS, mean_i, rstd_i, n_threads)
    assert np.array_equal(xi, y) and np.array_equal(mean_i, mean) and np.array_equal(rstd_i, rstd)


@pytest.mark.parametrize("param_grads", [True, False], ids=["grads", "no_grads"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_backward(dtype, shape, n_threads, weighted, param_grads):
    rng = np.random.default_rng(7)
    L = shape[1]
    x = make(rng, shape, dtype, loc=1.0, spread=2.0)
    dy = make(rng, shape, dtype)
    weight = make(rng, L, dtype, loc=1.0, spread=0.5) if weighted else None
    mean, rstd = np_layer_forward(x, None, None, EPS)[:2]
    want, mag, want_w, want_b, scale_w, scale_b = np_layer_backward(x, dy, weight, mean, rstd)
    dx = np.full_like(x, np.nan)
    dw = np.full(L, np.nan) if param_grads else None
    db = np.full(L, np.nan) if param_grads else None
    layer_backward(x, dy, dx, weight, mean, rstd, dw, db, n_threads)
    assert dx.dtype == dtype
    assert_within(dx, want, mag, RTOL_OUT[dtype], "dx")
    if param_grads:
        assert_within(dw, want_w, scale_w, RTOL_SUM, "dweight")
        assert_within(db, want_b, scale_b, RTOL_SUM, "dbias")
    else:
        # dx does not depend on whether the parameter gradients are wanted.
        dx2 = np.empty_like(x)
        layer_backward(x, dy, dx2, weight, mean, rstd, np.empty(L), np.empty(L), n_threads)
        assert np.array_equal(dx2, dx)


# One chunk, two chunks, more than 64 * 64 rows; rows of several blocks.
IN_PLACE_SHAPES = [(5, 37), (ROW_CHUNK + 1, 5), (130, 33), (MAX_CHUNKS * ROW_CHUNK + 1, 7), (2, 3 * BLOCK + 5)]


@pytest.mark.parametrize("param_grads", [True, False], ids=["grads", "no_grads"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("shape", IN_PLACE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_backward_in_place(dtype, shape, weighted, param_grads):
    """dx may be dy itself: dx, dweight and dbias the same bits as with a separate dx."""
    rng = np.random.default_rng(12)
    L = shape[1]
    x = make(rng, shape, dtype, loc=1.0, spread=2.0)
    dy = make(rng, shape, dtype)
    weight = make(rng, L, dtype, loc=1.0, spread=0.5) if weighted else None
    mean, rstd = np_layer_forward(x, None, None, EPS)[:2]
    grads = (lambda: (np.full(L, np.nan), np.full(L, np.nan))) if param_grads else (lambda: (None, None))
    dx = np.empty_like(x)
    dw, db = grads()
    layer_backward(x, dy, dx, weight, mean, rstd, dw, db, 3)
    dyi = dy.copy()
    dwi, dbi = grads()
    layer_backward(x, dyi, dyi, weight, mean, rstd, dwi, dbi, 3)
    assert np.array_equal(dyi, dx), "dx"
    if param_grads:
        assert np.array_equal(dwi, dw), f"dweight in place differs: max |diff| {np.abs(dwi - dw).max()}"
        assert np.array_equal(dbi, db), f"dbias in place differs: max |diff| {np.abs(dbi - db).max()}"


def test_layer_forward_bias_needs_weight():
    x = np.ones((2, 3))
    with pytest.raises(ValueError):
        layer_forward(x, np.empty_like(x), None, np.ones(3), EPS, np.empty(2), np.empty(2))


# --------------------------------------------------------------- group_forward/backward

# (R, L, k, C): InstanceNorm (k = 1) and GroupNorm (k > 1), C != k, groups straddling
# channels (k = 3, C = 4); L = 1; L not a multiple of 16; groups of k*L > BLOCK values made
# of rows shorter than a block (blocks cross rows); L > BLOCK; and inputs over PARALLEL_MIN:
# few groups (split path with 2 or 3 threads) and many groups (fused path, threaded).
GROUP_CASES = [
    (1, 10, 1, 1),
    (6, 10, 1, 3),
    (6, 10, 2, 3),
    (8, 17, 4, 2),
    (12, 5, 3, 4),
    (4, 1, 2, 4),
    (3, 1, 1, 3),
    (1000, 3, 1, 10),
    (6, 2000, 3, 2),
    (2, BLOCK + 3, 1, 2),
    (4, 3 * BLOCK + 5, 2, 2),
    (4, 20001, 2, 4),
    (4, 16411, 1, 2),
    (2, 40003, 2, 1),
    (256, 301, 2, 8),
    (30000, 3, 2, 6),
]
GROUP_THREADS = [1, 2, 3]


def is_split(R, L, k, n_threads):
    """Whether group_forward / group_backward take the split path (groups.pxi _fused)."""
    return n_threads > 1 and R * L >= PARALLEL_MIN and R // k < FUSED_MIN_GROUPS * n_threads


def group_params(rng, C):
    return rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C), rng.standard_normal(C)


@pytest.mark.parametrize("n_threads", GROUP_THREADS)
@pytest.mark.parametrize("case", GROUP_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_forward(dtype, case, n_threads):
    R, L, k, C = case
    G = R // k
    rng = np.random.default_rng(13)
    x = make(rng, (R, L), dtype, loc=4.0, spread=2.0)
    weight, bias = group_params(rng, C)
    want_mean, want_m2, want_rstd, want, mag, terms = np_group_forward(x, k, C, weight, bias, EPS)
    y = np.full_like(x, np.nan)
    mean, m2, rstd = np.full(G, np.nan), np.full(G, np.nan), np.full(G, np.nan)
    group_forward(x, y, k, C, weight, bias, EPS, mean, m2, rstd, n_threads)
    assert y.dtype == dtype
    assert_within(mean, want_mean, np.abs(f64(x)).reshape(G, -1).max(1), RTOL_SUM, "mean")
    assert_within(m2, want_m2, want_m2, RTOL_SUM, "M2")
    assert_within(rstd, want_rstd, want_rstd, RTOL_SUM, "rstd")
    assert_within(y, want, own_stats_scale(dtype, mag, terms), RTOL_OUT[dtype], "y")
    xi = x.copy()  # y may be x itself
    out_i = np.empty(G), np.empty(G), np.empty(G)
    group_forward(xi, xi, k, C, weight, bias, EPS, *out_i, n_threads)
    assert np.array_equal(xi, y)
    assert all(np.array_equal(a, b) for a, b in zip(out_i, (mean, m2, rstd)))


@pytest.mark.parametrize("n_threads", GROUP_THREADS)
@pytest.mark.parametrize("case", GROUP_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_backward(dtype, case, n_threads):
    R, L, k, C = case
    rng = np.random.default_rng(14)
    x = make(rng, (R, L), dtype, loc=-1.0, spread=2.0)
    dy = make(rng, (R, L), dtype)
    weight, _ = group_params(rng, C)
    mean, _, rstd = np_group_forward(x, k, C, weight, np.zeros(C), EPS)[:3]
    want, mag, want_sdy, want_sdyxc, sdy_mag, sdyxc_mag = np_group_backward(x, dy, k, C, weight, mean, rstd)
    dx = np.full_like(x, np.nan)
    sdy, sdyxc = np.full(R, np.nan), np.full(R, np.nan)
    group_backward(x, dy, dx, k, C, weight, mean, rstd, sdy, sdyxc, n_threads)
    assert dx.dtype == dtype
    assert_within(sdy, want_sdy, sdy_mag, RTOL_SUM, "sum(dy)")
    assert_within(sdyxc, want_sdyxc, sdyxc_mag, RTOL_SUM, "sum(dy*(x-mean))")
    assert_within(dx, want, mag, RTOL_OUT[dtype], "dx")
    dyi = dy.copy()  # dx may be dy itself
    sdy_i, sdyxc_i = np.empty(R), np.empty(R)
    group_backward(x, dyi, dyi, k, C, weight, mean, rstd, sdy_i, sdyxc_i, n_threads)
    assert np.array_equal(dyi, dx)
    assert np.array_equal(sdy_i, sdy) and np.array_equal(sdyxc_i, sdyxc)


def _group_outputs(x, dy, k, C, weight, bias, n_threads):
    """y, mean, m2, rstd of group_forward and sdy, sdyxc, dx of group_backward."""
    R = x.shape[0]
    G = R // k
    y = np.empty_like(x)
    mean, m2, rstd = np.empty(G), np.empty(G), np.empty(G)
    group_forward(x, y, k, C, weight, bias, EPS, mean, m2, rstd, n_threads)
    dx = np.empty_like(x)
    sdy, sdyxc = np.empty(R), np.empty(R)
    group_backward(x, dy, dx, k, C, weight, mean, rstd, sdy, sdyxc, n_threads)
    return {"y": y, "mean": mean, "m2": m2, "rstd": rstd, "sdy": sdy, "sdyxc": sdyxc, "dx": dx}


# (R, L, k, C) over PARALLEL_MIN with few groups: split with 2 and 3 threads. L is not a
# multiple of 16; groups span several blocks, blocks cross rows when k > 1.
SPLIT_CASES = [(4, 20001, 2, 4), (4, 16411, 1, 2), (2, 40003, 2, 1), (2, 32771, 1, 2), (6, 11111, 3, 2)]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_fused_and_split_same_bits(dtype, case):
    """n_threads=1 (fused) and 2, 3 (split) give identical outputs."""
    R, L, k, C = case
    assert not is_split(R, L, k, 1) and is_split(R, L, k, 2) and is_split(R, L, k, 3)
    rng = np.random.default_rng(15)
    x = make(rng, (R, L), dtype, loc=7.0, spread=3.0)
    dy = make(rng, (R, L), dtype)
    weight, bias = group_params(rng, C)
    ref = _group_outputs(x, dy, k, C, weight, bias, 1)
    for n in (2, 3):
        got = _group_outputs(x, dy, k, C, weight, bias, n)
        for name in ref:
            assert np.array_equal(got[name], ref[name]), f"{name}: fused and split ({n} threads) differ"


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("case", [(4, 20001, 2, 4), (4, 16411, 1, 2), (6, 10, 2, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_constant(dtype, case, n_threads):
    """A constant group (1.5e7: x - mean must be exact) has m2 == 0, mean == the value, and
    normalises to exactly its bias (in the array type)."""
    R, L, k, C = case
    rng = np.random.default_rng(16)
    x = make(rng, (R, L), dtype, loc=1.5e7, spread=3.0)
    x[k:2 * k] = dtype(1.5e7)  # group 1
    weight, bias = group_params(rng, C)
    G = R // k
    y = np.full_like(x, np.nan)
    mean, m2, rstd = np.empty(G), np.empty(G), np.empty(G)
    group_forward(x, y, k, C, weight, bias, EPS, mean, m2, rstd, n_threads)
    assert mean[1] == 1.5e7 and m2[1] == 0.0 and rstd[1] == 1.0 / np.sqrt(EPS)
    want = np.repeat(bias[rows_of(R, C)[k:2 * k]].astype(dtype)[:, None], L, axis=1)
    assert np.array_equal(y[k:2 * k], want)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("case", [(4, 20001, 2, 4), (4, 16411, 1, 2), (6, 10, 2, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_nan_confined(dtype, case, n_threads):
    """NaN in group 1: its statistics, y, sum(dy * (x - mean)) and dx are NaN; every other
    group's outputs are the bits of the same input without the NaN."""
    R, L, k, C = case
    rng = np.random.default_rng(17)
    x = make(rng, (R, L), dtype, loc=2.0, spread=3.0)
    dy = make(rng, (R, L), dtype)
    weight, bias = group_params(rng, C)
    xn = x.copy()
    xn[k, L // 2] = np.nan
    clean = _group_outputs(x, dy, k, C, weight, bias, n_threads)
    with np.errstate(invalid="ignore"):
        got = _group_outputs(xn, dy, k, C, weight, bias, n_threads)
    rows = np.arange(k, 2 * k)
    other_rows = np.setdiff1d(np.arange(R), rows)
    other_groups = np.setdiff1d(np.arange(R // k), [1])
    for name in ("mean", "m2", "rstd"):
        assert np.isnan(got[name][1]), name
        assert np.array_equal(got[name][other_groups], clean[name][other_groups]), name
    for name in ("y", "dx", "sdyxc"):
        assert np.all(np.isnan(got[name][rows])), name
        assert np.array_equal(got[name][other_rows], clean[name][other_rows]), name
    assert np.all(np.isfinite(got["y"][other_rows])) and np.all(np.isfinite(got["dx"][other_rows]))
    assert np.array_equal(got["sdy"], clean["sdy"])  # sum(dy) does not involve x


# ---------------------------------------------------------------------- channel_forward

# (R, L, C), R = N * C: one row (N = C = 1); one value; L = 1 with C = R (N = 1) and with
# N = 3; L not a multiple of 16; C = 1; R = STACK_ROWS (the last on the stack) and one past
# it (malloc, C = R); exactly one block, one past it (C = 1), several blocks with a tail;
# and inputs over PARALLEL_MIN (threaded with n_threads=3): blocks, many short rows (malloc,
# N = 5000), C = R > STACK_ROWS, C = 1 with long rows, and malloc with blocks together.
CHANNEL_CASES = [
    (1, 10, 1),
    (1, 1, 1),
    (7, 1, 7),
    (6, 1, 2),
    (6, 13, 3),
    (8, 17, 1),
    (12, 33, 4),
    (STACK_ROWS, 5, 8),
    (STACK_ROWS + 1, 5, STACK_ROWS + 1),
    (258, 7, 3),
    (2, BLOCK, 2),
    (2, BLOCK + 1, 1),
    (4, 3 * BLOCK + 5, 2),
    (6, 3 * BLOCK + 5, 3),
    (3000, 3, 10),
    (30000, 3, 6),
    (300, 301, 300),
    (2, 40003, 1),
    (260, BLOCK + 4, 4),
]
STATS = [True, False]
STATS_IDS = ["batch", "given"]


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def given_stats(rng, C, loc):
    """A given mean and variance per channel; the last channel's variance is negative (the
    kernel clamps it at 0) when there are several."""
    mean = loc + rng.standard_normal(C)
    var = rng.uniform(0.5, 2.0, C)
    if C > 1:
        var[-1] = -0.25
    return mean, var


def _channel_run(x, y, C, weight, bias, given, n_threads):
    """channel_forward on x into y; (mean, m2, rstd) fresh arrays, NaN-filled where they are
    outputs, copies of `given` where they are inputs."""
    if given is None:
        mean, m2 = np.full(C, np.nan), np.full(C, np.nan)
    else:
        mean, m2 = given[0].copy(), given[1].copy()
    rstd = np.full(C, np.nan)
    channel_forward(x, y, C, weight, bias, EPS, mean, m2, rstd, given is None, n_threads)
    return mean, m2, rstd


@pytest.mark.parametrize("batch_stats", STATS, ids=STATS_IDS)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_forward(dtype, case, n_threads, batch_stats):
    R, L, C = case
    rng = np.random.default_rng(18)
    x = make(rng, (R, L), dtype, loc=4.0, spread=2.0)
    weight, bias = group_params(rng, C)
    given = None if batch_stats else given_stats(rng, C, 4.0)
    want_mean, want_m2, want_rstd, want, mag, terms = np_channel_forward(x, C, weight, bias, EPS, given)
    y = np.full_like(x, np.nan)
    mean, m2, rstd = _channel_run(x, y, C, weight, bias, given, n_threads)
    assert y.dtype == dtype
    if batch_stats:
        xc = np.abs(f64(x)).reshape(R // C, C, L).transpose(1, 0, 2).reshape(C, -1)
        assert_within(mean, want_mean, xc.max(1), RTOL_SUM, "mean")
        assert_within(m2, want_m2, want_m2, RTOL_SUM, "M2")
        scale = own_stats_scale(dtype, mag, terms)
    else:
        # The given mean and variance are inputs: left as they were.
        assert same_bits(mean, given[0]) and same_bits(m2, given[1])
        scale = mag
    assert_within(rstd, want_rstd, want_rstd, RTOL_SUM, "rstd")
    assert_within(y, want, scale, RTOL_OUT[dtype], "y")
    # In place (y is x): the same bits.
    xi = x.copy()
    out_i = _channel_run(xi, xi, C, weight, bias, given, n_threads)
    assert same_bits(xi, y), "y in place"
    assert all(same_bits(a, b) for a, b in zip(out_i, (mean, m2, rstd))), "statistics in place"


# Channel 1 of these (R, L, C) is made constant or given a NaN: few rows, N = 1, more than
# STACK_ROWS rows, rows of several blocks over PARALLEL_MIN, C = R over PARALLEL_MIN.
CHANNEL_SPECIAL_CASES = [(6, 10, 3), (2, 5, 2), (258, 7, 3), (6, 3 * BLOCK + 5, 3), (300, 301, 300)]


@pytest.mark.parametrize("batch_stats", STATS, ids=STATS_IDS)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("case", CHANNEL_SPECIAL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_constant(dtype, case, n_threads, batch_stats):
    """A constant channel (1.5e7: x - mean must be exact) has mean == the value, m2 == 0 and
    rstd == 1 / sqrt(eps), and normalises to exactly its bias (in the array type); with given
    statistics (mean 1.5e7, var 0) as well."""
    R, L, C = case
    rng = np.random.default_rng(19)
    x = make(rng, (R, L), dtype, loc=1.5e7, spread=3.0)
    x[1::C] = dtype(1.5e7)  # channel 1
    weight, bias = group_params(rng, C)
    given = None
    if not batch_stats:
        given = given_stats(rng, C, 1.5e7)
        given[0][1], given[1][1] = 1.5e7, 0.0
    y = np.full_like(x, np.nan)
    mean, m2, rstd = _channel_run(x, y, C, weight, bias, given, n_threads)
    assert mean[1] == 1.5e7 and m2[1] == 0.0 and rstd[1] == 1.0 / np.sqrt(EPS)
    assert np.array_equal(y[1::C], np.full((R // C, L), bias[1], dtype))


def test_channel_constant_float64_inexact_value():
    """A constant float64 channel whose row means do not add up exactly (3 * 0.1 != 0.3): the
    per-channel merge is Chan's, so equal row means merge with delta = 0 and the channel
    normalises to exactly its bias."""
    x = np.full((3, 4), 0.1)
    y = np.full_like(x, np.nan)
    mean, m2, rstd = _channel_run(x, y, 1, np.ones(1), np.zeros(1), None, 1)
    assert (mean[0], m2[0]) == (0.1, 0.0) and np.array_equal(y, np.zeros_like(x))


@pytest.mark.parametrize("where", ["x-batch", "x-given", "var-given"])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("case", CHANNEL_SPECIAL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_nan_confined(dtype, case, n_threads, where):
    """A NaN in channel 1. In x with batch statistics: channel 1's mean, m2, rstd and every y
    of its rows are NaN. In x with given statistics: only that element of y. In the given
    variance: channel 1's rstd and y. Everything else has the bits of the input without it."""
    R, L, C = case
    rng = np.random.default_rng(20)
    x = make(rng, (R, L), dtype, loc=2.0, spread=3.0)
    weight, bias = group_params(rng, C)
    given = None if where == "x-batch" else given_stats(rng, C, 2.0)
    xn = x.copy()
    given_n = None if given is None else (given[0].copy(), given[1].copy())
    row, col = R - C + 1, L // 2  # channel 1 of the last n
    if where == "var-given":
        given_n[1][1] = np.nan
    else:
        xn[row, col] = np.nan
    y_clean = np.empty_like(x)
    clean = _channel_run(x, y_clean, C, weight, bias, given, n_threads)
    y = np.empty_like(x)
    with np.errstate(invalid="ignore"):
        got = _channel_run(xn, y, C, weight, bias, given_n, n_threads)
    bad_stats = {"x-batch": (0, 1, 2), "x-given": (), "var-given": (1, 2)}[where]  # mean, m2, rstd
    others = np.arange(C) != 1
    for i, name in enumerate(("mean", "m2", "rstd")):
        if i in bad_stats:
            assert np.isnan(got[i][1]), name
            assert same_bits(got[i][others], clean[i][others]), name
        else:
            assert same_bits(got[i], clean[i] if given_n is None or i == 2 else given_n[i]), name
    nan_y = np.zeros(x.shape, bool)
    if where == "x-given":
        nan_y[row, col] = True
    else:
        nan_y[1::C] = True
    assert np.all(np.isnan(y[nan_y]))
    assert same_bits(y[~nan_y], y_clean[~nan_y])
    assert np.all(np.isfinite(y[~nan_y]))


# ---------------------------------------------------------------------- channel_backward

def np_channel_backward(x, dy, C, weight, mean, rstd):
    """BatchNorm's backward with batch statistics, as np_group_backward on each channel's
    N * L values: (dx, its magnitude, dbias, dweight, their magnitudes)."""
    R, L = x.shape
    N = R // C

    def by_channel(a):
        return f64(a).reshape(N, C, L).transpose(1, 0, 2).reshape(C, N * L)

    def by_row(a):
        return a.reshape(C, N, L).transpose(1, 0, 2).reshape(R, L)

    dx, mag, sdy, sdyxc, sdy_mag, sdyxc_mag = np_group_backward(by_channel(x), by_channel(dy), 1, C, weight, mean,
                                                                rstd)
    return by_row(dx), by_row(mag), sdy, sdyxc * rstd, sdy_mag, sdyxc_mag * rstd


# (R, L, C): the forward's cases, every tail length of the short-row path (L % 16) with
# channels of several blocks of rows (N * L > BLOCK), the longest short row and the shortest
# long one, and a dwsep-sized input over PARALLEL_MIN (threaded with n_threads=3).
CHANNEL_BACKWARD_CASES = CHANNEL_CASES + [
    (2 * (BLOCK // L + 3), L, 2) for L in (2, 4, 5, 7, 8, 9, 12, 15, 16, 17, 31, 36, 49)] + [
    (6, SHORT_ROW - 1, 3), (6, SHORT_ROW, 3), (16 * 128, 36, 128)]


def _channel_backward_inputs(case, dtype, seed, loc=4.0, spread=2.0):
    """x, dy [R, L], weight and the forward's batch mean and rstd for a channel_backward test."""
    R, L, C = case
    rng = np.random.default_rng(seed)
    x = make(rng, (R, L), dtype, loc=loc, spread=spread)
    dy = make(rng, (R, L), dtype)
    weight, _ = group_params(rng, C)
    mean, _, rstd = np_channel_forward(x, C, weight, np.zeros(C), EPS)[:3]
    return x, dy, weight, mean, rstd


def _channel_backward_run(x, dy, C, weight, mean, rstd, batch_stats, n_threads, dx=None):
    dx = np.full_like(x, np.nan) if dx is None else dx
    dweight, dbias = np.full(C, np.nan), np.full(C, np.nan)
    channel_backward(x, dy, dx, C, weight, mean, rstd, batch_stats, dweight, dbias, n_threads)
    return dx, dweight, dbias


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("case", CHANNEL_BACKWARD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_backward(dtype, case, n_threads):
    R, L, C = case
    x, dy, weight, mean, rstd = _channel_backward_inputs(case, dtype, 21)
    want, mag, want_db, want_dw, db_mag, dw_mag = np_channel_backward(x, dy, C, weight, mean, rstd)
    dx, dweight, dbias = _channel_backward_run(x, dy, C, weight, mean, rstd, True, n_threads)
    assert dx.dtype == dtype
    assert_within(dbias, want_db, db_mag, RTOL_SUM, "dbias")
    assert_within(dweight, want_dw, dw_mag, RTOL_SUM, "dweight")
    assert_within(dx, want, mag, RTOL_OUT[dtype], "dx")
    # dx may be dy itself; another thread count: the same bits
    dyi = dy.copy()
    in_place = _channel_backward_run(x, dyi, C, weight, mean, rstd, True, n_threads, dx=dyi)
    assert all(same_bits(a, b) for a, b in zip(in_place, (dx, dweight, dbias))), "in place"
    other = _channel_backward_run(x, dy, C, weight, mean, rstd, True, 2)
    assert all(same_bits(a, b) for a, b in zip(other, (dx, dweight, dbias))), "2 threads"


# (R, L, C) over PARALLEL_MIN with short rows and fewer than FUSED_MIN_CHANNELS channels per
# thread at 2 and 3 threads (separate passes) but fused at 1; tails of 1 and 4.
FUSED_SPLIT_CASES = [(3 * 1500, 49, 3), (6 * 400, 36, 6), (5 * 2000, 16, 5)]


@pytest.mark.parametrize("batch_stats", STATS, ids=STATS_IDS)
@pytest.mark.parametrize("case", FUSED_SPLIT_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_backward_fused_and_split_same_bits(dtype, case, batch_stats):
    R, L, C = case
    assert R * L >= PARALLEL_MIN and L < SHORT_ROW and C < FUSED_MIN_CHANNELS * 2
    x, dy, weight, mean, rstd = _channel_backward_inputs(case, dtype, 24)
    fused = _channel_backward_run(x, dy, C, weight, mean, rstd, batch_stats, 1)
    for n_threads in (2, 3):
        split = _channel_backward_run(x, dy, C, weight, mean, rstd, batch_stats, n_threads)
        assert all(same_bits(a, b) for a, b in zip(split, fused)), f"{n_threads} threads"


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("case", CHANNEL_SPECIAL_CASES + [(2 * 300, 36, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_backward_given_stats(dtype, case, n_threads):
    """With given statistics dx = rstd * weight * dy, in float64 rounded once, reading neither
    x nor the mean (a NaN in x or an infinite mean reaches no dx); the parameter gradients
    are the sums centered on the given mean."""
    R, L, C = case
    rng = np.random.default_rng(22)
    x = make(rng, (R, L), dtype, loc=4.0, spread=2.0)
    dy = make(rng, (R, L), dtype)
    weight, _ = group_params(rng, C)
    mean, var = given_stats(rng, C, 4.0)
    rstd = 1.0 / np.sqrt(np.maximum(var, 0.0) + EPS)
    dx, dweight, dbias = _channel_backward_run(x, dy, C, weight, mean, rstd, False, n_threads)
    c = rows_of(R, C)
    assert same_bits(dx, ((rstd * weight)[c][:, None] * f64(dy)).astype(dtype))
    _, _, want_db, want_dw, db_mag, dw_mag = np_channel_backward(x, dy, C, weight, mean, rstd)
    assert_within(dbias, want_db, db_mag, RTOL_SUM, "dbias")
    assert_within(dweight, want_dw, dw_mag, RTOL_SUM, "dweight")
    xn, mean_inf = x.copy(), mean.copy()
    xn[1, L // 2] = np.nan
    mean_inf[0] = np.inf
    with np.errstate(invalid="ignore"):
        dx_n = _channel_backward_run(xn, dy, C, weight, mean_inf, rstd, False, n_threads)[0]
    assert same_bits(dx_n, dx)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("case", CHANNEL_SPECIAL_CASES + [(2 * 300, 36, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_backward_nan_confined(dtype, case, n_threads):
    """A NaN in x of channel 1 (batch statistics): channel 1's dx and dweight are NaN; every
    other output has the bits of the input without it."""
    R, L, C = case
    x, dy, weight, mean, rstd = _channel_backward_inputs(case, dtype, 23, loc=2.0, spread=3.0)
    clean = _channel_backward_run(x, dy, C, weight, mean, rstd, True, n_threads)
    xn = x.copy()
    xn[R - C + 1, L // 2] = np.nan
    mean_n = mean.copy()
    mean_n[1] = np.nan  # what the forward of xn gives channel 1
    with np.errstate(invalid="ignore"):
        dx, dweight, dbias = _channel_backward_run(xn, dy, C, weight, mean_n, rstd, True, n_threads)
    rows = rows_of(R, C) == 1
    assert np.all(np.isnan(dx[rows])) and np.isnan(dweight[1])
    assert same_bits(dx[~rows], clean[0][~rows]) and same_bits(dbias, clean[2])
    others = np.arange(C) != 1
    assert same_bits(dweight[others], clean[1][others])


@pytest.mark.parametrize("case", [(0, 5, 3), (6, 0, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_backward_empty(dtype, case):
    """R == 0 or L == 0: zero parameter gradients, no dx to write."""
    R, L, C = case
    x = np.ones((R, L), dtype)
    dx, dweight, dbias = _channel_backward_run(x, x, C, np.ones(C), np.zeros(C), np.ones(C), True, 3)
    assert np.array_equal(dweight, np.zeros(C)) and np.array_equal(dbias, np.zeros(C))


@pytest.mark.parametrize("batch_stats", STATS, ids=STATS_IDS)
@pytest.mark.parametrize("case", [(0, 5, 3), (6, 0, 3), (0, 0, 1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_forward_empty(dtype, case, batch_stats):
    """R == 0 or L == 0: nothing raised, nothing written."""
    R, L, C = case
    x = np.ones((R, L), dtype)
    y = np.ones((R, L), dtype)
    arrays = [np.full(C, 7.0 + i) for i in range(5)]  # weight, bias, mean, m2, rstd
    before = [a.copy() for a in arrays]
    weight, bias, mean, m2, rstd = arrays
    channel_forward(x, y, C, weight, bias, EPS, mean, m2, rstd, batch_stats, 3)
    assert all(same_bits(a, b) for a, b in zip(arrays, before))


# ------------------------------------------------------------------------------ combine

# (outer, k, inner): BatchNorm (1, N, C), InstanceNorm (N*C, 1, 1), GroupNorm (N*G, C/G, 1),
# and a general one.
GROUPINGS = [(1, 4, 3), (6, 1, 1), (4, 3, 1), (2, 5, 3), (1, 1, 1)]


@pytest.mark.parametrize("count", [1, 2, 7, 100])
@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_merge_moments(grouping, count):
    """toolkit.merge_moments (the engine's combine) of row moments gives the moments of the
    whole group's data, for every grouping: group (o, i) is the union of its k rows (o, j, i)."""
    outer, k, inner = grouping
    rng = np.random.default_rng(9)
    data = 10.0 + rng.standard_normal((outer, k, inner, count)) * rng.uniform(0.5, 2, (1, k, 1, 1))
    row_mean, row_m2 = (a.reshape(outer, k, inner) for a in np_row_moments(data.reshape(-1, count)))
    mean, m2 = np.empty((outer, inner)), np.empty((outer, inner))
    for o in range(outer):
        n, mean[o], m2[o] = nc.toolkit.merge_moments(np.full(k, float(count)), row_mean[o], row_m2[o])
        assert n == k * count
    want_mean, want_m2 = np_row_moments(data.transpose(0, 2, 1, 3).reshape(outer * inner, k * count))
    assert_within(mean.ravel(), want_mean, np.abs(data).max(axis=(1, 3)).ravel(), RTOL_SUM, "group mean")
    assert_within(m2.ravel(), want_m2, want_m2, RTOL_SUM, "group M2")


@pytest.mark.parametrize("case", ["no parts", "counts 2-D", "means rows", "m2s shape", "means 3-D",
                                  "negative count", "nan count"])
def test_merge_moments_refuses_bad_input(case):
    c, m = np.ones(3), np.zeros((3, 2))
    args = {"no parts": (np.ones(0), np.zeros((0, 2)), np.zeros((0, 2))),
            "counts 2-D": (np.ones((3, 1)), m, m), "means rows": (c, np.zeros((2, 2)), np.zeros((2, 2))),
            "m2s shape": (c, m, np.zeros((3, 3))), "means 3-D": (c, np.zeros((3, 2, 1)), np.zeros((3, 2, 1))),
            "negative count": (np.array([1.0, -1.0, 2.0]), m, m),
            "nan count": (np.array([1.0, np.nan, 2.0]), m, m)}[case]
    with pytest.raises(ValueError):
        nc.toolkit.merge_moments(*args)


# -------------------------------------------------------------------------- empty input

@pytest.mark.parametrize("dtype", DTYPES)
def test_no_rows(dtype):
    """R = 0: nothing to do, nothing raised; layer_backward gives zero column sums."""
    x = np.empty((0, 5), dtype)
    e = np.empty(0)
    row_moments(x, e, e)
    row_grad_sums(x, x, e, 1, e, e)
    apply_rows(x, x.copy(), e, e, e, 1)
    w = np.ones(5, dtype)
    layer_forward(x, x.copy(), w, w, EPS, e, e)
    layer_forward(x, x.copy(), None, None, EPS, e, e)
    dw, db = np.full(5, np.nan), np.full(5, np.nan)
    layer_backward(x, x, x.copy(), w, e, e, dw, db)
    assert np.array_equal(dw, np.zeros(5)) and np.array_equal(db, np.zeros(5))
    layer_backward(x, x, x.copy(), None, e, e, None, None)
    c = np.ones(2)
    group_forward(x, x.copy(), 1, 2, c, c, EPS, e, e, e)
    group_forward(x, x.copy(), 3, 2, c, c, EPS, e, e, e)
    group_backward(x, x, x.copy(), 3, 2, c, e, e, e, e)


# ---------------------------------------------------------------------- invalid arguments

def _invalid_calls():
    x = np.ones((6, 5))
    dy = np.ones((6, 5))
    r6, r5, r3, r4, r2 = np.ones(6), np.ones(5), np.ones(3), np.ones(4), np.ones(2)
    c5, e0 = np.ones(5), np.ones(0)
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
        "layer_forward: y shape": lambda: layer_forward(x, np.empty((6, 4)), c5, c5, EPS, r6, r6),
        "layer_forward: y rows": lambda: layer_forward(x, np.empty((5, 5)), c5, c5, EPS, r6, r6),
        "layer_forward: mean length": lambda: layer_forward(x, y, c5, c5, EPS, r5, r6),
        "layer_forward: rstd length": lambda: layer_forward(x, y, c5, c5, EPS, r6, np.ones(7)),
        "layer_forward: weight length": lambda: layer_forward(x, y, r6, c5, EPS, r6, r6),
        "layer_forward: bias length": lambda: layer_forward(x, y, c5, r6, EPS, r6, r6),
        "layer_forward: bias without weight": lambda: layer_forward(x, y, None, c5, EPS, r6, r6),
        "layer_forward: L == 0": lambda: layer_forward(np.ones((2, 0)), np.ones((2, 0)), None, None, EPS, r2, r2),
        "layer_forward: y dtype": lambda: layer_forward(x, np.empty((6, 5), np.float32), c5, c5, EPS, r6, r6),
        "layer_forward: weight dtype": lambda: layer_forward(
            np.ones((6, 5), np.float32), np.empty((6, 5), np.float32), c5, None, EPS, r6, r6),
        "layer_backward: dy shape": lambda: layer_backward(x, np.ones((6, 4)), y, c5, r6, r6, c5, c5),
        "layer_backward: dx shape": lambda: layer_backward(x, dy, np.empty((5, 5)), c5, r6, r6, c5, c5),
        "layer_backward: weight length": lambda: layer_backward(x, dy, y, r6, r6, r6, c5, c5),
        "layer_backward: mean length": lambda: layer_backward(x, dy, y, c5, r5, r6, c5, c5),
        "layer_backward: rstd length": lambda: layer_backward(x, dy, y, c5, r6, r5, c5, c5),
        "layer_backward: dweight length": lambda: layer_backward(x, dy, y, c5, r6, r6, r6, c5),
        "layer_backward: dbias length": lambda: layer_backward(x, dy, y, c5, r6, r6, c5, r6),
        "layer_backward: dweight without dbias": lambda: layer_backward(x, dy, y, c5, r6, r6, c5, None),
        "layer_backward: dbias without dweight": lambda: layer_backward(x, dy, y, c5, r6, r6, None, c5),
        "layer_backward: L == 0": lambda: layer_backward(
            np.ones((2, 0)), np.ones((2, 0)), np.ones((2, 0)), None, r2, r2, None, None),
        "group_forward: y shape": lambda: group_forward(x, np.empty((6, 4)), 2, 3, r3, r3, EPS, r3, r3, r3),
        "group_forward: k does not divide R": lambda: group_forward(x, y, 4, 3, r3, r3, EPS, r2, r2, r2),
        "group_forward: C does not divide R": lambda: group_forward(x, y, 2, 4, r4, r4, EPS, r3, r3, r3),
        "group_forward: k == 0": lambda: group_forward(x, y, 0, 3, r3, r3, EPS, r3, r3, r3),
        "group_forward: C == 0": lambda: group_forward(x, y, 2, 0, e0, e0, EPS, r3, r3, r3),
        "group_forward: weight length": lambda: group_forward(x, y, 2, 3, r2, r3, EPS, r3, r3, r3),
        "group_forward: bias length": lambda: group_forward(x, y, 2, 3, r3, r4, EPS, r3, r3, r3),
        "group_forward: mean length": lambda: group_forward(x, y, 2, 3, r3, r3, EPS, r6, r3, r3),
        "group_forward: m2 length": lambda: group_forward(x, y, 2, 3, r3, r3, EPS, r3, r2, r3),
        "group_forward: rstd length": lambda: group_forward(x, y, 2, 3, r3, r3, EPS, r3, r3, r4),
        "group_forward: L == 0": lambda: group_forward(
            np.ones((2, 0)), np.ones((2, 0)), 1, 1, np.ones(1), np.ones(1), EPS, r2, r2, r2),
        "group_backward: dy shape": lambda: group_backward(x, np.ones((6, 4)), y, 2, 3, r3, r3, r3, r6, r6),
        "group_backward: dx shape": lambda: group_backward(x, dy, np.empty((3, 5)), 2, 3, r3, r3, r3, r6, r6),
        "group_backward: k does not divide R": lambda: group_backward(x, dy, y, 4, 3, r3, r2, r2, r6, r6),
        "group_backward: C does not divide R": lambda: group_backward(x, dy, y, 2, 4, r4, r3, r3, r6, r6),
        "group_backward: weight length": lambda: group_backward(x, dy, y, 2, 3, r2, r3, r3, r6, r6),
        "group_backward: mean length": lambda: group_backward(x, dy, y, 2, 3, r3, r2, r3, r6, r6),
        "group_backward: rstd length": lambda: group_backward(x, dy, y, 2, 3, r3, r3, r4, r6, r6),
        "group_backward: sdy length": lambda: group_backward(x, dy, y, 2, 3, r3, r3, r3, r3, r6),
        "group_backward: sdyxc length": lambda: group_backward(x, dy, y, 2, 3, r3, r3, r3, r6, r5),
        "channel_forward: C does not divide R": lambda: channel_forward(x, y, 4, r4, r4, EPS, r4, r4, r4, True),
        "channel_forward: C == 0": lambda: channel_forward(x, y, 0, e0, e0, EPS, e0, e0, e0, True),
        "channel_forward: C < 0": lambda: channel_forward(x, y, -3, r3, r3, EPS, r3, r3, r3, True),
        "channel_forward: given, C does not divide R": lambda: channel_forward(
            x, y, 4, r4, r4, EPS, r4, r4, r4, False),
        "channel_forward: y columns": lambda: channel_forward(x, np.empty((6, 4)), 3, r3, r3, EPS, r3, r3, r3, True),
        "channel_forward: y rows": lambda: channel_forward(x, np.empty((5, 5)), 3, r3, r3, EPS, r3, r3, r3, True),
        "channel_forward: y dtype": lambda: channel_forward(
            x, np.empty((6, 5), np.float32), 3, r3, r3, EPS, r3, r3, r3, True),
        "channel_forward: x not C-contiguous": lambda: channel_forward(
            np.ones((6, 10))[:, ::2], y, 3, r3, r3, EPS, r3, r3, r3, True),
        "channel_forward: weight length": lambda: channel_forward(x, y, 3, r2, r3, EPS, r3, r3, r3, True),
        "channel_forward: bias length": lambda: channel_forward(x, y, 3, r3, r4, EPS, r3, r3, r3, True),
        "channel_forward: mean length": lambda: channel_forward(x, y, 3, r3, r3, EPS, r6, r3, r3, True),
        "channel_forward: m2 length": lambda: channel_forward(x, y, 3, r3, r3, EPS, r3, r2, r3, True),
        "channel_forward: rstd length": lambda: channel_forward(x, y, 3, r3, r3, EPS, r3, r3, r4, True),
        "channel_forward: given mean length": lambda: channel_forward(x, y, 3, r3, r3, EPS, r2, r3, r3, False),
        "channel_forward: given var length": lambda: channel_forward(x, y, 3, r3, r3, EPS, r3, r4, r3, False),
        "channel_forward: weight dtype": lambda: channel_forward(
            x, y, 3, r3.astype(np.float32), r3, EPS, r3, r3, r3, True),
        "channel_forward: L == 0, C does not divide R": lambda: channel_forward(
            np.ones((6, 0)), np.ones((6, 0)), 4, r4, r4, EPS, r4, r4, r4, True),
        "channel_forward: R == 0, rstd length": lambda: channel_forward(
            np.ones((0, 5)), np.ones((0, 5)), 3, r3, r3, EPS, r3, r3, r2, True),
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
    assert any(R >= 128 for R, L in LAYER_SHAPES)
    assert any(R > MAX_CHUNKS * ROW_CHUNK and math.ceil(R / MAX_CHUNKS) > ROW_CHUNK for R, L in LAYER_SHAPES)
    assert any(L == 1 for R, L in LAYER_SHAPES) and any(L > BLOCK for R, L in LAYER_SHAPES)
    assert any(k == 1 for R, L, k, C in GROUP_CASES) and any(k > 1 and C != k for R, L, k, C in GROUP_CASES)
    assert any(L % LANES and L > BLOCK for R, L, k, C in GROUP_CASES)
    assert any(k * L > BLOCK and L < BLOCK for R, L, k, C in GROUP_CASES)
    for n in GROUP_THREADS[1:]:
        assert any(is_split(R, L, k, n) for R, L, k, C in GROUP_CASES)
        assert any(R * L >= PARALLEL_MIN and not is_split(R, L, k, n) for R, L, k, C in GROUP_CASES)
    assert all(R % k == 0 and R % C == 0 for R, L, k, C in GROUP_CASES + SPLIT_CASES)
    assert all(R % C == 0 for R, L, C in CHANNEL_CASES + CHANNEL_SPECIAL_CASES)
    assert any(R == STACK_ROWS for R, L, C in CHANNEL_CASES) and any(R == STACK_ROWS + 1 for R, L, C in CHANNEL_CASES)
    assert any(L == 1 for R, L, C in CHANNEL_CASES) and any(L % LANES and L > LANES for R, L, C in CHANNEL_CASES)
    assert any(R == C for R, L, C in CHANNEL_CASES) and any(C == 1 and R > 1 for R, L, C in CHANNEL_CASES)
    for cases in (CHANNEL_CASES, CHANNEL_SPECIAL_CASES):
        assert any(R * L >= PARALLEL_MIN and R > STACK_ROWS for R, L, C in cases)
        assert any(R * L >= PARALLEL_MIN and L > BLOCK for R, L, C in cases)
    assert any(R > STACK_ROWS and L > BLOCK and R * L >= PARALLEL_MIN for R, L, C in CHANNEL_CASES)


# -- the engine's Plan: one call per forward and backward, the bits of the kernels it runs ----------
PLAN_CASES = [  # (N, C, L, k): k = 0 per channel (BatchNorm), else groups of k consecutive rows
    (2, 3, 16, 0), (4, 8, 49, 0), (3, 5, 1500, 0), (2, 3, 16, 1), (4, 6, 49, 2), (2, 4, 5000, 4), (1, 3, 7, 3),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, C, L, k", PLAN_CASES)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_plan_gives_the_bits_of_its_kernels(N, C, L, k, dtype, n_threads):
    rng = np.random.default_rng(N * 1000 + C * 10 + L + k)
    x = (rng.standard_normal((N * C, L)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal((N * C, L)).astype(dtype)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    G = C if k == 0 else N * C // k
    plan = Plan(N, C, L, 1, N, C, n_threads) if k == 0 else Plan(N, C, L, N * C // k, k, 1, n_threads)
    y, stats, w64 = plan.forward(x, w, b, 1e-5)
    assert w64.dtype == np.float64 and np.array_equal(w64, w) and not np.shares_memory(w64, w)
    assert stats.shape == (3, G) and y.dtype == x.dtype and y.shape == x.shape
    y_k, mean, m2, rstd = np.empty_like(x), np.empty(G), np.empty(G), np.empty(G)
    if k == 0:
        channel_forward(x, y_k, C, w, b, 1e-5, mean, m2, rstd, True, n_threads)
    else:
        group_forward(x, y_k, k, C, w, b, 1e-5, mean, m2, rstd, n_threads)
    np.testing.assert_array_equal(y, y_k)
    np.testing.assert_array_equal(stats, np.stack([mean, m2, rstd]))
    dx, grads = plan.backward(x, dy, stats[0], stats[2], w, True)
    dx_k = np.empty_like(x)
    if k == 0:
        dw_k, db_k = np.empty(C), np.empty(C)
        channel_backward(x, dy, dx_k, C, w, mean, rstd, True, dw_k, db_k, n_threads)
    else:
        sdy, sdyxc = np.empty(N * C), np.empty(N * C)
        group_backward(x, dy, dx_k, k, C, w, mean, rstd, sdy, sdyxc, n_threads)
        rows_rstd = np.repeat(rstd, k)
        db_k = sdy.reshape(N, C).sum(axis=0)
        dw_k = (sdyxc * rows_rstd).reshape(N, C).sum(axis=0)
    np.testing.assert_array_equal(dx, dx_k)
    np.testing.assert_allclose(grads, np.stack([dw_k, db_k]), rtol=1e-12, atol=1e-12)
    x64 = x.astype(np.float64).reshape(N, C, L)
    if k == 0:
        np.testing.assert_allclose(stats[0], x64.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_allclose(stats[0], x64.reshape(G, -1).mean(axis=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, C, L", [(2, 3, 16), (4, 8, 49), (3, 5, 1500), (64, 4, 300)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_plan_moments_grad_sums_and_given_sums_are_forward_and_backward_in_parts(N, C, L, dtype, channels_last,
                                                                                n_threads):
    """A per-channel plan's moments are its forward's statistics, and its backward from the
    gradient sums of grad_sums (over N * L values) is its backward, bit for bit: the pieces
    SyncBatchNorm runs around its collectives."""
    rng = np.random.default_rng(N + C + L)
    shape = (N, L, C) if channels_last else (N * C, L)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    plan = Plan(N, C, L, 1, N, C, n_threads, channels_last)
    y, stats, w64 = plan.forward(x, w, b, 1e-5)
    np.testing.assert_array_equal(plan.moments(x), stats[:2])
    dx, grads = plan.backward(x, dy, stats[0], stats[2], w64, True)
    sums = plan.grad_sums(x, dy, stats[0])
    assert sums.shape == (2, C)
    np.testing.assert_array_equal(sums[0], grads[1])
    d64, x64 = dy.astype(np.float64), x.astype(np.float64)
    axes = (0, 1) if channels_last else None
    if channels_last:
        want = np.stack([d64.sum(axes), (d64 * (x64 - stats[0])).sum(axes)])
    else:
        xr, dr = x64.reshape(N, C, L), d64.reshape(N, C, L)
        want = np.stack([dr.sum((0, 2)), (dr * (xr - stats[0][:, None])).sum((0, 2))])
    np.testing.assert_allclose(sums, want, rtol=1e-12, atol=1e-12 * np.abs(d64).sum())
    dx_given, grads_given = plan.backward(x, dy, stats[0], stats[2], w64, True, sums, float(N * L))
    np.testing.assert_array_equal(dx_given, dx)
    np.testing.assert_array_equal(grads_given, grads)


def test_moments_and_given_sums_take_a_per_channel_plan():
    plan = Plan(2, 4, 3, 4, 2, 1, 1)
    x = np.ones((8, 3))
    for call in (lambda: plan.moments(x), lambda: plan.grad_sums(x, x, np.zeros(4)),
                 lambda: plan.backward(x, x, np.zeros(4), np.ones(4), np.ones(4), True, np.zeros((2, 4)), 24.0)):
        with pytest.raises(ValueError, match="per-channel plan"):
            call()


def test_merge_in_order_is_chan_s_formula_in_order():
    """Against the float64 formula step by step; parts of count 0 skipped (an empty rank);
    equal means near the largest double merge without overflow."""
    rng = np.random.default_rng(9)
    counts = np.array([3.0, 0.0, 5.0, 1.0, 7.0])
    means, m2s = rng.standard_normal((5, 4)), rng.random((5, 4))
    means[1], m2s[1] = 1e300, 1e300  # an empty part's values are ignored
    count, mean, m2 = merge_in_order(counts, means, m2s)
    n, mu, q = 0.0, np.zeros(4), np.zeros(4)
    for nb, mb, qb in zip(counts, means, m2s):
        if nb == 0:
            continue
        if n == 0:
            n, mu, q = nb, mb.copy(), qb.copy()
            continue
        t = n + nb
        d = mb - mu
        mu, q, n = mu + d * (nb / t), q + qb + d * d * (n * nb / t), t
    assert count == counts.sum()
    np.testing.assert_array_equal(mean, mu)
    np.testing.assert_array_equal(m2, q)
    big = np.full((3, 2), 1e308)
    count, mean, m2 = merge_in_order(np.array([2.0, 2.0, 2.0]), big, np.zeros((3, 2)))
    assert count == 6 and np.all(mean == 1e308) and np.all(m2 == 0)
    count, mean, m2 = merge_in_order(np.zeros(2), np.zeros((2, 3)), np.zeros((2, 3)))
    assert count == 0 and not mean.any() and not m2.any()


@pytest.mark.parametrize("running_dtype", [np.float32, np.float64])
def test_plan_with_given_statistics_is_torch_s_rule(running_dtype):
    """rstd = 1 / sqrt(var + eps) from the given statistics (any float dtype, any stride); NaN
    where var + eps < 0 (never a finite scale); dx = weight * rstd * dy alone."""
    N, C, L = 2, 4, 10
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N * C, L)).astype(np.float32)
    dy = rng.standard_normal((N * C, L)).astype(np.float32)
    mean = np.array([0.5, -1.0, 2.0, 0.0, 9, 9, 9, 9], running_dtype)[::2]  # strided
    var = np.array([1.0, 0.25, -1.0, 0.0], running_dtype)
    w, b = np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(C)
    plan = Plan(N, C, L, 1, N, C, 1)
    eps = 1e-3
    y, stats, _ = plan.forward(x, w, b, eps, mean, var)
    y_swapped, stats_swapped, _ = plan.forward(x, w, b, eps, mean.astype(mean.dtype.newbyteorder()),
                                            var.astype(var.dtype.newbyteorder()))
    np.testing.assert_array_equal(y_swapped, y)
    np.testing.assert_array_equal(stats_swapped, stats)
    var_eps = var.astype(np.float64) + eps
    with np.errstate(divide="ignore"):
        expected_rstd = np.where(var_eps >= 0, 1 / np.sqrt(np.maximum(var_eps, 0)), np.nan)
    np.testing.assert_array_equal(stats[2], expected_rstd)
    xs = x.reshape(N, C, L).astype(np.float64)
    ref = (xs - mean.astype(np.float64)[:, None]) * (expected_rstd * w)[:, None]
    np.testing.assert_allclose(y.reshape(N, C, L)[:, [0, 1, 3]], ref[:, [0, 1, 3]], rtol=1e-6, atol=1e-6)
    assert np.isnan(y.reshape(N, C, L)[:, 2]).all()
    dx, grads = plan.backward(x, dy, stats[0], stats[2], w, False)
    np.testing.assert_allclose(dx.reshape(N, C, L)[:, [0, 1, 3]],
                               (dy.reshape(N, C, L) * (w * expected_rstd)[:, None])[:, [0, 1, 3]], rtol=1e-6)


@pytest.mark.parametrize("bad", [(0, 3, 4, 1, 0, 3, 1), (2, 3, 0, 1, 2, 3, 1), (2, 3, 4, 1, 3, 3, 1),
                                 (2, 4, 4, 2, 1, 4, 1), (2, 4, 4, 1, 8, 1, 1), (2, 3, 4, 1, 2, 3, 0)])
def test_plan_refuses_a_grouping_it_cannot_run(bad):
    with pytest.raises(ValueError, match="Plan"):
        Plan(*bad)


def test_a_group_plan_refuses_given_statistics():
    """Given statistics are per channel: a plan over groups of rows would ignore them."""
    plan = Plan(2, 4, 3, 4, 2, 1, 1)
    x = np.ones((8, 3))
    with pytest.raises(ValueError, match="per-channel plan"):
        plan.forward(x, np.ones(4), np.zeros(4), 1e-5, np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="per-channel plan"):
        plan.backward(x, x, np.zeros(4), np.ones(4), np.ones(4), False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_values_are_numpy_s_update_bit_for_bit(dtype):
    rng = np.random.default_rng(3)
    C, count, factor = 5, 37, 0.3
    rm = rng.standard_normal(2 * C).astype(dtype)[::2]
    rv = rng.random(C).astype(dtype) + 0.5
    mean, m2 = rng.standard_normal(C), rng.random(C) * 40
    new = running_values(rm, rv, mean, m2, factor, count)
    swapped = running_values(rm.astype(rm.dtype.newbyteorder()), rv.astype(rv.dtype.newbyteorder()), mean, m2,
                             factor, count)
    np.testing.assert_array_equal(swapped, new)
    expected_mean = (1.0 - factor) * rm.astype(np.float64) + factor * mean
    expected_var = (1.0 - factor) * rv.astype(np.float64) + factor * (m2 / (count - 1))
    np.testing.assert_array_equal(new, np.stack([expected_mean, expected_var]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_commit_running_writes_numpy_s_cast_or_nothing(dtype):
    """The usual buffers (strided ones too) get new cast as NumPy casts it and the count; any
    other kind, or a float32 cast that would overflow, is refused with nothing written."""
    rng = np.random.default_rng(4)
    C = 5
    new = np.stack([rng.standard_normal(C), rng.random(C) * 3])
    nbt, rm, rv = np.zeros((), np.int64), np.zeros(2 * C, dtype)[::2], np.ones(C, dtype)
    assert commit_running(nbt, 7, rm, rv, new)
    assert int(nbt) == 7
    np.testing.assert_array_equal(rm, new[0].astype(dtype))
    np.testing.assert_array_equal(rv, new[1].astype(dtype))

    def refused(nbt, rm, rv, new):
        before = [np.array(a, copy=True) for a in (nbt, rm, rv)]
        assert not commit_running(nbt, 9, rm, rv, new)
        for a, b in zip((nbt, rm, rv), before):
            np.testing.assert_array_equal(a, b)

    other = np.float64 if dtype == np.float32 else np.float32
    refused(nbt, rm, rv.astype(other), new)                               # two dtypes
    refused(nbt.astype(np.int32), rm, rv, new)                            # not int64
    refused(nbt, rm.astype(rm.dtype.newbyteorder()), rv, new)             # byte-swapped
    refused(nbt, rm[:-1], rv, new)                                        # C - 1 values
    frozen = rv.copy()
    frozen.setflags(write=False)
    refused(nbt, rm, frozen, new)                                         # read-only
    if dtype == np.float32:
        refused(nbt, rm, rv, np.stack([new[0], np.full(C, 1e39)]))        # the cast overflows
        assert commit_running(nbt, 9, rm, rv, np.stack([new[0], np.full(C, np.inf)]))  # inf casts to inf
        assert np.isinf(rv).all()
