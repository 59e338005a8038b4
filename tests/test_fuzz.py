"""Hypothesis differential tests: every layer against the float64 NumPy reference (tests/reference.py).

Each example builds a layer (SwitchableNorm through the registry) with drawn constructor options
and parameter dtype, sets random parameters (and sometimes running statistics) in place, and runs
a few steps: one or two in training, one in eval, sometimes one more in training. Every step draws
its own input shape (the channel count stays; size-1 dims, N = 1, C up to 300, rows longer than
the kernels' blocks), x's and dy's dtypes (float32 / float64, either one against the parameters'),
values (random offset and scale, ties, per-channel offsets) and memory layouts of x and of dy
(contiguous, strided, reversed, channels-last, permuted, Fortran order; read-only or not). It
checks y, dx, the parameter gradients, the running statistics (each update, and all of them
against the reference's own float64 copy kept over the steps) and num_batches_tracked against the
reference; that neither x nor dy (nor the memory around a strided view) is written, that the
forward changes only the buffers it updates and the backward nothing, and that a second backward
gives the same bits for the same dy. Inputs PyTorch refuses (one value per channel in BatchNorm
training, one spatial element in InstanceNorm training, unbiased variances of one value in
SwitchableNorm) must raise ValueError and change no state.

Tolerances. Every error is measured against the magnitude of the terms of the quantity's formula
(|weight * xhat| + |bias| for y, |dy * weight| * rstd for dx, sum |dy * xhat| for the weight
gradient, ...), not only against the expected value, so cancellation that no float64 code can
avoid does not fail a correct result:

    max |actual - expected| <= RTOL[dtype] * scale + COND_RTOL * cond * unit

RTOL is 1e-9 for float64 and 1e-5 for float32 (the results are normalized: a float32 layer keeps
about 1e-6 of max |y| whatever the offset). cond = max |x| * rstd is how much the centering
x - mean amplifies the rounding of x's magnitude (up to about 1e6 here: offset 1e3, scale 1e-3).
The second term, 1e-12 per unit of cond times the size of what multiplies xhat in the quantity
(|weight| for y, ...), is the float64 arithmetic's share of error that no implementation avoids;
it matters only for float64 at large offsets.
"""
import math

import numpy as np
import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

import normcore as nc
import reference as ref
from normcore.plugins import switchable

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
RTOL = {F32: 1e-5, F64: 1e-9}
COND_RTOL = 1e-12
MAX_ELEMS = 20_000
DTYPES = st.sampled_from([F32, F64])


def lower(*dtypes):
    """The less precise of the dtypes."""
    return F32 if F32 in dtypes else F64


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


# ------------------------------------------------------------------------------------------
# values and layouts
# ------------------------------------------------------------------------------------------

def draw_values(data, shape, dtype, label, dy=False):
    """A C-contiguous array of `shape` and `dtype`: offset + scale * noise, from a drawn seed."""
    seed = data.draw(st.integers(0, 2 ** 32 - 1), label=f"{label} seed")
    kind = data.draw(st.sampled_from(["normal", "uniform", "few_values", "per_channel"]), label=f"{label} kind")
    if dy:
        offset = data.draw(st.sampled_from([0.0, 0.0, 1.0, -3.0, 30.0]), label=f"{label} offset")
        scale = 10.0 ** data.draw(st.floats(-2, 2), label=f"{label} log10 scale")
    else:
        offset = data.draw(st.one_of(st.just(0.0), st.floats(-1e3, 1e3)), label=f"{label} offset")
        scale = 10.0 ** data.draw(st.floats(-3, 3), label=f"{label} log10 scale")
    rng = np.random.default_rng(seed)
    if kind == "normal":
        z = rng.standard_normal(shape)
    elif kind == "uniform":
        z = rng.uniform(-1.0, 1.0, shape)
    elif kind == "few_values":  # ties, and constant channels / rows when they are short
        z = rng.integers(-1, 2, shape).astype(np.float64)
    else:  # a different offset per channel (dim 1): LayerNorm / GroupNorm groups spanning them
        z = rng.standard_normal(shape)
        if len(shape) >= 2:
            z = z + 10.0 * rng.standard_normal((1, shape[1]) + (1,) * (len(shape) - 2))
    return np.ascontiguousarray((offset + scale * z).astype(dtype))


LAYOUTS = ["contiguous", "strided", "reversed", "channels_last", "permuted", "fortran"]


class Layout:
    """An array holding given values in a drawn memory layout, and a check that neither the
    array nor the memory around it was written."""

    def __init__(self, data, values, label):
        nd = values.ndim
        self.kind = data.draw(st.sampled_from(LAYOUTS), label=f"{label} layout")
        self.base = None
        if self.kind == "strided":
            axes = data.draw(st.sets(st.integers(0, nd - 1), min_size=1), label=f"{label} strided axes")
            start = data.draw(st.integers(0, 1), label=f"{label} strided start")
            big_shape = [2 * d + 1 if i in axes else d for i, d in enumerate(values.shape)]
            self.base = np.full(big_shape, np.nan, values.dtype)  # the gaps: NaN, must stay NaN
            index = tuple(slice(start, start + 2 * d, 2) if i in axes else slice(None)
                          for i, d in enumerate(values.shape))
            self.base[index] = values
            arr = self.base[index]
        elif self.kind == "reversed":
            axes = tuple(sorted(data.draw(st.sets(st.integers(0, nd - 1), min_size=1), label=f"{label} flipped")))
            arr = np.flip(np.ascontiguousarray(np.flip(values, axes)), axes)
        elif self.kind == "channels_last" and nd >= 3:
            arr = np.moveaxis(np.ascontiguousarray(np.moveaxis(values, 1, -1)), -1, 1)
        elif self.kind == "permuted":
            perm = data.draw(st.permutations(range(nd)), label=f"{label} storage order")
            arr = np.ascontiguousarray(values.transpose(perm)).transpose(np.argsort(perm))
        elif self.kind == "fortran":
            arr = np.asfortranarray(values)
        else:
            self.kind = "contiguous"  # (channels-last needs 3 or more dims)
            arr = values.copy()
        if data.draw(st.booleans(), label=f"{label} read-only"):
            arr.flags.writeable = False
        event(f"{label} layout: {self.kind}{'' if arr.flags.writeable else ', read-only'}")
        assert np.array_equal(arr, values) and arr.dtype == values.dtype
        self.arr = arr
        self.values = values.copy()
        self.base_copy = None if self.base is None else self.base.copy()

    def assert_untouched(self, what):
        assert np.array_equal(self.arr, self.values), f"{what} was modified"
        if self.base is not None:
            assert np.array_equal(self.base, self.base_copy, equal_nan=True), f"memory around {what} was written"


# ------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------

def draw_spatial(data, n, budget, label):
    """n sizes >= 1 whose product is at most `budget`; sometimes long ones (rows longer than
    the kernels' blocks of 4096 values, pipelined pieces of 512, channels-last chunks of 256)."""
    caps = [4, 8, 64, 4096, MAX_ELEMS] if n == 1 else [3, 5, 8, 40, 150]
    cap = data.draw(st.sampled_from(caps), label=f"{label} cap")
    dims = []
    for _ in range(n):
        d = data.draw(st.integers(1, max(1, min(cap, budget))), label=f"{label} size")
        dims.append(d)
        budget = max(1, budget // d)
    return tuple(dims)


def draw_channels(data):
    return data.draw(st.one_of(st.integers(1, 6), st.integers(7, 300)), label="C")


def draw_channel_shape(data, ndim, C, label="shape"):
    """(N, C, *spatial) with ndim dims and at most MAX_ELEMS elements."""
    budget = max(1, MAX_ELEMS // C)
    N = data.draw(st.integers(1, max(1, min(12, budget))), label=f"{label} N")
    return (N, C) + draw_spatial(data, ndim - 2, max(1, budget // N), label)


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------

def assert_close(what, actual, expected, dtype, scale, extra=0.0):
    """max |actual - expected| <= RTOL[dtype] * scale + extra (+ the smallest normal number)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    diff = np.abs(actual.astype(np.float64) - expected)
    err = float(diff.max(initial=0.0))
    bound = RTOL[dtype] * scale + extra + np.finfo(dtype).tiny  # (+ underflow)
    if not err <= bound:
        i = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        raise AssertionError(
            f"{what}: max error {err:.3g} > bound {bound:.3g} (scale {scale:.3g}, + {extra:.3g}, {dtype}); "
            f"worst at {i}: got {actual[i]!r}, expected {expected[i]!r}")


def amax(a):
    return float(np.max(np.abs(a), initial=0.0))


class Expected:
    """What the reference says one step gives, with its tolerances: (scale, extra) of
    assert_close for y and dx, (expected, scale, extra) per parameter gradient."""

    def __init__(self, y, dx, y_tol, dx_tol, cond=0.0):
        self.y, self.dx = y, dx
        self.y_tol, self.dx_tol, self.cond = y_tol, dx_tol, cond
        self.grads = {}      # name -> (expected, scale, extra)
        self.running = {}    # name -> expected new value of the buffer
        self.traj = {}       # name -> the same from the reference's own float64 running statistics
        self.num_batches = None


def normalized_expected(x, dy, y, dx, dw, db, xhat, rstd, w_b, b_b, param_axes, param_names):
    """Expected for y = xhat * w + b with xhat = (x - mean) * rstd: the scales of every
    tolerance. w_b / b_b broadcast against x (None: no such parameter)."""
    w_abs = np.ones(1) if w_b is None else np.abs(w_b)
    g_abs = np.abs(dy) * w_abs
    cond = amax(np.abs(x) * rstd)
    u = COND_RTOL * cond  # float64's error of x - mean, as a share of xhat
    gr = amax(g_abs * rstd)
    e = Expected(y, dx,
                 y_tol=(amax(w_abs * np.abs(xhat)) + (0.0 if b_b is None else amax(b_b)), u * amax(w_abs)),
                 dx_tol=(max(amax(dx), gr), u * gr * max(1.0, amax(xhat))),
                 cond=cond)
    abs_dy_sum = np.sum(np.abs(dy), axis=param_axes)
    for name, value, scale, extra in (("weight", dw, np.sum(np.abs(dy * xhat), axis=param_axes), u * abs_dy_sum),
                                      ("bias", db, abs_dy_sum, 0.0)):
        if name in param_names:
            e.grads[name] = (value, max(amax(value), amax(scale)), amax(extra))
    return e


def channel_view(v, x):
    """A per-channel vector (C,) shaped to broadcast against x (N, C, *)."""
    return None if v is None else np.asarray(v).reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))


# ------------------------------------------------------------------------------------------
# the reference, one step of each layer (reads the module's state before its call)
# ------------------------------------------------------------------------------------------

def expect_batch_norm(m, x, dy, traj):
    w, b = f64(m.weight), f64(m.bias)
    track = m.track_running_stats
    batch = m.training or not track
    count = int(m.num_batches_tracked) + 1 if (m.training and track) else None
    rm, rv = (f64(m.running_mean), f64(m.running_var)) if track else (None, None)
    y, new_rm, new_rv = ref.batch_norm_forward(x, w, b, rm, rv, batch, m.momentum, m.eps, count)
    axes = (0,) + tuple(range(2, x.ndim))
    if batch:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        dx, dw, db = ref.batch_norm_backward(x, dy, w, mean, var, m.eps)
    else:
        mean, var = rm, rv
        dx, dw, db = ref.batch_norm_backward_eval(x, dy, w, rm, rv, m.eps)
    rstd = channel_view(1.0 / np.sqrt(var + m.eps), x)
    xhat = (x - channel_view(mean, x)) * rstd
    e = normalized_expected(x, dy, y, dx, dw, db, xhat, rstd, channel_view(w, x), channel_view(b, x), axes,
                            m.parameters())
    if count is not None:
        e.running = {"running_mean": new_rm, "running_var": new_rv}
        e.num_batches = count
        _, *new = ref.batch_norm_forward(x, None, None, traj["running_mean"], traj["running_var"], True,
                                         m.momentum, m.eps, count)
        e.traj = dict(zip(("running_mean", "running_var"), new))
    return e


def expect_instance_norm(m, x, dy, traj):
    unbatched = x.ndim == m._no_batch_dim
    xb, dyb = (x[None], dy[None]) if unbatched else (x, dy)
    w, b = f64(m.weight), f64(m.bias)
    track = m.track_running_stats
    use_input = m.training or not track
    rm, rv = (f64(m.running_mean), f64(m.running_var)) if track else (None, None)
    y, new_rm, new_rv = ref.instance_norm_forward(xb, w, b, rm, rv, use_input, m.momentum, m.eps)
    if use_input:
        axes = tuple(range(2, xb.ndim))
        mean, var = xb.mean(axis=axes, keepdims=True), xb.var(axis=axes, keepdims=True)
        dx, dw, db = ref.instance_norm_backward(xb, dyb, w, m.eps)
    else:
        mean, var = channel_view(rm, xb), channel_view(rv, xb)
        dx, dw, db = ref.batch_norm_backward_eval(xb, dyb, w, rm, rv, m.eps)
    rstd = 1.0 / np.sqrt(var + m.eps)
    xhat = (xb - mean) * rstd
    e = normalized_expected(xb, dyb, y, dx, dw, db, xhat, rstd, channel_view(w, xb), channel_view(b, xb),
                            (0,) + tuple(range(2, xb.ndim)), m.parameters())
    e.y, e.dx = y.reshape(x.shape), dx.reshape(x.shape)
    if m.training and track:
        e.running = {"running_mean": new_rm, "running_var": new_rv}
        _, *new = ref.instance_norm_forward(xb, None, None, traj["running_mean"], traj["running_var"], True,
                                            m.momentum, m.eps)
        e.traj = dict(zip(("running_mean", "running_var"), new))
    return e


def expect_group_norm(m, x, dy, traj):
    w, b = f64(m.weight), f64(m.bias)
    G = m.num_groups
    y = ref.group_norm_forward(x, G, w, b, m.eps)
    dx, dw, db = ref.group_norm_backward(x, dy, G, w, m.eps)
    xg = x.reshape(x.shape[0], G, -1)
    rstd_g = 1.0 / np.sqrt(xg.var(axis=2, keepdims=True) + m.eps)
    xhat = ((xg - xg.mean(axis=2, keepdims=True)) * rstd_g).reshape(x.shape)
    rstd = np.broadcast_to(rstd_g, xg.shape).reshape(x.shape)
    return normalized_expected(x, dy, y, dx, dw, db, xhat, rstd, channel_view(w, x), channel_view(b, x),
                               (0,) + tuple(range(2, x.ndim)), m.parameters())


def expect_layer_norm(m, x, dy, traj):
    w, b = f64(m.weight), f64(m.bias)
    ns = m.normalized_shape
    y = ref.layer_norm_forward(x, ns, w, b, m.eps)
    dx, dw, db = ref.layer_norm_backward(x, dy, ns, w, m.eps)
    stat_axes = tuple(range(x.ndim - len(ns), x.ndim))
    rstd = 1.0 / np.sqrt(x.var(axis=stat_axes, keepdims=True) + m.eps)
    xhat = (x - x.mean(axis=stat_axes, keepdims=True)) * rstd
    return normalized_expected(x, dy, y, dx, dw, db, xhat, rstd, w, b, tuple(range(x.ndim - len(ns))),
                               m.parameters())


def expect_lrn(m, x, dy, traj):
    args = (m.size, m.alpha, m.beta, m.k)
    y = ref.local_response_norm_forward(x, *args)
    dx = ref.local_response_norm_backward(x, dy, *args)
    # dx = dy s^-beta - 2 alpha beta / size * x * (window sums of dy x s^(-beta-1)): its two terms
    # cancel when alpha x^2 >> k, so the scale is the sum of their magnitudes.
    s = ref._lrn_scale(x, m.size, m.alpha, m.k)
    u = np.abs(dy * x) * s ** (-m.beta - 1)
    C = x.shape[1]
    window = np.zeros_like(u)
    for c in range(C):
        first, last = max(0, c - (m.size - 1) // 2), min(C - 1, c + m.size // 2)
        window[:, c] = u[:, first:last + 1].sum(axis=1)
    terms = np.abs(dy) * s ** (-m.beta) + 2 * abs(m.alpha * m.beta) / m.size * np.abs(x) * window
    return Expected(y, dx, y_tol=(amax(y), 0.0), dx_tol=(max(amax(dx), amax(terms)), 0.0))


def expect_switchable(m, x, dy, traj):
    p = {k: f64(getattr(m, k)) for k in ("weight", "bias", "mean_weight", "var_weight")}
    rm, rv = f64(m.running_mean), f64(m.running_var)
    opts = dict(using_bn=m.using_bn, eps=m.eps, population_variance=m.population_variance)
    y, new_rm, new_rv = ref.switchable_norm_forward(
        x, p["weight"], p["bias"], p["mean_weight"], p["var_weight"], rm, rv, m.training,
        using_moving_average=m.using_moving_average, momentum=m.momentum, **opts)
    dx, grads = ref.switchable_norm_backward(x, dy, p["weight"], p["mean_weight"], p["var_weight"], rm, rv,
                                             m.training, **opts)
    stats = ref.switchable_norm_stats(x, p["mean_weight"], p["var_weight"], rm, rv, m.training, m.using_bn,
                                      m.population_variance)
    N, C = x.shape[:2]
    nc_shape = (N, C) + (1,) * (x.ndim - 2)
    rstd = (1.0 / np.sqrt(stats["var"] + m.eps)).reshape(nc_shape)
    xc = x - stats["mean"].reshape(nc_shape)
    xhat = xc * rstd
    axes = (0,) + tuple(range(2, x.ndim))
    e = normalized_expected(x, dy, y, dx, grads["weight"], grads["bias"], xhat, rstd, channel_view(p["weight"], x),
                            channel_view(p["bias"], x), axes, ("weight", "bias"))
    # mean_weight / var_weight: p_k (d_k - sum_j p_j d_j) with d_k = sum(dL/dmean * mean_k): the
    # scale is the magnitude of those terms (they cancel when the sources' statistics agree).
    sum_axes = tuple(range(2, x.ndim))
    g_abs = np.abs(dy * channel_view(p["weight"], x))
    d_mean = np.sum(g_abs * rstd, axis=sum_axes) if sum_axes else g_abs * rstd
    d_var = 0.5 * (np.sum(g_abs * np.abs(xc) * rstd ** 3, axis=sum_axes) if sum_axes
                   else g_abs * np.abs(xc) * rstd ** 3)
    # dL/dvar holds x - mean: its float64 error is |x|'s rounding times cond, per element
    # |g| rstd^2 / 2 of it
    d_var_unit = 0.5 * (np.sum(g_abs * rstd ** 2, axis=sum_axes) if sum_axes else g_abs * rstd ** 2)
    for name, weights, dstat, unit, idx in (("mean_weight", stats["mw"], d_mean, 0.0 * d_mean, 1),
                                            ("var_weight", stats["vw"], d_var, d_var_unit, 2)):
        def magnitude(d, weights=weights, idx=idx):
            terms = np.array([np.sum(d * np.abs(np.broadcast_to(src[idx], (N, C)))) for src in stats["sources"]])
            return float(np.max(weights * (terms + np.dot(weights, terms))))
        e.grads[name] = (grads[name], max(amax(grads[name]), magnitude(dstat)),
                         COND_RTOL * e.cond * magnitude(unit))
    if m.using_bn and m.training:
        e.running = {"running_mean": new_rm, "running_var": new_rv}
        _, *new = ref.switchable_norm_forward(
            x, p["weight"], p["bias"], p["mean_weight"], p["var_weight"], traj["running_mean"],
            traj["running_var"], True, using_moving_average=m.using_moving_average, momentum=m.momentum, **opts)
        e.traj = dict(zip(("running_mean", "running_var"), new))
    return e


# ------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------

def state_of(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


def assert_same_state(before, m):
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert np.array_equal(before[k], after[k]), f"{k} changed"


def randomize(data, m, extra=()):
    """Random parameter values (and sometimes running statistics), set in place."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="parameter seed"))
    for name, arr in m.parameters().items():
        before = arr
        if name == "weight":
            arr[...] = rng.uniform(-2.0, 2.0, arr.shape)
        elif name in ("mean_weight", "var_weight"):
            arr[...] = rng.normal(0.0, 1.5, arr.shape)
        else:
            arr[...] = rng.normal(0.0, 2.0, arr.shape)
        assert getattr(m, name) is before
    if getattr(m, "running_mean", None) is not None and data.draw(st.booleans(), label="random running stats"):
        level = 10.0 ** rng.uniform(-2, 2)
        m.running_mean[...] = rng.normal(0.0, level, m.running_mean.shape)
        m.running_var[...] = rng.uniform(0.0, 2.0, m.running_var.shape) * level ** 2


def running_tol(name, value, x_max, cond):
    """(scale, extra) for a running statistic: its magnitude, and for a mean the magnitude of
    the values averaged (a mean near 0 of large values keeps only their rounding); a variance
    sums squares of x - mean, each accurate to its rounding times cond."""
    if name == "running_mean":
        return max(amax(value), x_max), 0.0
    return amax(value), COND_RTOL * cond * amax(value)


def draw_modes(data):
    n_train = data.draw(st.integers(1, 2), label="training steps")
    again = data.draw(st.booleans(), label="train again after eval")
    return ["train"] * n_train + ["eval"] + (["train"] if again else [])


def run_steps(data, m, expect, draw_shape, refused, param_dtype, modes=None):
    """The steps of one example. draw_shape(data) -> shape of this step's x; refused(m, shape):
    True where PyTorch raises (then ValueError and no change of state is checked)."""
    modes = draw_modes(data) if modes is None else modes
    randomize(data, m)
    tracked = {k: f64(getattr(m, k)).copy() for k in ("running_mean", "running_var")
               if getattr(m, k, None) is not None}
    x_max = 0.0  # the largest |x| so far: a mean of such values is accurate to its rounding only
    cond_max = 0.0  # the largest cond so far: a variance is accurate to its rounding times cond
    for step, mode in enumerate(modes):
        m.train(mode == "train")
        shape = draw_shape(data)
        dtype = data.draw(DTYPES, label="x dtype")
        dy_dtype = data.draw(st.sampled_from([dtype, dtype, F32, F64]), label="dy dtype")
        xv = draw_values(data, shape, dtype, "x")
        dyv = draw_values(data, shape, dy_dtype, "dy", dy=True)
        x_in, dy_in = Layout(data, xv, "x"), Layout(data, dyv, "dy")
        x, dy = x_in.arr, dy_in.arr
        note(f"step {step} ({mode}): x {shape} {dtype} {x_in.kind} strides {x.strides}, "
             f"dy {dy_dtype} {dy_in.kind} strides {dy.strides}")
        event(f"step: {mode}, x {dtype}, parameters {param_dtype}")
        if refused(m, shape):
            event("step: refused (ValueError)")
            before = state_of(m)
            with pytest.raises(ValueError):
                m(x)
            assert_same_state(before, m)
            x_in.assert_untouched("x")
            continue
        x64 = xv.astype(np.float64)
        x_max = max(x_max, amax(x64))
        dy64 = dyv.astype(dtype).astype(np.float64)  # backward casts dy to x's dtype
        e = expect(m, x64, dy64, tracked)
        cond_max = max(cond_max, e.cond)
        before = state_of(m)
        y = m(x)
        assert y.shape == shape and y.dtype == dtype, (y.shape, y.dtype)
        assert not np.shares_memory(y, x)
        x_in.assert_untouched("x")
        assert_close(f"y, step {step}", y, e.y, dtype, *e.y_tol)
        after = state_of(m)
        for name in before:  # the forward changes only the buffers it updates
            if name not in e.running and not (name == "num_batches_tracked" and e.num_batches is not None):
                assert np.array_equal(before[name], after[name]), f"{name} changed in the forward of step {step}"
        dx = m.backward(dy)
        assert_same_state(after, m)  # the backward changes no parameter or buffer
        assert dx.shape == shape and dx.dtype == dtype, (dx.shape, dx.dtype)
        assert not np.shares_memory(dx, dy) and not np.shares_memory(dx, x)
        x_in.assert_untouched("x")
        dy_in.assert_untouched("dy")
        assert_close(f"dx, step {step}", dx, e.dx, dtype, *e.dx_tol)
        assert set(m.grads) == set(e.grads), (sorted(m.grads), sorted(e.grads))
        for name, (value, scale, extra) in e.grads.items():
            assert m.grads[name].dtype == param_dtype and m.grads[name].shape == getattr(m, name).shape
            assert_close(f"grad {name}, step {step}", m.grads[name], value, lower(dtype, param_dtype), scale, extra)
        again = data.draw(st.sampled_from([None, "same dy", "dy in another layout"]), label="backward again")
        if again is not None:
            # backward may be called again for the same forward: the same bits for the same dy;
            # dy in another layout (of dy's dtype or of x's) within the tolerances
            grads = {k: v.copy() for k, v in m.grads.items()}
            if again == "same dy":
                dx2 = m.backward(dy)
                assert np.array_equal(dx2, dx) and dx2.dtype == dx.dtype, "a second backward gave another dx"
                for k, v in grads.items():
                    assert np.array_equal(m.grads[k], v), f"a second backward gave another grad {k}"
            else:
                again_values = dyv if data.draw(st.booleans(), label="dy dtype again") else dyv.astype(dtype)
                dx2 = m.backward(Layout(data, again_values, "dy again").arr)
                assert_close(f"dx again, step {step}", dx2, e.dx, dtype, *e.dx_tol)
                for name, (value, scale, extra) in e.grads.items():
                    assert_close(f"grad {name} again, step {step}", m.grads[name], value, lower(dtype, param_dtype),
                                 scale, extra)
            assert m.grads.keys() == grads.keys()
            assert_same_state(after, m)
        for name, value in e.running.items():
            buf = getattr(m, name)
            assert buf.dtype == param_dtype
            assert_close(f"{name}, step {step}", buf, value, param_dtype, *running_tol(name, value, x_max, cond_max))
        tracked.update(e.traj)
        if e.num_batches is not None:
            assert m.num_batches_tracked.dtype == np.int64 and int(m.num_batches_tracked) == e.num_batches
        for name, value in tracked.items():  # the reference's running statistics, kept over the steps
            assert_close(f"{name} over the steps", getattr(m, name), value, param_dtype,
                         *running_tol(name, value, x_max, cond_max))


# ------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------

def check_options(m, opts):
    """The module keeps the options it was given (the reference reads them from it)."""
    for name, value in opts.items():
        assert getattr(m, name) == value, (name, getattr(m, name), value)


MOMENTA = st.one_of(st.sampled_from([0.1, None, 0.0, 1.0]), st.floats(0.0, 1.0))
EPSILONS = st.one_of(st.sampled_from([1e-5, 1e-3, 0.1]), st.floats(1e-8, 1.0))


@pytest.mark.parametrize("cls,ndims", [(nc.BatchNorm1d, (2, 3)), (nc.BatchNorm2d, (4,)), (nc.BatchNorm3d, (5,))],
                         ids=["1d", "2d", "3d"])
@given(data=st.data())
def test_batch_norm(cls, ndims, data):
    C = draw_channels(data)
    param_dtype = data.draw(DTYPES, label="parameter dtype")
    opts = dict(eps=data.draw(EPSILONS, label="eps"), momentum=data.draw(MOMENTA, label="momentum"),
                affine=data.draw(st.booleans(), label="affine"),
                track_running_stats=data.draw(st.booleans(), label="track_running_stats"))
    m = cls(C, dtype=param_dtype, **opts)
    note(repr(m))
    check_options(m, opts)

    def draw_shape(data):
        return draw_channel_shape(data, data.draw(st.sampled_from(ndims), label="ndim"), C)

    def refused(m, shape):  # batch statistics of one value per channel
        return (m.training or not m.track_running_stats) and math.prod(shape) // shape[1] == 1

    run_steps(data, m, expect_batch_norm, draw_shape, refused, param_dtype)


@pytest.mark.parametrize("cls", [nc.InstanceNorm1d, nc.InstanceNorm2d, nc.InstanceNorm3d], ids=["1d", "2d", "3d"])
@given(data=st.data())
def test_instance_norm(cls, data):
    C = draw_channels(data)
    param_dtype = data.draw(DTYPES, label="parameter dtype")
    opts = dict(eps=data.draw(EPSILONS, label="eps"), momentum=data.draw(MOMENTA, label="momentum"),
                affine=data.draw(st.booleans(), label="affine"),
                track_running_stats=data.draw(st.booleans(), label="track_running_stats"))
    m = cls(C, dtype=param_dtype, **opts)
    note(repr(m))
    check_options(m, opts)
    nb = cls._no_batch_dim

    def draw_shape(data):
        shape = draw_channel_shape(data, nb + 1, C)
        return shape[1:] if data.draw(st.booleans(), label="unbatched") else shape

    def refused(m, shape):  # instance statistics of one spatial element
        spatial = shape[1:] if len(shape) == nb else shape[2:]
        return (m.training or not m.track_running_stats) and math.prod(spatial) == 1

    run_steps(data, m, expect_instance_norm, draw_shape, refused, param_dtype)


@given(data=st.data())
def test_group_norm(data):
    C = draw_channels(data)
    G = data.draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]), label="num_groups")
    param_dtype = data.draw(DTYPES, label="parameter dtype")
    opts = dict(eps=data.draw(EPSILONS, label="eps"), affine=data.draw(st.booleans(), label="affine"))
    m = nc.GroupNorm(G, C, dtype=param_dtype, **opts)
    note(repr(m))
    check_options(m, dict(opts, num_groups=G, num_channels=C))
    ndim = data.draw(st.integers(2, 5), label="ndim")

    def draw_shape(data):
        return draw_channel_shape(data, ndim, C)

    def one_value_per_group(m, shape):  # torch's rule: N * C/G * L values per group and batch
        return shape[0] * (C // G) * math.prod(shape[2:]) == 1

    run_steps(data, m, expect_group_norm, draw_shape, one_value_per_group, param_dtype, modes=["train", "eval"])


@given(data=st.data())
def test_layer_norm(data):
    ndim = data.draw(st.integers(1, 5), label="ndim")
    k = data.draw(st.integers(1, min(3, ndim)), label="normalized dims")
    ns = draw_spatial(data, k, MAX_ELEMS, "normalized_shape")
    arg = ns[0] if k == 1 and data.draw(st.booleans(), label="int normalized_shape") else list(ns)
    param_dtype = data.draw(DTYPES, label="parameter dtype")
    opts = dict(eps=data.draw(EPSILONS, label="eps"),
                elementwise_affine=data.draw(st.booleans(), label="elementwise_affine"),
                bias=data.draw(st.booleans(), label="bias"))
    m = nc.LayerNorm(arg, dtype=param_dtype, **opts)
    note(repr(m))
    check_options(m, dict(eps=opts["eps"], normalized_shape=ns))
    assert (m.weight is None) == (not opts["elementwise_affine"])
    assert (m.bias is None) == (not (opts["elementwise_affine"] and opts["bias"]))

    def draw_shape(data):
        budget = max(1, MAX_ELEMS // math.prod(ns))
        lead = draw_spatial(data, ndim - k, budget, "leading") if ndim > k else ()
        return lead + ns

    run_steps(data, m, expect_layer_norm, draw_shape, lambda m, s: False, param_dtype, modes=["train", "eval"])


@given(data=st.data())
def test_local_response_norm(data):
    C = data.draw(st.one_of(st.integers(1, 12), st.integers(13, 300)), label="C")
    size = data.draw(st.one_of(st.integers(1, 6), st.integers(1, C + 3)), label="size")
    opts = dict(alpha=10.0 ** data.draw(st.floats(-5, 0), label="log10 alpha"),
                beta=data.draw(st.sampled_from([0.75, 0.5, 1.0]) | st.floats(0.01, 2.0), label="beta"),
                k=data.draw(st.sampled_from([1.0, 2.0]) | st.floats(0.5, 3.0), label="k"))
    m = nc.LocalResponseNorm(size, **opts)
    note(repr(m))
    check_options(m, dict(opts, size=size))
    ndim = data.draw(st.integers(3, 5), label="ndim")

    def draw_shape(data):
        return draw_channel_shape(data, ndim, C)

    run_steps(data, m, expect_lrn, draw_shape, lambda m, s: False, None, modes=["train", "eval"])


@pytest.mark.parametrize("name,ndim", [("switchable_norm1d", 2), ("switchable_norm2d", 4),
                                       ("switchable_norm3d", 5)], ids=["1d", "2d", "3d"])
@given(data=st.data())
def test_switchable_norm(name, ndim, data):
    cls = nc.get_norm(name)
    assert cls is getattr(switchable, f"SwitchableNorm{name[-2:]}")
    C = draw_channels(data)
    param_dtype = data.draw(DTYPES, label="parameter dtype")
    opts = dict(
        eps=data.draw(EPSILONS, label="eps"),
        momentum=data.draw(st.one_of(st.sampled_from([None, 0.0, 0.5, 0.9, 1.0]), st.floats(0.0, 1.0)),
                           label="momentum"),
        using_moving_average=data.draw(st.booleans(), label="using_moving_average"),
        using_bn=data.draw(st.booleans(), label="using_bn"), last_gamma=data.draw(st.booleans(), label="last_gamma"),
        population_variance=data.draw(st.booleans(), label="population_variance"))
    m = nc.create_norm(name, C, dtype=param_dtype, **opts)
    note(repr(m))
    if opts["momentum"] is None:  # the released code's defaults: the fraction of the running statistics kept
        opts["momentum"] = 0.9 if ndim == 4 else 0.997
    check_options(m, opts)
    # the initial state of the released code
    assert np.array_equal(m.weight, np.full(C, 0.0 if opts["last_gamma"] else 1.0)) and not m.bias.any()
    n_sources = (1 if ndim == 2 else 2) + opts["using_bn"]
    assert m.mean_weight.shape == m.var_weight.shape == (n_sources,)
    assert (m.running_mean is None) == (not opts["using_bn"])
    if opts["using_bn"]:
        assert not m.running_mean.any() and not m.running_var.any()

    def draw_shape(data):
        return draw_channel_shape(data, ndim, C)

    def refused(m, shape):  # unbiased variances of one value
        need = 1 if m.population_variance else 2
        if ndim == 2:
            return shape[1] < need or (m.using_bn and m.training and shape[0] < need)
        return math.prod(shape[2:]) < need

    run_steps(data, m, expect_switchable, draw_shape, refused, param_dtype)
