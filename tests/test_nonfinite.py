"""NaN and +-Inf propagate but stay confined.

One non-finite value is put at one position of x (or of dy, or of a running statistic) and
every output is checked against the set of values that mathematically depend on it:

* outside that set every value is finite and equal to the result without the poisoned value
  (no NaN is clamped away into a wrong finite number elsewhere, nothing leaks between rows,
  channels, chunks or threads);
* inside it, the values IEEE arithmetic makes non-finite are non-finite (a NaN is never
  silently replaced by a finite number).

The dependency sets, per layer (x of shape (N, C, *), poisoned at (n, c, p)):

  BatchNorm (batch statistics)   channel c: y[:, c], dx[:, c], running stats [c], dweight[c]
  InstanceNorm                   instance (n, c): y, dx; running stats [c] (mean over N); dweight[c]
  GroupNorm                      (n, group of c): y, dx; dweight at the channels of that group
  LayerNorm                      the row (the normalized slice): y, dx; dweight at every column
                                 (dweight[j] = sum_r dy[r, j] * xhat[r, j] and the row's whole
                                 xhat is NaN)
  LocalResponseNorm (size s)     y: channels c' in [c - (s-1)//2, c + s//2] at (n, p) (those whose
                                 window [c' - s//2, c' + (s-1)//2] holds c); dx: |c' - c| <= s - 1
  dbias = sum of dy (every layer) stays finite when only x is poisoned.

The shapes are small enough to run inline and large enough for the kernels' multi-block
(rows > 4096 values), multi-task (>= 65536 values: the OpenMP team) and channels-last paths;
float32 and float64. Every case runs with 1 thread, and with 2 where that changes the code that
runs (see with_threads); nc.set_num_threads is restored to the default after each test.

A failing test here (kept on purpose, not marked xfail): test_eval_input_gradient_ignores_running_mean
(a non-finite running_mean makes dx of its channel NaN in eval; see that test).
"""
import numpy as np
import pytest

import normcore as nc
import reference as ref

VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
DTYPES = [np.float32, np.float64]
BLOCK = 4096  # values per block of a row in the kernels (row_ops.h NC_BLOCK)
BIG = 65536  # from this many values the kernels run on several threads (chunking.pxd PARALLEL_MIN)


def _import_switchable():
    from normcore.plugins import switchable
    return switchable


@pytest.fixture
def threads(request):
    """nc.set_num_threads(n) for the test (n from the parametrization), the default after."""
    n = getattr(request, "param", 1)
    nc.set_num_threads(n)
    yield n
    nc.set_num_threads(None)


def with_threads(cases, shape_of, channels_last_of=lambda case: False):
    """(case, threads, value) parameters: every case and value with 1 thread; with 2 threads,
    NaN only (the arithmetic of +-inf is the thread count's business no more than NaN's), for
    the cases where the thread count changes the code that runs: from BIG values on (the
    kernels start an OpenMP team) and channels-last input (InstanceNorm / GroupNorm pick their
    path by N >= threads). Below BIG the kernels run inline whatever the thread count."""
    params = []
    for case in cases:
        params += [pytest.param(case, 1, value, id=f"{case}-{value}") for value in VALUES]
        if np.prod(shape_of(case)) >= BIG or channels_last_of(case):
            params.append(pytest.param(case, 2, "nan", id=f"{case}-nan-2threads"))
    return params


# -- inputs -----------------------------------------------------------------------------------
def channels_last(a):
    """The same values as a (N, C, *), in channels-last memory (a view of a (N, *, C) array)."""
    perm = (0, *range(2, a.ndim), 1)
    return np.moveaxis(np.ascontiguousarray(a.transpose(perm)), -1, 1)


def make_input(shape, dtype, layout="contiguous", seed=0):
    x = (np.random.default_rng(seed).normal(size=shape) * 2.0 + 0.5).astype(dtype)
    if layout == "channels_last":
        x = channels_last(x)
        assert not x.flags.c_contiguous and np.moveaxis(x, 1, -1).flags.c_contiguous
    return x


def make_dy(shape, dtype, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def poisoned(a, index, value):
    """A copy of a (same memory layout) with a[index] = value."""
    b = a.copy(order="K")
    b[index] = value
    return b


def channel_positions(shape):
    """Where to put the non-finite value in x (N, C, *): the first value of a row (the
    kernels' shift), the last one, and the first of the second block of long rows; in
    different samples and channels."""
    N, C = shape[:2]
    spatial = shape[2:]
    L = int(np.prod(spatial)) if spatial else 1
    flat = [(N - 1, C - 1, 0), (0, C // 2, L - 1), (N // 2, 0, min(BLOCK, L - 1) if L > BLOCK else L // 2)]
    out = []
    for n, c, p in flat:
        idx = (n, c, *np.unravel_index(p, spatial)) if spatial else (n, c)
        idx = tuple(int(i) for i in idx)
        if idx not in out:
            out.append(idx)
    if np.prod(shape) >= BIG:
        del out[1:-1]  # large inputs (slower with 2 threads): a row's first value, a block's first
    return out


# -- checks -----------------------------------------------------------------------------------
def check(a, clean, allowed, must, what):
    """Non-finite values of `a` only where `allowed`, at least where `must`; elsewhere `a` equals
    the unpoisoned result `clean`."""
    a = np.asarray(a)
    bad = ~np.isfinite(a)
    outside = bad & ~allowed
    assert not outside.any(), (
        f"{what}: {int(outside.sum())} non-finite value(s) outside the region that depends on the "
        f"poisoned value, e.g. at {tuple(int(i) for i in np.argwhere(outside)[0])}")
    if must is not None:
        missing = must & ~bad
        assert not missing.any(), (
            f"{what}: {int(missing.sum())} value(s) that depend on the non-finite value are finite, "
            f"e.g. at {tuple(int(i) for i in np.argwhere(missing)[0])}: {a[tuple(np.argwhere(missing)[0])]!r}")
    rtol = 1e-5 if a.dtype == np.float32 else 1e-11
    np.testing.assert_allclose(a[~allowed], np.asarray(clean)[~allowed], rtol=rtol, atol=rtol,
                               err_msg=f"{what}: values outside the poisoned region changed")


def check_finite(a, clean, what):
    """Everything finite and unchanged."""
    check(a, clean, np.zeros(np.shape(a), bool), None, what)


def mask(shape, index):
    m = np.zeros(shape, bool)
    m[index] = True
    return m


def vector_mask(C, channels):
    m = np.zeros(C, bool)
    m[list(channels)] = True
    return m


def run(make, x, dy):
    """Forward and backward with a fresh module: y, dx, grads, running stats."""
    m = make()
    out = {"y": m(x)}
    for name in ("running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            out[name] = getattr(m, name).copy()
    out["dx"] = m.backward(dy)
    out["grads"] = {k: v.copy() for k, v in m.grads.items()}
    return out


_CLEAN = {}


def run_clean(key, make, x, dy):
    """run() on the unpoisoned input, once per key for the whole session (the results do not
    depend on the thread count, and the tests only read them)."""
    if key not in _CLEAN:
        out = run(make, x, dy)
        for a in (out["y"], out["dx"], *out["grads"].values()):
            a.setflags(write=False)
        _CLEAN[key] = out
    return _CLEAN[key]


def affine_init(m, C):
    """Distinct per-channel weight and bias, so a channel mix-up would show."""
    if getattr(m, "weight", None) is not None:
        m.weight[...] = (1.0 + 0.1 * np.arange(C)).reshape(m.weight.shape)
    if getattr(m, "bias", None) is not None:
        m.bias[...] = (0.25 * np.arange(C) - 0.5).reshape(m.bias.shape)
    return m


# -- BatchNorm --------------------------------------------------------------------------------
BN_CASES = {
    "1d-NC-tiny": (nc.BatchNorm1d, (4, 3), "contiguous"),
    "1d-tiny": (nc.BatchNorm1d, (3, 2, 5), "contiguous"),
    "1d-2blocks": (nc.BatchNorm1d, (3, 3, 4500), "contiguous"),
    "2d-tiny": (nc.BatchNorm2d, (2, 3, 2, 2), "contiguous"),
    "2d-8x5x33x33": (nc.BatchNorm2d, (8, 5, 33, 33), "contiguous"),
    "2d-2blocks-threaded": (nc.BatchNorm2d, (4, 3, 80, 80), "contiguous"),
    "2d-300rows": (nc.BatchNorm2d, (100, 3, 2, 2), "contiguous"),  # row buffer beyond the stack one
    "3d-tiny": (nc.BatchNorm3d, (2, 2, 2, 2, 2), "contiguous"),
    "3d-2blocks": (nc.BatchNorm3d, (2, 3, 4, 40, 40), "contiguous"),
    "2d-channels-last": (nc.BatchNorm2d, (4, 5, 9, 9), "channels_last"),
    "2d-channels-last-threaded": (nc.BatchNorm2d, (4, 6, 64, 64), "channels_last"),
}
BN_PARAMS = with_threads(BN_CASES, lambda c: BN_CASES[c][1], lambda c: BN_CASES[c][2] == "channels_last")


def _bn_maker(cls, C, dtype):
    return lambda: affine_init(cls(C, dtype=dtype), C)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,threads,value", BN_PARAMS, indirect=["threads"])
def test_batch_norm_training_confined_to_channel(case, dtype, value, threads):
    cls, shape, layout = BN_CASES[case]
    C = shape[1]
    make = _bn_maker(cls, C, dtype)
    x = make_input(shape, dtype, layout)
    dy = make_dy(shape, dtype)
    clean = run_clean(("bn", case, dtype), make, x, dy)
    for idx in channel_positions(shape):
        c = idx[1]
        where = f"{case} {value} at {idx}"
        ch = mask(shape, (slice(None), c))
        out = run(make, poisoned(x, idx, VALUES[value]), dy)
        # The batch mean and variance of channel c are non-finite: so is all of channel c.
        check(out["y"], clean["y"], ch, ch, f"y ({where})")
        check(out["dx"], clean["dx"], ch, ch, f"dx ({where})")
        vc = vector_mask(C, [c])
        for name in ("running_mean", "running_var"):
            check(out[name], clean[name], vc, vc, f"{name} ({where})")
        check(out["grads"]["weight"], clean["grads"]["weight"], vc, vc, f"dweight ({where})")
        check_finite(out["grads"]["bias"], clean["grads"]["bias"], f"dbias = sum(dy) ({where})")

        # Only dy poisoned: dx of channel c (through the mean of dy and of dy * xhat), and the
        # parameter gradients of channel c.
        out = run(make, x, poisoned(dy, idx, VALUES[value]))
        check(out["y"], clean["y"], np.zeros(shape, bool), None, f"y (dy {where})")
        check(out["dx"], clean["dx"], ch, ch, f"dx (dy {where})")
        check(out["grads"]["weight"], clean["grads"]["weight"], vc, None, f"dweight (dy {where})")
        check(out["grads"]["bias"], clean["grads"]["bias"], vc, vc, f"dbias (dy {where})")


EVAL_CASES = {
    "bn2d": (lambda C, dt: nc.BatchNorm2d(C, dtype=dt), (3, 4, 5, 5), "contiguous"),
    "bn2d-threaded": (lambda C, dt: nc.BatchNorm2d(C, dtype=dt), (4, 4, 64, 70), "contiguous"),
    "bn1d-NC": (lambda C, dt: nc.BatchNorm1d(C, dtype=dt), (6, 4), "contiguous"),
    "bn2d-channels-last": (lambda C, dt: nc.BatchNorm2d(C, dtype=dt), (3, 4, 6, 6), "channels_last"),
    "in2d-running": (lambda C, dt: nc.InstanceNorm2d(C, affine=True, track_running_stats=True, dtype=dt),
                     (3, 4, 5, 5), "contiguous"),
}
EVAL_PARAMS = with_threads(EVAL_CASES, lambda c: EVAL_CASES[c][1], lambda c: EVAL_CASES[c][2] == "channels_last")


@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,threads,value", EVAL_PARAMS, indirect=["threads"])
def test_eval_with_non_finite_running_stat_confined_to_channel(case, dtype, stat, value, threads):
    """Eval (running statistics): a non-finite running_mean[c] or running_var[c] changes only
    channel c of y, dx and dweight."""
    factory, shape, layout = EVAL_CASES[case]
    C = shape[1]
    x = make_input(shape, dtype, layout)
    dy = make_dy(shape, dtype)
    rng = np.random.default_rng(3)
    running = {"running_mean": rng.normal(size=C) * 0.3, "running_var": rng.uniform(0.5, 2.0, size=C)}

    def make(c=None):
        def build():
            m = affine_init(factory(C, dtype), C).eval()
            m.running_mean[...] = running["running_mean"]
            m.running_var[...] = running["running_var"]
            if c is not None:
                getattr(m, stat)[c] = VALUES[value]
            return m
        return build

    clean = run_clean(("eval", case, dtype), make(), x, dy)
    for c in sorted({0, C - 1, C // 2}):
        where = f"{case} {stat}[{c}] = {value}"
        out = run(make(c), x, dy)
        ch = mask(shape, (slice(None), c))
        vc = vector_mask(C, [c])
        # y = (x - mean) * rstd * w + b: a NaN or infinite mean, or a NaN var, reaches every value
        # of channel c. var = +inf gives rstd = 0 (y = bias, finite); var = -inf: the library
        # clamps a negative variance at 0 (finite y; PyTorch gives NaN). Only channel c either way.
        forced = stat == "running_mean" or value == "nan"
        check(out["y"], clean["y"], ch, ch if forced else None, f"y ({where})")
        # dx = dy * w * rstd: a NaN var reaches all of channel c. (It does not involve the mean:
        # see test_eval_input_gradient_ignores_running_mean for that.)
        check(out["dx"], clean["dx"], ch, ch if stat == "running_var" and value == "nan" else None,
              f"dx ({where})")
        check(out["grads"]["weight"], clean["grads"]["weight"], vc, vc if forced else None, f"dweight ({where})")
        check_finite(out["grads"]["bias"], clean["grads"]["bias"], f"dbias ({where})")
        # Eval changes no running statistic.
        check(out[stat], clean[stat], vc, vc, f"{stat} ({where})")


@pytest.mark.parametrize("case,threads", [pytest.param(c, 1, id=c) for c in EVAL_CASES]
                         + [pytest.param("bn2d-threaded", 2, id="bn2d-threaded-2threads")], indirect=["threads"])
def test_eval_input_gradient_ignores_running_mean(case, threads):
    """With running statistics (constants), dx = dy * weight / sqrt(running_var + eps), as in
    PyTorch and tests/reference.py (batch_norm_backward_eval): the running mean takes no part,
    so a non-finite running_mean[c] leaves dx finite and unchanged (only y and dweight of
    channel c are non-finite). Every dtype and value is tried; the failures are listed together."""
    factory, shape, layout = EVAL_CASES[case]
    C = shape[1]
    failures = []
    for dtype in DTYPES:
        x = make_input(shape, dtype, layout)
        dy = make_dy(shape, dtype)
        for value, v in VALUES.items():
            c = C - 1
            m = affine_init(factory(C, dtype), C).eval()
            m.running_var[...] = np.linspace(0.5, 2.0, C)
            m.running_mean[...] = 0.1
            m.running_mean[c] = v
            m(x)
            dx = m.backward(dy)
            shp = (1, C) + (1,) * (x.ndim - 2)
            w = m.weight.astype(np.float64).reshape(shp)
            var = m.running_var.astype(np.float64).reshape(shp)
            expected = dy.astype(np.float64) * w / np.sqrt(var + m.eps)
            where = f"{np.dtype(dtype)}, running_mean[{c}] = {value}"
            bad = ~np.isfinite(dx)
            if bad.any():
                failures.append(f"{where}: {int(bad.sum())} non-finite dx values (channel(s) "
                                f"{sorted(set(np.argwhere(bad)[:, 1].tolist()))})")
                continue
            tol = 1e-5 if dtype == np.float32 else 1e-12
            if not np.allclose(dx, expected, rtol=tol, atol=tol):
                failures.append(f"{where}: dx differs from dy * weight * rstd")
    assert not failures, f"{case}: dx = dy * weight * rstd must not depend on running_mean:\n" + "\n".join(failures)


# -- InstanceNorm -----------------------------------------------------------------------------
IN_CASES = {
    "1d-tiny": (nc.InstanceNorm1d, (3, 4, 7), "contiguous"),
    "1d-3blocks": (nc.InstanceNorm1d, (2, 3, 9000), "contiguous"),
    "2d-tiny": (nc.InstanceNorm2d, (2, 3, 5, 5), "contiguous"),
    "2d-2blocks-threaded": (nc.InstanceNorm2d, (4, 4, 64, 65), "contiguous"),
    "3d-tiny": (nc.InstanceNorm3d, (2, 2, 3, 4, 5), "contiguous"),
    "2d-channels-last": (nc.InstanceNorm2d, (3, 4, 6, 6), "channels_last"),
    "2d-channels-last-N1": (nc.InstanceNorm2d, (1, 4, 8, 8), "channels_last"),
    "2d-channels-last-threaded": (nc.InstanceNorm2d, (4, 8, 48, 48), "channels_last"),
}
IN_PARAMS = with_threads(IN_CASES, lambda c: IN_CASES[c][1], lambda c: IN_CASES[c][2] == "channels_last")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,threads,value", IN_PARAMS, indirect=["threads"])
def test_instance_norm_confined_to_instance(case, dtype, value, threads):
    cls, shape, layout = IN_CASES[case]
    C = shape[1]

    def make():
        return affine_init(cls(C, affine=True, track_running_stats=True, dtype=dtype), C)

    x = make_input(shape, dtype, layout)
    dy = make_dy(shape, dtype)
    clean = run_clean(("in", case, dtype), make, x, dy)
    for idx in channel_positions(shape):
        n, c = idx[:2]
        where = f"{case} {value} at {idx}"
        inst = mask(shape, (n, c))
        vc = vector_mask(C, [c])
        out = run(make, poisoned(x, idx, VALUES[value]), dy)
        check(out["y"], clean["y"], inst, inst, f"y ({where})")
        check(out["dx"], clean["dx"], inst, inst, f"dx ({where})")
        # Running statistics: the mean over N of the instance statistics of channel c.
        for name in ("running_mean", "running_var"):
            check(out[name], clean[name], vc, vc, f"{name} ({where})")
        check(out["grads"]["weight"], clean["grads"]["weight"], vc, vc, f"dweight ({where})")
        check_finite(out["grads"]["bias"], clean["grads"]["bias"], f"dbias = sum(dy) ({where})")

        out = run(make, x, poisoned(dy, idx, VALUES[value]))
        check_finite(out["y"], clean["y"], f"y (dy {where})")
        check(out["dx"], clean["dx"], inst, inst, f"dx (dy {where})")
        check(out["grads"]["weight"], clean["grads"]["weight"], vc, None, f"dweight (dy {where})")
        check(out["grads"]["bias"], clean["grads"]["bias"], vc, vc, f"dbias (dy {where})")


# -- GroupNorm --------------------------------------------------------------------------------
GN_CASES = {
    "1d-tiny": (3, (2, 6, 5), "contiguous"),
    "2d-small": (4, (3, 8, 4, 4), "contiguous"),
    "2d-group-2blocks": (2, (2, 4, 64, 64), "contiguous"),
    "2d-threaded": (2, (4, 4, 64, 72), "contiguous"),
    "2d-one-group": (1, (3, 4, 5, 5), "contiguous"),
    "2d-group-per-channel": (4, (3, 4, 5, 5), "contiguous"),
    "3d-tiny": (2, (2, 4, 2, 3, 3), "contiguous"),
    "2d-channels-last": (3, (3, 6, 5, 5), "channels_last"),
    "2d-channels-last-N1": (3, (1, 6, 8, 8), "channels_last"),
    "2d-channels-last-threaded": (2, (4, 8, 48, 48), "channels_last"),
}
GN_PARAMS = with_threads(GN_CASES, lambda c: GN_CASES[c][1], lambda c: GN_CASES[c][2] == "channels_last")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,threads,value", GN_PARAMS, indirect=["threads"])
def test_group_norm_confined_to_group(case, dtype, value, threads):
    G, shape, layout = GN_CASES[case]
    C = shape[1]
    k = C // G

    def make():
        return affine_init(nc.GroupNorm(G, C, dtype=dtype), C)

    x = make_input(shape, dtype, layout)
    dy = make_dy(shape, dtype)
    clean = run_clean(("gn", case, dtype), make, x, dy)
    for idx in channel_positions(shape):
        n, c = idx[:2]
        g = c // k
        where = f"{case} {value} at {idx} (group {g})"
        grp = mask(shape, (n, slice(g * k, (g + 1) * k)))
        vg = vector_mask(C, range(g * k, (g + 1) * k))
        out = run(make, poisoned(x, idx, VALUES[value]), dy)
        check(out["y"], clean["y"], grp, grp, f"y ({where})")
        check(out["dx"], clean["dx"], grp, grp, f"dx ({where})")
        check(out["grads"]["weight"], clean["grads"]["weight"], vg, vg, f"dweight ({where})")
        check_finite(out["grads"]["bias"], clean["grads"]["bias"], f"dbias = sum(dy) ({where})")

        out = run(make, x, poisoned(dy, idx, VALUES[value]))
        check_finite(out["y"], clean["y"], f"y (dy {where})")
        check(out["dx"], clean["dx"], grp, grp, f"dx (dy {where})")
        vc = vector_mask(C, [c])
        check(out["grads"]["weight"], clean["grads"]["weight"], vc, None, f"dweight (dy {where})")
        check(out["grads"]["bias"], clean["grads"]["bias"], vc, vc, f"dbias (dy {where})")


# -- LayerNorm --------------------------------------------------------------------------------
LN_CASES = {
    "last-dim": ((64,), (5, 64), True),
    "2-rows-of-4096": ((4096,), (2, 4096), True),
    "4-long-rows-threaded": ((16384,), (4, 16384), True),  # few long rows: split over threads
    "2048-rows-threaded": ((64,), (2048, 64), True),  # many rows: 32 chunks of column sums
    "300-rows": ((50,), (3, 100, 50), True),
    "last-2-dims": ((8, 16), (3, 5, 8, 16), True),
    "last-2-dims-2blocks": ((6, 700), (2, 3, 6, 700), True),
    "no-affine": ((64,), (6, 64), False),
}
LN_PARAMS = with_threads(LN_CASES, lambda c: LN_CASES[c][1])


def _row_positions(R, L):
    picks = list(dict.fromkeys([(R - 1, 0), (0, L - 1), (R // 2, BLOCK if L > BLOCK else L // 2)]))
    if R * L >= BIG:
        del picks[1:-1]
    return picks


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,threads,value", LN_PARAMS, indirect=["threads"])
def test_layer_norm_confined_to_row(case, dtype, value, threads):
    nshape, shape, affine = LN_CASES[case]
    L = int(np.prod(nshape))
    R = int(np.prod(shape)) // L

    def make():
        m = nc.LayerNorm(nshape, elementwise_affine=affine, dtype=dtype)
        if affine:
            m.weight[...] = (1.0 + 0.01 * np.arange(L)).reshape(nshape)
            m.bias[...] = (0.01 * np.arange(L) - 0.3).reshape(nshape)
        return m

    x = make_input(shape, dtype)
    dy = make_dy(shape, dtype)
    clean = run_clean(("ln", case, dtype), make, x, dy)
    every_column = np.ones(nshape, bool)
    for r, j in _row_positions(R, L):
        idx = tuple(int(i) for i in np.unravel_index(r * L + j, shape))
        where = f"{case} {value} at {idx} (row {r})"
        row = np.zeros((R, L), bool)
        row[r] = True
        row = row.reshape(shape)
        out = run(make, poisoned(x, idx, VALUES[value]), dy)
        check(out["y"], clean["y"], row, row, f"y ({where})")
        check(out["dx"], clean["dx"], row, row, f"dx ({where})")
        if affine:
            # dweight[j] = sum over rows of dy * xhat: the poisoned row's xhat is non-finite in
            # every column, so is every column of dweight. dbias = sum of dy: finite.
            check(out["grads"]["weight"], clean["grads"]["weight"], every_column, every_column,
                  f"dweight ({where})")
            check_finite(out["grads"]["bias"], clean["grads"]["bias"], f"dbias = sum(dy) ({where})")

        # Only dy poisoned at (r, j): dx of row r; dweight and dbias of column j only.
        out = run(make, x, poisoned(dy, idx, VALUES[value]))
        check_finite(out["y"], clean["y"], f"y (dy {where})")
        check(out["dx"], clean["dx"], row, row, f"dx (dy {where})")
        if affine:
            col = np.zeros(L, bool)
            col[j] = True
            col = col.reshape(nshape)
            check(out["grads"]["weight"], clean["grads"]["weight"], col, None, f"dweight (dy {where})")
            check(out["grads"]["bias"], clean["grads"]["bias"], col, col, f"dbias (dy {where})")


# -- LocalResponseNorm ------------------------------------------------------------------------
LRN_CASES = {
    "size3-1d": (3, 0.75, (2, 7, 5)),
    "size4-even-2d": (4, 0.5, (2, 9, 4, 4)),
    "size5-general-beta": (5, 0.6, (3, 6, 40, 40)),
    "size5-threaded": (5, 0.75, (2, 16, 48, 48)),
    "size1": (1, 0.75, (2, 4, 3)),
    "size-over-C": (9, 0.75, (2, 5, 6)),
}
LRN_PARAMS = with_threads(LRN_CASES, lambda c: LRN_CASES[c][2])


def lrn_forward_reach(C, c, size):
    """Channels whose window [c' - size//2, c' + (size-1)//2] holds channel c."""
    return [cp for cp in range(C) if cp - size // 2 <= c <= cp + (size - 1) // 2]


def lrn_backward_reach(C, c, size):
    """Channels whose dx depends on x[c]: through s_c' (c in the window of c') and through the
    terms u_c'' of the channels c'' in the window sums of the backward: |c' - c| <= size - 1."""
    return [cp for cp in range(C) if abs(cp - c) <= size - 1]


def lrn_dy_reach(C, c, size):
    """Channels whose dx depends on dy[c]: c' with c in [c' - (size-1)//2, c' + size//2]."""
    return [cp for cp in range(C) if cp - (size - 1) // 2 <= c <= cp + size // 2]


def test_lrn_reach_matches_the_reference():
    """The dependency sets used below are those of tests/reference.py (float64): a NaN at channel
    c makes exactly these outputs NaN."""
    for size in (1, 2, 3, 4, 5, 6, 9):
        for C in (1, 3, 5, 8):
            for c in range(C):
                x = make_input((1, C, 2), np.float64)
                dy = make_dy((1, C, 2), np.float64)
                xp = poisoned(x, (0, c, 1), np.nan)
                y = ref.local_response_norm_forward(xp, size, 1e-2, 0.75, 1.0)
                assert np.flatnonzero(np.isnan(y[0, :, 1])).tolist() == lrn_forward_reach(C, c, size)
                assert np.isfinite(y[0, :, 0]).all()
                dx = ref.local_response_norm_backward(xp, dy, size, 1e-2, 0.75, 1.0)
                assert np.flatnonzero(np.isnan(dx[0, :, 1])).tolist() == lrn_backward_reach(C, c, size)
                dx = ref.local_response_norm_backward(x, poisoned(dy, (0, c, 1), np.nan), size, 1e-2, 0.75, 1.0)
                assert np.flatnonzero(np.isnan(dx[0, :, 1])).tolist() == lrn_dy_reach(C, c, size)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,threads,value", LRN_PARAMS, indirect=["threads"])
def test_local_response_norm_confined_to_window(case, dtype, value, threads):
    size, beta, shape = LRN_CASES[case]
    C = shape[1]

    def make():
        return nc.LocalResponseNorm(size, alpha=0.05, beta=beta, k=1.0)

    x = make_input(shape, dtype)
    dy = make_dy(shape, dtype)
    clean = run_clean(("lrn", case, dtype), make, x, dy)
    for idx in channel_positions(shape):
        n, c = idx[:2]
        p = idx[2:]
        where = f"{case} {value} at {idx}"

        def region(channels, n=n, p=p):
            return mask(shape, (n, channels, *p))

        fwd = region(lrn_forward_reach(C, c, size))
        bwd = region(lrn_backward_reach(C, c, size))
        own = mask(shape, idx)
        out = run(make, poisoned(x, idx, VALUES[value]), dy)
        # NaN reaches the whole window. An infinite x_c makes the window sums infinite: the
        # neighbours get x * inf^-beta = 0 (finite), x_c itself inf * 0 = NaN.
        nan = value == "nan"
        check(out["y"], clean["y"], fwd, fwd if nan else own, f"y ({where})")
        check(out["dx"], clean["dx"], bwd, bwd if nan else own, f"dx ({where})")

        dyr = region(lrn_dy_reach(C, c, size))
        out = run(make, x, poisoned(dy, idx, VALUES[value]))
        check_finite(out["y"], clean["y"], f"y (dy {where})")
        check(out["dx"], clean["dx"], dyr, dyr if nan else own, f"dx (dy {where})")


# -- SwitchableNorm ---------------------------------------------------------------------------
SN_CASES = {"small": (3, 4, 5, 5), "threaded": (4, 4, 64, 70)}
SN_PARAMS = with_threads(SN_CASES, lambda c: SN_CASES[c])


# The plugin combines its (N, C) statistics in NumPy: inf - inf there warns "invalid value".
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,threads,value", SN_PARAMS, indirect=["threads"])
def test_switchable_norm_confined(case, dtype, value, threads):
    """The statistics mix IN (n, c), LN (sample n) and BN (channel c): in training a poisoned
    x[n, c] reaches sample n and channel c (and the running stats of channel c); in eval (BN
    from the running buffers) and without BN, only sample n, forward and backward. (In
    training the backward goes through the BN statistics of channel c into the LN statistics
    of every sample: dx is then NaN everywhere, as the chain rule says; only the absence of an
    exception is checked there.)"""
    SwitchableNorm2d = _import_switchable().SwitchableNorm2d
    shape = SN_CASES[case]
    C = shape[1]
    x = make_input(shape, dtype)
    dy = make_dy(shape, dtype)

    def make(training=True, using_bn=True):
        def build():
            m = affine_init(SwitchableNorm2d(C, using_bn=using_bn, dtype=dtype), C)
            m.mean_weight[...] = [0.5, -0.2, 0.1][:len(m.mean_weight)]
            m.var_weight[...] = [-0.3, 0.4, 0.2][:len(m.var_weight)]
            if using_bn:
                m.running_mean[...] = 0.1 * np.arange(C)
                m.running_var[...] = 1.0 + 0.1 * np.arange(C)
            return m.train(training)
        return build

    cleans = {label: run_clean(("sn", case, dtype, label), build, x, dy) for label, build in
              (("train", make()), ("eval", make(training=False)), ("no BN", make(using_bn=False)))}
    for idx in channel_positions(shape):
        n, c = idx[:2]
        where = f"{value} at {idx}"
        xp = poisoned(x, idx, VALUES[value])
        sample = mask(shape, n)
        cross = sample | mask(shape, (slice(None), c))
        vc = vector_mask(C, [c])

        clean, out = cleans["train"], run(make(), xp, dy)
        check(out["y"], clean["y"], cross, cross, f"y (train, {where})")
        for name in ("running_mean", "running_var"):
            check(out[name], clean[name], vc, vc, f"{name} (train, {where})")

        for label, build in (("eval", make(training=False)), ("no BN", make(using_bn=False))):
            clean, out = cleans[label], run(build, xp, dy)
            check(out["y"], clean["y"], sample, sample, f"y ({label}, {where})")
            check(out["dx"], clean["dx"], sample, sample, f"dx ({label}, {where})")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bad", [-1.0, -np.inf])
def test_eval_with_negative_running_var_gives_nan_in_that_channel(bad, layout):
    """A running variance below -eps is invalid: that channel is NaN, as 1 / sqrt(var + eps) is
    in PyTorch, not a finite scale from the kernels' clamp at 0. A small negative one above -eps
    stays finite (var + eps > 0), as in PyTorch."""
    rng = np.random.default_rng(11)
    m = nc.BatchNorm2d(3).eval()
    m.running_var[...] = [1.0, bad, -1e-7]
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    if layout == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    y = m(x)
    assert np.isfinite(y[:, 0]).all() and np.isnan(y[:, 1]).all() and np.isfinite(y[:, 2]).all()
    expected = x[:, 2] / np.sqrt(np.float64(-1e-7) + m.eps)
    np.testing.assert_allclose(y[:, 2], expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("make", [lambda dt: nc.BatchNorm2d(3, dtype=dt),
                                  lambda dt: nc.InstanceNorm2d(3, affine=True, track_running_stats=True, dtype=dt)],
                         ids=["bn", "in"])
def test_eval_backward_keeps_an_infinite_dy_infinite(make, layout, dtype):
    """Eval: dx = weight * rstd * dy exactly, so +inf / -inf in dy stay +inf / -inf, as in torch
    (issue 12, item 7: a*dy + 0*dy + 0 made them NaN); every other position is that product."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 2, 2)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    dy[0, 1, 0, 0], dy[1, 2, 1, 1] = np.inf, -np.inf
    if layout == "channels_last":
        x, dy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) for a in (x, dy))
    m = make(dtype)
    m.weight[...] = [0.5, 2.0, -1.5]
    m.running_var[...] = [0.25, 4.0, 1.0]
    m.eval()
    m(x)
    dx = m.backward(dy)
    assert dx[0, 1, 0, 0] == np.inf and dx[1, 2, 1, 1] == np.inf  # weight[2] < 0
    scale = m.weight.astype(np.float64) / np.sqrt(m.running_var.astype(np.float64) + m.eps)
    expected = (scale.reshape(1, 3, 1, 1) * dy.astype(np.float64)).astype(dtype)
    np.testing.assert_array_equal(dx, expected)
