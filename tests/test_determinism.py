"""Results are bitwise identical for any number of threads.

The kernels cut work into pieces whose sizes depend only on the shape (BLOCK = 4096 elements
of a row, at most 64 row chunks of >= 64 rows and COL_BLOCK = 1024 columns for the column
sums) and merge the pieces in a fixed order, so 1, 2 or 3 threads (and the default) must give
the same bits. Every input here has at least PARALLEL_MIN = 65536 elements, so with more than
one thread the kernels really start a thread team, and several inputs have rows longer than
one block. Comparisons are on the raw bytes (dtype, shape and tobytes()), so -0.0 vs 0.0 or
two different NaN payloads would count as differences.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normcore as nc
import normcore.functional as F
from normcore._kernels.apply_cols import apply_cols, apply_cols_backward, col_param_grads
from normcore._kernels.apply_rows import apply_rows, apply_rows_backward
from normcore._kernels.grad_sums import row_grad_sums, row_grad_sums_weighted
from normcore._kernels.moments import row_moments

PARALLEL_MIN = 65536
BLOCK = 4096
THREADS = (1, 2, 3, None)  # None: the default (OpenMP's, i.e. all cores here)
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def default_threads():
    """Every test starts and ends with the default thread count."""
    nc.set_num_threads(None)
    yield
    nc.set_num_threads(None)


def bits(a):
    """The exact bits of an array as (dtype, shape, bytes)."""
    a = np.ascontiguousarray(a)
    return a.dtype.str, a.shape, a.tobytes()


def assert_same_bits(results):
    """results: {n_threads: [arrays]}; every entry must equal the first one bit for bit."""
    (n0, ref), *others = results.items()
    for n, res in others:
        assert len(res) == len(ref)
        for i, (a, b) in enumerate(zip(ref, res)):
            if bits(a) != bits(b):
                ua = np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")
                ub = np.ascontiguousarray(b).view(f"u{b.dtype.itemsize}")
                diff = int(np.count_nonzero(ua != ub)) if ua.shape == ub.shape else "shape"
                raise AssertionError(f"output {i}: {n0} threads and {n} threads differ ({diff} elements)")


def over_threads(fn):
    """fn() run with each thread count set through nc.set_num_threads."""
    results = {}
    for n in THREADS:
        nc.set_num_threads(n)
        try:
            results[n] = [np.array(r, copy=True) for r in fn()]
        finally:
            nc.set_num_threads(None)
    return results


# ------------------------------------------------------------------------------- layers

def _affine(layer, rng):
    """Random weight and bias (so that they matter), in the layer's dtype."""
    if getattr(layer, "weight", None) is not None:
        layer.weight[...] = rng.uniform(0.5, 1.5, layer.weight.shape)
    if getattr(layer, "bias", None) is not None:
        layer.bias[...] = rng.standard_normal(layer.bias.shape)


# name -> (layer factory taking dtype, input shape, mode)
LAYERS = {
    "BatchNorm1d-2d-input": (lambda dt: nc.BatchNorm1d(16, dtype=dt), (8192, 16), "train"),
    "BatchNorm1d": (lambda dt: nc.BatchNorm1d(16, dtype=dt), (64, 16, 100), "train"),
    "BatchNorm2d": (lambda dt: nc.BatchNorm2d(16, dtype=dt), (8, 16, 40, 40), "train"),
    "BatchNorm2d-long-rows": (lambda dt: nc.BatchNorm2d(4, dtype=dt), (2, 4, 100, 100), "train"),
    "BatchNorm2d-eval": (lambda dt: nc.BatchNorm2d(16, dtype=dt), (8, 16, 40, 40), "eval"),
    "BatchNorm3d": (lambda dt: nc.BatchNorm3d(4, dtype=dt), (2, 4, 10, 30, 40), "train"),
    "InstanceNorm2d": (lambda dt: nc.InstanceNorm2d(16, affine=True, dtype=dt), (8, 16, 40, 40), "train"),
    "InstanceNorm2d-long-rows": (
        lambda dt: nc.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=dt), (2, 4, 100, 100), "train"),
    "GroupNorm": (lambda dt: nc.GroupNorm(4, 16, dtype=dt), (8, 16, 40, 40), "train"),
    "GroupNorm-long-rows": (lambda dt: nc.GroupNorm(2, 4, dtype=dt), (2, 4, 100, 100), "train"),
    "LayerNorm": (lambda dt: nc.LayerNorm(300, dtype=dt), (3000, 300), "train"),
    "LayerNorm-no-affine": (lambda dt: nc.LayerNorm(300, elementwise_affine=False, dtype=dt), (3000, 300), "train"),
    "LayerNorm-no-bias": (lambda dt: nc.LayerNorm(300, bias=False, dtype=dt), (3000, 300), "train"),
    "LayerNorm-2d-shape": (lambda dt: nc.LayerNorm((64, 192), dtype=dt), (8, 64, 192), "train"),
    "LayerNorm-2d-shape-no-affine": (
        lambda dt: nc.LayerNorm((64, 64 * 3), elementwise_affine=False, dtype=dt), (8, 64, 64 * 3), "train"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_backward(name, dtype):
    factory, shape, mode = LAYERS[name]
    assert np.prod(shape) >= PARALLEL_MIN
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)

    def step():
        layer = factory(dtype)
        _affine(layer, np.random.default_rng(1))
        if mode == "eval":
            layer.running_mean[...] = np.random.default_rng(2).standard_normal(layer.num_features)
            layer.running_var[...] = np.random.default_rng(3).uniform(0.5, 2.0, layer.num_features)
            layer.eval()
        y = layer(x)
        dx = layer.backward(dy)
        assert y.dtype == dx.dtype == dtype
        grads = [layer.grads[k] for k in sorted(layer.grads)]
        state = [v for _, v in sorted(layer.state_dict().items())]  # running statistics too
        return [y, dx, *grads, *state]

    assert_same_bits(over_threads(step))


# --------------------------------------------------------------------------- functional

def _functional_cases(dtype):
    rng = np.random.default_rng(4)
    x4 = (1.0 + rng.standard_normal((8, 16, 40, 40))).astype(dtype)
    xl = (1.0 + rng.standard_normal((2, 4, 100, 100))).astype(dtype)
    x2 = (1.0 + rng.standard_normal((3000, 300))).astype(dtype)
    x3 = (1.0 + rng.standard_normal((8, 64, 192))).astype(dtype)
    w16, b16 = rng.uniform(0.5, 1.5, 16).astype(dtype), rng.standard_normal(16).astype(dtype)
    w4, b4 = w16[:4].copy(), b16[:4].copy()
    wl, bl = rng.uniform(0.5, 1.5, 300).astype(dtype), rng.standard_normal(300).astype(dtype)
    w3, b3 = rng.uniform(0.5, 1.5, (64, 192)).astype(dtype), rng.standard_normal((64, 192)).astype(dtype)

    def with_running(call, C):
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        return [call(rm, rv), rm, rv]

    return {
        "batch_norm-train": lambda: with_running(lambda rm, rv: F.batch_norm(x4, rm, rv, w16, b16, training=True), 16),
        "batch_norm-train-long-rows": lambda: with_running(
            lambda rm, rv: F.batch_norm(xl, rm, rv, w4, b4, training=True), 4),
        "batch_norm-eval": lambda: [F.batch_norm(x4, b16 * 0.1, w16, w16, b16, training=False)],
        "instance_norm": lambda: with_running(lambda rm, rv: F.instance_norm(xl, rm, rv, w4, b4), 4),
        "instance_norm-no-affine": lambda: [F.instance_norm(x4)],
        "layer_norm": lambda: [F.layer_norm(x2, (300,), wl, bl)],
        "layer_norm-no-affine": lambda: [F.layer_norm(x2, 300)],
        "layer_norm-2d-shape": lambda: [F.layer_norm(x3, (64, 192), w3, b3)],
        "layer_norm-2d-shape-weight-only": lambda: [F.layer_norm(x3, (64, 192), w3)],
        "group_norm": lambda: [F.group_norm(x4, 4, w16, b16)],
        "group_norm-long-rows": lambda: [F.group_norm(xl, 2, w4, b4)],
    }


FUNCTIONAL = list(_functional_cases(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional(name, dtype):
    call = _functional_cases(dtype)[name]
    assert_same_bits(over_threads(call))


# ------------------------------------------------------------------------------ kernels

KERNEL_SHAPES = [(20, 3 * BLOCK + 5), (30003, 3), (3000, 300), (130, 1030)]
KERNEL_THREADS = (1, 2, 3, 8)


def _kernel_outputs(x, dy, n_threads):
    """Every kernel on x, dy (rows [R, L]) with n_threads; each output a fresh array."""
    R, L = x.shape
    rng = np.random.default_rng(5)
    dt = x.dtype
    C = next(d for d in range(2, R + 1) if R % d == 0)  # a period dividing R (R if prime)
    out = []

    def rows():
        return np.empty(R)

    mean, m2 = rows(), rows()
    row_moments(x, mean, m2, n_threads)
    out += [mean, m2]
    rstd = 1.0 / np.sqrt(m2 / L + 1e-5)
    w = rng.uniform(0.5, 1.5, L).astype(dt)
    bias = rng.standard_normal(L).astype(dt)
    for period in (C, R):
        cen, a, b, c = (rng.standard_normal(period) for _ in range(4))
        s, t = rows(), rows()
        row_grad_sums(x, dy, cen, period, s, t, n_threads)
        sw, tw = rows(), rows()
        row_grad_sums_weighted(x, dy, w, cen, period, sw, tw, n_threads)
        y, dx = np.empty_like(x), np.empty_like(x)
        apply_rows(x, y, cen, a, b, period, n_threads)
        apply_rows_backward(dy, x, dx, cen, a, b, c, period, n_threads)
        out += [s, t, sw, tw, y, dx]
    for bb in (bias, None):
        y = np.empty_like(x)
        apply_cols(x, y, mean, rstd, w, bb, n_threads)
        out.append(y)
    a, b, c = (rng.standard_normal(R) for _ in range(3))
    dx = np.empty_like(x)
    apply_cols_backward(dy, x, dx, mean, a, b, c, w, n_threads)
    dw, db = np.empty(L), np.empty(L)
    col_param_grads(x, dy, mean, rstd, dw, db, n_threads)
    out += [dx, dw, db]
    return out


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels(dtype, shape):
    assert np.prod(shape) >= PARALLEL_MIN
    rng = np.random.default_rng(6)
    x = (5.0 + 3.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = {n: _kernel_outputs(x, dy, n) for n in KERNEL_THREADS}
    assert_same_bits(results)


@pytest.mark.parametrize("dtype", DTYPES)
def test_col_param_grads_many_chunks(dtype):
    """R > 64 * 64 rows (64 chunks of ceil(R / 64) rows, the last one short), L > COL_BLOCK."""
    R, L = 4161, 1030
    rng = np.random.default_rng(7)
    x = rng.standard_normal((R, L)).astype(dtype)
    dy = rng.standard_normal((R, L)).astype(dtype)
    center, scale = rng.standard_normal(R), rng.uniform(0.5, 2.0, R)
    results = {}
    for n in KERNEL_THREADS:
        dw, db = np.empty(L), np.empty(L)
        col_param_grads(x, dy, center, scale, dw, db, n)
        results[n] = [dw, db]
    assert_same_bits(results)


# ------------------------------------------------------------------------------ threads

@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to count threads")
def test_threads_start_only_from_parallel_min():
    """The comparisons above are not vacuous: a kernel given 3 threads starts a thread team
    on PARALLEL_MIN elements, and none on one element fewer (counted in a fresh process)."""
    if not nc.openmp_enabled():
        pytest.skip("kernels built without OpenMP")
    script = textwrap.dedent(f"""
        import os, numpy as np
        from normcore._kernels.moments import row_moments
        count = lambda: len(os.listdir("/proc/self/task"))
        m = np.empty(16)
        before = count()
        row_moments(np.ones((16, {PARALLEL_MIN} // 16 - 1)), m, m.copy(), 3)
        small = count()
        row_moments(np.ones((16, {PARALLEL_MIN} // 16)), m, m.copy(), 3)
        print(before, small, count())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, small, large = map(int, out.stdout.split())
    assert small == before
    assert large > before  # 2 more with OpenMP's usual settings



def test_get_num_threads_follows_threadpoolctl_and_set_num_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not nc.openmp_enabled():
        pytest.skip("kernels built without OpenMP")
    default = nc.get_num_threads()
    assert default >= 1
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert nc.get_num_threads() == 1
        nc.set_num_threads(3)  # an explicit request wins over the OpenMP limit...
        assert nc.get_num_threads() == 3
        nc.set_num_threads(None)  # ...and None follows OpenMP again
        assert nc.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(2, user_api="openmp"):
        assert nc.get_num_threads() == 2
    assert nc.get_num_threads() == default
    nc.set_num_threads(5)
    assert nc.get_num_threads() == 5


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError),
                                      ("2", TypeError)])
def test_set_num_threads_rejects(bad, exc):
    with pytest.raises(exc):
        nc.set_num_threads(bad)
    assert nc.get_num_threads() >= 1
