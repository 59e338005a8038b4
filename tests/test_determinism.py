"""Results are bitwise identical for any number of threads.

The kernels cut work into pieces whose sizes depend only on the shape (BLOCK = 4096 elements
of a row, summed in 16 fixed lanes; at most 64 row chunks of >= 64 rows for LayerNorm's column
sums) and merge the pieces in a fixed order, so 1, 2 or 3 threads (and the default) must give
the same bits. group_forward / group_backward also switch between one task per group (fused)
and passes over blocks (split) with the thread count; both paths must give the same bits. Every input here has at least PARALLEL_MIN = 65536 elements, so with more than
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
from normcore._kernels.apply_rows import apply_rows, apply_rows_backward
from normcore._kernels.engine import channel_forward
from normcore._kernels.grad_sums import row_grad_sums, row_grad_sums_weighted
from normcore._kernels.engine import group_backward, group_forward
from normcore._kernels.engine import layer_backward, layer_forward
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
    for ww, bb in ((w, bias), (w, None), (None, None)):
        y, lm, lr = np.empty_like(x), rows(), rows()
        layer_forward(x, y, ww, bb, 1e-5, lm, lr, n_threads)
        out += [y, lm, lr]
    for ww in (w, None):
        dx, dw, db = np.empty_like(x), np.empty(L), np.empty(L)
        layer_backward(x, dy, dx, ww, lm, lr, dw, db, n_threads)
        dx2 = np.empty_like(x)
        layer_backward(x, dy, dx2, ww, lm, lr, None, None, n_threads)
        out += [dx, dw, db, dx2]
    # k = 1 (InstanceNorm: many groups, fused) and k = R / C with 2 or more groups
    # (few groups: split with more than one thread).
    for k in (1, R // C):
        out += _group_outputs(x, dy, k, C, rng, n_threads)
    return out


def _group_outputs(x, dy, k, C, rng, n_threads):
    R = x.shape[0]
    G = R // k
    weight, bias = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    y = np.empty_like(x)
    mean, m2, rstd = np.empty(G), np.empty(G), np.empty(G)
    group_forward(x, y, k, C, weight, bias, 1e-5, mean, m2, rstd, n_threads)
    dx, sdy, sdyxc = np.empty_like(x), np.empty(R), np.empty(R)
    group_backward(x, dy, dx, k, C, weight, mean, rstd, sdy, sdyxc, n_threads)
    return [y, mean, m2, rstd, dx, sdy, sdyxc]


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
def test_layer_backward_many_chunks(dtype):
    """R > 64 * 64 rows (64 chunks of ceil(R / 64) rows, the last one short), L > 1024."""
    R, L = 4161, 1030
    rng = np.random.default_rng(7)
    x = rng.standard_normal((R, L)).astype(dtype)
    dy = rng.standard_normal((R, L)).astype(dtype)
    w = rng.uniform(0.5, 1.5, L).astype(dtype)
    mean, rstd = rng.standard_normal(R), rng.uniform(0.5, 2.0, R)
    results = {}
    for n in KERNEL_THREADS:
        dx, dw, db = np.empty_like(x), np.empty(L), np.empty(L)
        layer_backward(x, dy, dx, w, mean, rstd, dw, db, n)
        results[n] = [dx, dw, db]
    assert_same_bits(results)


# (R, L, k, C): few groups over PARALLEL_MIN (split with 2, 3 and 8 threads, fused with 1);
# L not a multiple of 16; blocks crossing rows when k > 1.
GROUP_SPLIT = [(4, 20001, 2, 4), (4, 16411, 1, 2), (2, 40003, 2, 1), (6, 11111, 3, 2)]


@pytest.mark.parametrize("case", GROUP_SPLIT, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_groups_fused_vs_split(dtype, case):
    R, L, k, C = case
    assert R * L >= PARALLEL_MIN and R // k < 4 * min(n for n in KERNEL_THREADS if n > 1)
    rng = np.random.default_rng(8)
    x = (5.0 + 3.0 * rng.standard_normal((R, L))).astype(dtype)
    dy = rng.standard_normal((R, L)).astype(dtype)
    results = {n: _group_outputs(x, dy, k, C, np.random.default_rng(9), n) for n in KERNEL_THREADS}
    assert_same_bits(results)


# (R, L, C) for channel_forward: rows of several blocks with a tail (row statistics on the
# stack), C = 1 with long rows (N = 2), many short rows (malloc), C = R (N = 1, malloc),
# malloc with rows of several blocks, and rows shorter than a block with the stack.
CHANNEL_SHAPES = [(20, 3 * BLOCK + 5, 4), (2, 40003, 1), (30003, 3, 3), (3000, 300, 3000), (260, BLOCK + 4, 4),
                  (130, 1030, 10)]


def _channel_outputs(x, C, n_threads):
    """channel_forward with batch statistics and with given ones (out of place and in place):
    y and the per-channel outputs, each a fresh array."""
    rng = np.random.default_rng(10)
    weight, bias = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    out = []
    for batch_stats in (True, False):
        for in_place in (False, True):
            xx = x.copy()
            y = xx if in_place else np.empty_like(x)
            mean = np.empty(C) if batch_stats else 5.0 + rng.standard_normal(C)
            m2 = np.empty(C) if batch_stats else rng.uniform(0.5, 2.0, C)
            rstd = np.empty(C)
            channel_forward(xx, y, C, weight, bias, 1e-5, mean, m2, rstd, batch_stats, n_threads)
            out += [y, mean, m2, rstd]
    return out


@pytest.mark.parametrize("case", CHANNEL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_forward(dtype, case):
    R, L, C = case
    assert R * L >= PARALLEL_MIN and R % C == 0
    rng = np.random.default_rng(11)
    x = (5.0 + 3.0 * rng.standard_normal((R, L))).astype(dtype)
    assert_same_bits({n: _channel_outputs(x, C, n) for n in KERNEL_THREADS})


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
                                      ("2", TypeError), (nc.threads.MAX_THREADS + 1, ValueError),
                                      (100_000, ValueError), (2**31, ValueError), (10**400, ValueError)])
def test_set_num_threads_rejects(bad, exc):
    """Refused at the setter, with the range in the message, and the setting left as it was
    (issue 12, item 2: 2**31 made every later call raise OverflowError, 100_000 crashed)."""
    nc.set_num_threads(3)
    try:
        with pytest.raises(exc, match="positive int or None" if exc is TypeError else "from 1 to 1024"):
            nc.set_num_threads(bad)
        assert nc.get_num_threads() == 3
        m = nc.BatchNorm2d(4)
        m(np.ones((8, 4, 64, 64), np.float32))
    finally:
        nc.set_num_threads(None)


def test_the_largest_thread_count_works_and_a_larger_openmp_default_is_clamped():
    """MAX_THREADS threads run (a team of 1024 on 2 cores: slow, correct); OMP_NUM_THREADS
    beyond it is clamped with one warning, in a subprocess."""
    x = np.random.default_rng(0).normal(size=(8, 4, 64, 64)).astype(np.float32)
    m = nc.BatchNorm2d(4)
    expected = m(x)
    nc.set_num_threads(nc.threads.MAX_THREADS)
    try:
        assert np.array_equal(nc.BatchNorm2d(4)(x), expected)
    finally:
        nc.set_num_threads(None)
    script = textwrap.dedent("""
        import warnings
        import numpy as np, normcore as nc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            n = nc.get_num_threads()
            nc.get_num_threads()
            nc.GroupNorm(2, 4)(np.ones((8, 4, 64, 64), np.float32))
        print(n, len([w for w in caught if "at most 1024" in str(w.message)]))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="100000")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1024", "1"]


_ISA_SCRIPT = r"""
import sys
import numpy as np
import normcore as nc

rng = np.random.default_rng(5)
out = {}
x = (rng.standard_normal((4, 8, 37, 41)) * 3 + 2).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
xl = (rng.standard_normal((70, 4100)) + 1e3).astype(np.float32)
dyl = rng.standard_normal(xl.shape).astype(np.float32)
for name, m, a, g in [("bn", nc.BatchNorm2d(8), x, dy), ("in", nc.InstanceNorm2d(8, affine=True), x, dy),
                      ("gn", nc.GroupNorm(2, 8), x, dy), ("ln", nc.LayerNorm(4100), xl, dyl),
                      ("bn64", nc.BatchNorm2d(8, dtype=np.float64), x.astype(np.float64), dy.astype(np.float64))]:
    out[name + "_y"] = m.forward(a)
    out[name + "_dx"] = m.backward(g)
    out[name + "_dw"] = m.grads["weight"]
xc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels-last
for name, m in [("bn_cl", nc.BatchNorm2d(8)), ("gn_cl", nc.GroupNorm(4, 8))]:
    out[name + "_y"] = m.forward(xc)
    out[name + "_dx"] = m.backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))
for dtype in (np.float32, np.float64):
    m = nc.LocalResponseNorm(5)
    out[f"lrn_{dtype.__name__}_y"] = m.forward(x.astype(dtype))
    out[f"lrn_{dtype.__name__}_dx"] = m.backward(dy.astype(dtype))
m = nc.LocalResponseNorm(3, beta=0.6)
out["lrn_pow_y"] = m.forward(x)
out["lrn_pow_dx"] = m.backward(dy)
m = nc.BatchNorm2d(8).eval()
out["bn_eval_y"] = m.forward(x)
out["bn_eval_dx"] = m.backward(dy)
from normcore._kernels import openmp_info
out["isa"] = np.array(openmp_info.instruction_set())
np.savez(sys.argv[1], **out)
"""


def test_same_bits_on_every_instruction_set(tmp_path):
    """Every kernel entry point is compiled for the baseline, AVX2 and AVX-512 and bound to one
    of them when the module loads (pyx/dispatch.h); NORMCORE_ISA caps the choice, so each
    variant this CPU can run is run here, the baseline included. With 16 fixed lanes and no
    FMA they give the same bits."""
    import os
    import subprocess
    import sys

    from normcore._kernels import openmp_info

    levels = openmp_info.instruction_sets()
    assert levels[0] == "baseline"
    script = tmp_path / "isa.py"
    script.write_text(_ISA_SCRIPT)
    results = {}
    for level in levels:
        path = tmp_path / f"out_{level}.npz"
        env = dict(os.environ, NORMCORE_ISA=level, OMP_NUM_THREADS="2")
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env, timeout=120)
        results[level] = np.load(path)
        assert str(results[level]["isa"]) == level  # the variant asked for is the one that ran
    first = results["baseline"]
    for level in levels[1:]:
        assert sorted(first.files) == sorted(results[level].files)
        for key in first.files:
            if key != "isa":
                assert np.array_equal(first[key], results[level][key]), (level, key)


def test_an_unknown_instruction_set_name_is_reported():
    import os
    import subprocess
    import sys

    env = dict(os.environ, NORMCORE_ISA="sse9")
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", "import normcore"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "NORMCORE_ISA" in out.stderr and "'sse9'" in out.stderr and "avx2" in out.stderr
