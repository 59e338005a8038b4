"""Channels-last input: x (N, C, *spatial) whose memory is (N, *spatial, C) C-contiguous.

BatchNorm, InstanceNorm and GroupNorm read such an x without a transposing copy, as an
[N, L, C] view, through a channels-last Plan of the engine (pyx/engine.pyx,
pyx/channels_last.pxi, pyx/cl_ops.h), and return y and dx channels-last too. Here:

1. layers: a channels-last x gives the y, dx, parameter gradients and running statistics of
   the same layer fed the C-contiguous copy of x, over training steps then eval; y and dx
   are channels-last; x (and dy) are left alone; dy in either layout gives the same dx;
2. against torch.nn on channels-last tensors;
3. the channels-last Plan, every grouping (per channel, groups of consecutive channels;
   batch and given statistics), forward and backward, against a plain float64 NumPy twin
   written here (sizes around the 256 positions of a chunk and the 4 rows of the unrolled
   column sums);
4. bitwise determinism over 1, 2 and 3 threads, through both ways of running
   consecutive-channel groups (one sample per task, or separate passes), in the Plan and in
   the layers;
5. a constant channel normalises to exactly beta, a NaN stays in its channel.

Sizes that matter (pyx/cl_ops.h, pyx/chunking.pxd): NC_CL_CHUNK = 256 positions of one sample
per chunk, column sums taken NC_CL_ROWS = 4 rows at a time; PARALLEL_MIN = 65536 elements
before any thread is started. InstanceNorm / GroupNorm with their own statistics run one
sample per task when N >= n_threads (or on one thread), else separate passes over chunks
(Plan.sample_tasks).
"""
import collections

import numpy as np
import pytest

import normcore as nc
from normcore import grouped
from normcore._kernels.engine import Plan

CHUNK = 256
ROWS = 4
PARALLEL_MIN = 65536
EPS = 1e-5
DTYPES = [np.float32, np.float64]
# Layers, channels-last against C-contiguous: error relative to the largest magnitude of the
# C-contiguous result. The two differ only in the order of float64 sums, so float64 agrees to
# a few 1e-16 and float32 to at most an ulp of the float32 result (mostly bit for bit).
LAYER_TOL = {np.float32: 4 * float(np.finfo(np.float32).eps), np.float64: 1e-12}
# Kernels against the float64 twins (as tests/test_kernels.py): float64 sums to 1e-12 of the
# sum of the magnitudes of their terms; element-wise outputs in the array type to RTOL_OUT of
# the magnitude of the terms of their formula.
RTOL_SUM = 1e-12
RTOL_OUT = {np.float32: 1e-6, np.float64: 1e-12}


@pytest.fixture(autouse=True)
def default_threads():
    """Every test starts and ends with the default thread count."""
    nc.set_num_threads(None)
    yield
    nc.set_num_threads(None)


class PlanCalls(collections.Counter):
    """The plans grouped.py asked for: a count per layout ("channels_last", "nchw"), and the
    channels-last plans themselves in order."""

    def __init__(self):
        super().__init__()
        self.cl_plans = []


@pytest.fixture
def cl_calls(monkeypatch):
    """Counts the engine plans grouped.py runs (one per forward and per backward), by layout."""
    calls = PlanCalls()

    def spy(grouping, n_threads, channels_last=False, _fn=grouped.plan_of):
        plan = _fn(grouping, n_threads, channels_last)
        calls["channels_last" if channels_last else "nchw"] += 1
        if channels_last:
            calls.cl_plans.append(plan)
        return plan
    monkeypatch.setattr(grouped, "plan_of", spy)
    return calls


def f64(a):
    return np.asarray(a, dtype=np.float64)


def to_cl(a):
    """The same values, stored channels-last: an (N, C, *spatial) view of an (N, *spatial, C)
    C-contiguous array."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def is_cl(a, channel_axis=1):
    return np.moveaxis(a, channel_axis, -1).flags.c_contiguous


def make(rng, shape, dtype, loc=0.0, spread=1.0):
    return (loc + spread * rng.standard_normal(shape)).astype(dtype)


def assert_close(got, want, dtype, what):
    """|got - want| <= LAYER_TOL[dtype] * max|want| element-wise (NaN counts as an error)."""
    got, want = f64(got), f64(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = float(np.abs(want).max(initial=0.0))
    err = np.abs(got - want)
    bad = ~(err <= LAYER_TOL[dtype] * scale)
    if bad.any():
        i = np.flatnonzero(bad.ravel())[0]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} differ beyond {LAYER_TOL[dtype]:.1e} * "
                             f"{scale:.3g}; first at {i}: got {got.ravel()[i]!r}, want {want.ravel()[i]!r}")


def assert_within(got, want, scale, rtol, what):
    """|got - want| <= rtol * scale, element-wise (scale: magnitude of the terms of `want`)."""
    got, want, scale = f64(got), f64(want), f64(scale)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = ~(np.abs(got - want) <= rtol * scale)
    if bad.any():
        i = np.flatnonzero(bad.ravel())[0]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} outside rtol={rtol}; first at {i}: "
                             f"got {got.ravel()[i]!r}, want {want.ravel()[i]!r}, scale {scale.ravel()[i]!r}")


def same_bits(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ================================================================================ 1. layers

def randomize(m, seed):
    """The same random weight and bias for two layers built alike."""
    rng = np.random.default_rng(seed)
    for name, p in m.parameters().items():
        p[...] = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape) if name == "weight" \
            else rng.normal(0.0, 0.5, p.shape)


def state_of(m):
    return {k: np.array(v, copy=True) for k, v in m.state_dict().items()}


# id -> (factory taking dtype, input shape). Shapes: L > 256 positions and not a multiple of
# it ((17, 19): 323 = one chunk + 67; (4, 9, 9): 324); N = 1; H = 1 (L = W); C = 1 and L = 1,
# whose channels-last copy is also C-contiguous (the NCHW path; kept to check the dispatch).
LAYER_CASES = {
    "bn2d": (lambda dt: nc.BatchNorm2d(5, dtype=dt), (3, 5, 17, 19)),
    "bn2d-small": (lambda dt: nc.BatchNorm2d(3, dtype=dt), (4, 3, 6, 5)),
    "bn2d-N1": (lambda dt: nc.BatchNorm2d(4, dtype=dt), (1, 4, 5, 6)),
    "bn2d-H1": (lambda dt: nc.BatchNorm2d(3, dtype=dt), (4, 3, 1, 7)),
    "bn2d-C1": (lambda dt: nc.BatchNorm2d(1, dtype=dt), (5, 1, 4, 4)),
    "bn2d-L1": (lambda dt: nc.BatchNorm2d(3, dtype=dt), (6, 3, 1, 1)),
    "bn2d-momentum-None": (lambda dt: nc.BatchNorm2d(3, momentum=None, dtype=dt), (2, 3, 9, 31)),
    "bn2d-no-affine-no-stats": (
        lambda dt: nc.BatchNorm2d(3, affine=False, track_running_stats=False, dtype=dt), (2, 3, 9, 31)),
    "bn1d": (lambda dt: nc.BatchNorm1d(5, dtype=dt), (4, 5, 7)),
    "bn1d-long": (lambda dt: nc.BatchNorm1d(4, dtype=dt), (3, 4, 300)),
    "bn3d": (lambda dt: nc.BatchNorm3d(3, dtype=dt), (2, 3, 3, 4, 5)),
    "bn3d-long": (lambda dt: nc.BatchNorm3d(3, dtype=dt), (2, 3, 4, 9, 9)),
    "in2d": (lambda dt: nc.InstanceNorm2d(5, dtype=dt), (3, 5, 17, 19)),
    "in2d-affine": (lambda dt: nc.InstanceNorm2d(5, affine=True, dtype=dt), (3, 5, 17, 19)),
    "in2d-stats": (lambda dt: nc.InstanceNorm2d(5, track_running_stats=True, dtype=dt), (3, 5, 17, 19)),
    "in2d-affine-stats": (
        lambda dt: nc.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=dt), (2, 4, 6, 5)),
    "in2d-N1": (lambda dt: nc.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=dt), (1, 4, 5, 6)),
    "in2d-H1": (lambda dt: nc.InstanceNorm2d(3, affine=True, dtype=dt), (4, 3, 1, 7)),
    "in2d-C1": (lambda dt: nc.InstanceNorm2d(1, affine=True, track_running_stats=True, dtype=dt), (3, 1, 4, 4)),
    "in2d-unbatched": (lambda dt: nc.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=dt),
                       (4, 6, 5)),
    "in1d": (lambda dt: nc.InstanceNorm1d(5, affine=True, track_running_stats=True, dtype=dt), (4, 5, 7)),
    "in1d-long": (lambda dt: nc.InstanceNorm1d(3, dtype=dt), (2, 3, 300)),
    "in1d-unbatched": (lambda dt: nc.InstanceNorm1d(3, affine=True, dtype=dt), (3, 260)),
    "in3d": (lambda dt: nc.InstanceNorm3d(3, affine=True, track_running_stats=True, dtype=dt), (2, 3, 4, 9, 9)),
    "gn-G1": (lambda dt: nc.GroupNorm(1, 6, dtype=dt), (3, 6, 17, 19)),
    "gn-G3": (lambda dt: nc.GroupNorm(3, 6, dtype=dt), (3, 6, 17, 19)),
    "gn-GC": (lambda dt: nc.GroupNorm(6, 6, dtype=dt), (3, 6, 17, 19)),
    "gn-no-affine": (lambda dt: nc.GroupNorm(2, 4, affine=False, dtype=dt), (2, 4, 5, 6)),
    "gn-N1": (lambda dt: nc.GroupNorm(2, 8, dtype=dt), (1, 8, 5, 6)),
    "gn-3d-input": (lambda dt: nc.GroupNorm(2, 4, dtype=dt), (3, 4, 300)),
    "gn-5d-input": (lambda dt: nc.GroupNorm(3, 6, dtype=dt), (2, 6, 3, 4, 5)),
    "gn-C1": (lambda dt: nc.GroupNorm(1, 1, dtype=dt), (3, 1, 4, 4)),
}


def unbatched(shape, m):
    return isinstance(m, (nc.InstanceNorm1d, nc.InstanceNorm2d, nc.InstanceNorm3d)) and \
        len(shape) == m._no_batch_dim


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_matches_c_contiguous(case, dtype, cl_calls):
    """Three training steps then two eval steps on two identical layers, one fed the
    channels-last x, the other its C-contiguous copy: same y, dx, gradients and state."""
    factory, shape = LAYER_CASES[case]
    ref, m = factory(dtype), factory(dtype)
    randomize(ref, 1)
    randomize(m, 1)
    unb = unbatched(shape, m)
    layout = (lambda a: to_cl(a[None])[0]) if unb else to_cl
    ch = 0 if unb else 1
    rng = np.random.default_rng(2)
    steps = 3
    for step in range(steps + 2):
        if step == steps:
            ref.eval()
            m.eval()
        a = make(rng, shape, dtype, loc=1.0, spread=2.0)
        g = make(rng, shape, dtype)
        x, dy_cl = layout(a), layout(g)
        assert is_cl(x, ch) and np.array_equal(x, a)
        through_cl = not x.flags.c_contiguous  # C = 1 or L = 1: channels-last is C-contiguous too
        x_before, dy_before = x.copy(order="K"), dy_cl.copy(order="K")

        calls = cl_calls["channels_last"]
        y_ref = ref(a)
        dx_ref = ref.backward(g)
        assert cl_calls["channels_last"] == calls, "a C-contiguous x went through the channels-last kernels"
        y = m(x)
        dx = m.backward(dy_cl)
        assert cl_calls["channels_last"] == calls + 2 * through_cl, "channels-last x did not take the channels-last path"
        grads = {k: v.copy() for k, v in m.grads.items()}
        dx2 = m.backward(g)  # dy in NCHW layout for a channels-last forward

        what = f"{case} step {step}"
        # the inputs are untouched
        assert same_bits(x, x_before) and x.strides == x_before.strides, f"{what}: x modified"
        assert same_bits(dy_cl, dy_before), f"{what}: dy modified"
        # layout, dtype, no aliasing of the input
        for name, out in (("y", y), ("dx", dx), ("dx from NCHW dy", dx2)):
            assert out.shape == shape and out.dtype == dtype, f"{what}: {name}"
            assert is_cl(out, ch), f"{what}: {name} is not channels-last, strides {out.strides}"
            assert not np.shares_memory(out, x), f"{what}: {name} shares memory with x"
        assert not np.shares_memory(dx, dy_cl)
        # values
        assert_close(y, y_ref, dtype, f"{what}: y")
        assert_close(dx, dx_ref, dtype, f"{what}: dx")
        assert same_bits(dx2, dx), f"{what}: dx depends on the layout of dy"
        assert m.grads.keys() == ref.grads.keys() == grads.keys()
        for k in ref.grads:
            assert m.grads[k].dtype == ref.grads[k].dtype == dtype
            assert same_bits(m.grads[k], grads[k]), f"{what}: grad {k} depends on the layout of dy"
            assert_close(m.grads[k], ref.grads[k], dtype, f"{what}: grad {k}")
        s_ref, s = state_of(ref), state_of(m)
        assert s.keys() == s_ref.keys()
        for k in s_ref:
            assert s[k].dtype == s_ref[k].dtype, k
            if k == "num_batches_tracked":
                assert s[k] == s_ref[k]
            else:
                assert_close(s[k], s_ref[k], dtype, f"{what}: {k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_large_offset_and_read_only(dtype, cl_calls):
    """x = 1e4 + N(0, 1) (float32 keeps ~3 digits of the deviation), read-only, channels-last.
    The weight gradient sum(dy * (x - mean)) * rstd then carries the rounding of the mean,
    ~ulp(1e4), times sum(dy) in either path (both are that far from an exact reference): its
    tolerance adds 16 eps * max|x| * sum_n |sum_l dy| per channel (rstd ~ 1 here)."""
    shape = (3, 4, 17, 19)
    rng = np.random.default_rng(3)
    for factory in (lambda: nc.BatchNorm2d(4, dtype=dtype), lambda: nc.InstanceNorm2d(4, affine=True, dtype=dtype),
                    lambda: nc.GroupNorm(2, 4, dtype=dtype)):
        ref, m = factory(), factory()
        randomize(ref, 4)
        randomize(m, 4)
        a = make(rng, shape, dtype, loc=1e4)
        g = make(rng, shape, dtype)
        x, dy = to_cl(a), to_cl(g)
        x.setflags(write=False)
        dy.setflags(write=False)
        y_ref, dx_ref = ref(a), ref.backward(g)
        cl_calls.clear()
        y, dx = m(x), m.backward(dy)
        assert cl_calls["channels_last"] == 2 and cl_calls["nchw"] == 0  # this forward and backward
        assert is_cl(y) and is_cl(dx)
        assert_close(y, y_ref, dtype, "y")
        assert_close(dx, dx_ref, dtype, "dx")
        assert_close(m.grads["bias"], ref.grads["bias"], dtype, "grad bias")
        want = f64(ref.grads["weight"])
        slack = 16 * np.finfo(np.float64).eps * np.abs(f64(a)).max() * np.abs(f64(g).sum((2, 3))).sum(0)
        err = np.abs(f64(m.grads["weight"]) - want)
        assert np.all(err <= LAYER_TOL[dtype] * np.abs(want).max() + slack), (err, slack)


# ================================================================================ 2. torch

def _torch_cases():
    return {
        "bn2d": (lambda t, dt: t.BatchNorm2d(6, dtype=dt), lambda dt: nc.BatchNorm2d(6, dtype=dt), (3, 6, 17, 19)),
        "bn3d": (lambda t, dt: t.BatchNorm3d(3, dtype=dt), lambda dt: nc.BatchNorm3d(3, dtype=dt), (2, 3, 4, 9, 9)),
        "bn1d": (lambda t, dt: t.BatchNorm1d(4, dtype=dt), lambda dt: nc.BatchNorm1d(4, dtype=dt), (3, 4, 300)),
        "in2d": (lambda t, dt: t.InstanceNorm2d(6, affine=True, track_running_stats=True, dtype=dt),
                 lambda dt: nc.InstanceNorm2d(6, affine=True, track_running_stats=True, dtype=dt), (3, 6, 17, 19)),
        "gn": (lambda t, dt: t.GroupNorm(3, 6, dtype=dt), lambda dt: nc.GroupNorm(3, 6, dtype=dt), (3, 6, 17, 19)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["bn2d", "bn3d", "bn1d", "in2d", "gn"])
def test_matches_torch(case, dtype):
    torch = pytest.importorskip("torch")
    tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    tol = {np.float32: 1e-5, np.float64: 1e-10}[dtype]
    make_t, make_nc, shape = _torch_cases()[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tm, m = make_t(torch.nn, tdt), make_nc(dtype)
        randomize(m, 5)
        with torch.no_grad():
            for k, p in m.parameters().items():
                getattr(tm, k).copy_(torch.from_numpy(p))
        rng = np.random.default_rng(6)

        def close(got, want, what):
            got, want = f64(got), f64(want)
            err = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
            assert err <= tol, f"{case} {what}: relative error {err:.2e} > {tol:.0e}"

        for step in range(4):
            if step == 2:
                tm.eval()
                m.eval()
            x = to_cl(make(rng, shape, dtype, loc=0.5, spread=3.0))
            dy = to_cl(make(rng, shape, dtype))
            xt = torch.from_numpy(x).requires_grad_()  # keeps the channels-last strides
            yt = tm(xt)
            yt.backward(torch.from_numpy(dy))
            y = m(x)
            dx = m.backward(dy)
            close(y, yt.detach().numpy(), f"y step {step}")
            close(dx, xt.grad.numpy(), f"dx step {step}")
            for k in m.grads:
                close(m.grads[k], getattr(tm, k).grad.numpy(), f"grad {k} step {step}")
                getattr(tm, k).grad = None
            for k in ("running_mean", "running_var"):
                if getattr(m, k, None) is not None:
                    close(getattr(m, k), getattr(tm, k).numpy(), f"{k} step {step}")
            assert is_cl(y) and is_cl(dx)
            if case in ("bn2d", "bn3d", "gn"):
                # torch keeps the memory format of 4D / 5D BatchNorm and GroupNorm (not of
                # InstanceNorm, nor of 3D input): the same strides as normcore's.
                itemsize = np.dtype(dtype).itemsize
                assert yt.stride() == tuple(s // itemsize for s in y.strides)
                assert xt.grad.stride() == tuple(s // itemsize for s in dx.strides)
    finally:
        torch.set_num_threads(threads)


# ================================================================================ 3. the Plan

def plan_for(shape, G, n_threads):
    """The channels-last Plan of x [N, L, C]: G = 0 per channel (BatchNorm), else G groups of
    C/G consecutive channels per sample."""
    N, L, C = shape
    if G == 0:
        return Plan(N, C, L, 1, N, C, n_threads, True)
    return Plan(N, C, L, N * G, C // G, 1, n_threads, True)


def group_index(N, C, G):
    """[N, C]: the group of each (n, c), numbered as the Plan's statistics."""
    if G == 0:
        return np.tile(np.arange(C), (N, 1))
    return (np.arange(N * C) // (C // G)).reshape(N, C)


def np_forward(x3, G, weight, bias, eps):
    """The float64 twin of a channels-last forward with batch statistics: mean, M2 and rstd per
    group, y, the magnitude of y's terms, and that of (|x| + |mean|) * |rstd * w| (the error of
    the statistics, where x is close to the mean); max |x| per group."""
    N, L, C = x3.shape
    xd = f64(x3)
    gi = group_index(N, C, G)
    n_groups = gi.max() + 1
    count = np.bincount(gi.ravel(), minlength=n_groups) * L
    mean = np.bincount(gi.ravel(), weights=xd.sum(1).ravel(), minlength=n_groups) / count
    dev = xd - mean[gi][:, None, :]
    m2 = np.bincount(gi.ravel(), weights=(dev ** 2).sum(1).ravel(), minlength=n_groups)
    rstd = 1.0 / np.sqrt(np.maximum(m2 / count, 0.0) + eps)
    a = rstd[gi][:, None, :] * f64(weight)
    t = dev * a
    b = f64(bias)[None, None, :]
    terms = (np.abs(xd) + np.abs(mean[gi][:, None, :])) * np.abs(a)
    xmax = np.zeros(n_groups)
    np.maximum.at(xmax, gi.ravel(), np.abs(xd).max(1).ravel())
    return mean, m2, rstd, t + b, np.abs(t) + np.abs(b), terms, xmax


def np_backward(x3, dy3, G, weight, mean, rstd, batch_stats):
    """The float64 twin of the backward for the forward with these statistics: dx, the
    magnitude of its terms, dweight, dbias. Batch statistics: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the
    group, g = w * dy; given ones: dx = rstd * w * dy."""
    N, L, C = x3.shape
    gi = group_index(N, C, G)
    r = f64(rstd)[gi][:, None, :]
    xhat = (f64(x3) - f64(mean)[gi][:, None, :]) * r
    d = f64(dy3)
    gw = d * f64(weight)
    dweight = (d * xhat).sum((0, 1))
    dbias = d.sum((0, 1))
    if not batch_stats:
        return gw * r, np.abs(gw * r), dweight, dbias
    count = np.bincount(gi.ravel()) * L
    m_g = np.bincount(gi.ravel(), weights=gw.sum(1).ravel()) / count
    m_gx = np.bincount(gi.ravel(), weights=(gw * xhat).sum(1).ravel()) / count
    t1, t2, t3 = r * gw, r * m_g[gi][:, None, :], r * xhat * m_gx[gi][:, None, :]
    return t1 - t2 - t3, np.abs(t1) + np.abs(t2) + np.abs(t3), dweight, dbias


# (N, L, C): one value; L below, at and just past the 4 unrolled rows (C = 6: groups of 2
# and 3 channels); C = 1; exactly one chunk, one past it, several chunks with a tail
# (700 = 2 * 256 + 188); N = 1 with chunks; a wide C; and inputs over PARALLEL_MIN (threaded
# with n_threads = 3), one with L < CHUNK.
PLAN_SHAPES = [
    (1, 1, 1),
    (2, 1, 3),
    (2, 3, 5),
    (3, ROWS, 7),
    (2, ROWS + 1, 6),
    (2, 13, 1),
    (2, CHUNK, 3),
    (2, CHUNK + 1, 3),
    (3, 2 * CHUNK + 188, 5),
    (1, 1000, 1),
    (4, 300, 64),
    (3, 700, 40),
    (40, 70, 24),
]
PLAN_THREADS = [1, 3]


def group_params(rng, C):
    return rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C), rng.standard_normal(C)


def groupings(C):
    """0 (per channel), then G for every group size in use: 1, the smallest divisor above 1,
    the largest below C, and C (at most 5 in all)."""
    ds = [g for g in range(1, C + 1) if C % g == 0]
    return [0] + sorted({ds[0], ds[min(1, len(ds) - 1)], ds[max(len(ds) - 2, 0)], ds[-1]})


@pytest.mark.parametrize("n_threads", PLAN_THREADS)
@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_forward(dtype, shape, n_threads):
    N, L, C = shape
    rng = np.random.default_rng(16)
    x = make(rng, shape, dtype, loc=4.0, spread=2.0)
    weight, bias = group_params(rng, C)
    for G in groupings(C):
        want_mean, want_m2, want_rstd, want, mag, terms, xmax = np_forward(x, G, weight, bias, EPS)
        y, stats, _w = plan_for(shape, G, n_threads).forward(x, weight, bias, EPS)
        assert y.dtype == dtype and y.shape == shape and stats.shape == (3, want_mean.size)
        assert_within(stats[0], want_mean, xmax, RTOL_SUM, f"mean G={G}")
        assert_within(stats[1], want_m2, want_m2, RTOL_SUM, f"M2 G={G}")
        assert_within(stats[2], want_rstd, want_rstd, RTOL_SUM, f"rstd G={G}")
        # the rounding of the apply, plus the error of the statistics where x is near the mean
        assert_within(y, want, mag + (RTOL_SUM / RTOL_OUT[dtype]) * terms, RTOL_OUT[dtype], f"y G={G}")
        if L == 1 and G == C:
            assert np.array_equal(stats[0], f64(x).ravel()) and np.all(stats[1] == 0.0)


@pytest.mark.parametrize("n_threads", PLAN_THREADS)
@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_backward(dtype, shape, n_threads):
    """dx and the parameter gradients of every grouping's forward, and of a per-channel
    forward with given statistics (dx = rstd * w * dy, rounded once from float64)."""
    N, L, C = shape
    rng = np.random.default_rng(17)
    x = make(rng, shape, dtype, loc=-1.0, spread=2.0)
    dy = make(rng, shape, dtype)
    weight, bias = group_params(rng, C)
    for G in groupings(C):
        plan = plan_for(shape, G, n_threads)
        _, stats, _w = plan.forward(x, weight, bias, EPS)
        dx, grads = plan.backward(x, dy, stats[0], stats[2], weight, True)
        want, mag, dw, db = np_backward(x, dy, G, weight, stats[0], stats[2], True)
        assert dx.dtype == dtype and dx.shape == shape and grads.shape == (2, C)
        assert_within(dx, want, mag, RTOL_OUT[dtype], f"dx G={G}")
        assert_within(grads[1], db, f64(np.abs(f64(dy)).sum((0, 1))), RTOL_SUM, f"dbias G={G}")
        assert_close(grads[0], dw, np.float64, f"dweight G={G}")
    plan = plan_for(shape, 0, n_threads)
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    _, stats, _w = plan.forward(x, weight, bias, EPS, mean, var)
    assert np.array_equal(stats[0], mean)
    dx, grads = plan.backward(x, dy, stats[0], stats[2], weight, False)
    want, _, dw, db = np_backward(x, dy, 0, weight, stats[0], stats[2], False)
    half_ulp = 0.5 * f64(np.spacing(np.abs(want).astype(dtype)))
    assert np.all(np.abs(f64(dx) - want) <= half_ulp + 4e-16 * np.abs(want)), "dx not rstd * w * dy rounded once"
    assert_close(grads[0], dw, np.float64, "dweight, given statistics")


@pytest.mark.parametrize("loc", [2.0, 1.5e7], ids=["loc2", "loc1.5e7"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_forward_given_statistics(dtype, loc):
    """y = (x - mean) / sqrt(var + eps) * w + b with given statistics. loc = 1.5e7: float32
    x are integers there and the mean 1.5e7 + fraction is not a float32; the split center
    (hi + lo) keeps y accurate to the size of x - mean, not of the mean."""
    shape = (3, 2 * CHUNK + 188, 5)
    N, L, C = shape
    rng = np.random.default_rng(14)
    x = make(rng, shape, dtype, loc=loc, spread=3.0)
    weight, bias = group_params(rng, C)
    mean, var = loc + 0.3 + rng.standard_normal(C), rng.uniform(0.2, 3.0, C)
    y, stats, _w = plan_for(shape, 0, 1).forward(x, weight, bias, EPS, mean, var)
    scale = weight / np.sqrt(var + EPS)
    t = (f64(x) - mean) * scale
    assert np.array_equal(stats[0], mean) and np.array_equal(stats[1], var + EPS)
    assert_within(stats[2], 1 / np.sqrt(var + EPS), 1 / np.sqrt(var + EPS), 1e-15, "rstd")
    assert_within(y, t + bias, np.abs(t) + np.abs(bias), RTOL_OUT[dtype], "y")


@pytest.mark.parametrize("L", [5, CHUNK + 3, 1000])
def test_plan_large_mean_float32(L):
    """x = 1e4 + N(0, 1) in float32: the variance of each (n, c) to 1e-10 relative."""
    shape = (2, L, 3)
    x = make(np.random.default_rng(11), shape, np.float32, loc=1e4)
    _, stats, _w = plan_for(shape, 3, 1).forward(x, np.ones(3), np.zeros(3), EPS)
    want_mean, want_m2, *_ = np_forward(x, 3, np.ones(3), np.zeros(3), EPS)
    assert np.all(np.abs(stats[1] - want_m2) < 1e-10 * want_m2), (stats[1], want_m2)
    assert np.all(np.abs(stats[0] - want_mean) < 1e-14 * 1e4), (stats[0], want_mean)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("pos", [0, 1, 5, CHUNK, CHUNK + 2, 600, 700])
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_non_finite_confined(dtype, pos, bad):
    """NaN or inf at a chunk's first position (its shift), in the unrolled rows or in the
    tail (L = 701: the last chunk is 47 * 4 rows + 1), in InstanceNorm's grouping: M2 and y of
    that (n, c) are NaN, every other (n, c) has the bits of the clean input."""
    N, L, C = 2, 701, 5
    shape = (N, L, C)
    x = make(np.random.default_rng(12), shape, dtype, loc=1.0)
    plan = plan_for(shape, C, 1)
    w, b = np.ones(C), np.zeros(C)
    y0, clean, _w = plan.forward(x, w, b, EPS)
    x[1, pos, 3] = bad
    with np.errstate(invalid="ignore"):
        y1, got, _w = plan.forward(x, w, b, EPS)
    i = 1 * C + 3
    assert np.isnan(got[1, i]), f"M2 of a column holding {bad} is {got[1, i]}"
    assert np.all(np.isnan(y1[1, :, 3]))
    others = np.arange(N * C) != i
    assert same_bits(got[:, others], clean[:, others])
    keep = np.ones((N, C), bool)
    keep[1, 3] = False
    assert same_bits(np.moveaxis(y1, 1, 2)[keep], np.moveaxis(y0, 1, 2)[keep])


@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_refuses_given_statistics_for_groups(dtype):
    """Given statistics are per channel: a plan over groups of channels would ignore them."""
    shape = (2, 3, 4)
    x = np.ones(shape, dtype)
    plan = plan_for(shape, 2, 1)
    with pytest.raises(ValueError, match="per-channel plan"):
        plan.forward(x, np.ones(4), np.zeros(4), EPS, np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="per-channel plan"):
        plan.backward(x, x, np.zeros(4), np.ones(4), np.ones(4), False)


# ============================================================================ 4. determinism

def bits(a):
    a = np.ascontiguousarray(a)
    return a.dtype.str, a.shape, a.tobytes()


def assert_same_bits(results):
    """results: {n_threads: [arrays]}; every entry equals the first bit for bit."""
    (n0, ref), *others = results.items()
    for n, res in others:
        assert len(res) == len(ref)
        for i, (a, b) in enumerate(zip(ref, res)):
            assert bits(a) == bits(b), f"output {i}: {n0} and {n} threads differ"


def _plan_outputs(x, dy, n_threads):
    """Every grouping's forward and backward (and given statistics per channel), and whether
    each consecutive-channel plan ran one sample per task."""
    N, L, C = x.shape
    rng = np.random.default_rng(20)
    weight, bias = group_params(rng, C)
    out, sample_tasks = [], []
    for G in (0, 1, C // 2 if C % 2 == 0 else 1, C):
        plan = plan_for(x.shape, G, n_threads)
        y, stats, _w = plan.forward(x, weight, bias, EPS)
        dx, grads = plan.backward(x, dy, stats[0], stats[2], weight, True)
        out += [y, stats, dx, grads]
        if G:
            sample_tasks.append(plan.sample_tasks)
    plan = plan_for(x.shape, 0, n_threads)
    y, stats, _w = plan.forward(x, weight, bias, EPS, rng.standard_normal(C), rng.uniform(0.5, 2, C))
    dx, grads = plan.backward(x, dy, stats[0], stats[2], weight, False)
    return out + [y, stats, dx, grads], sample_tasks


# (N, L, C) over PARALLEL_MIN: several chunks with a tail; one sample (threads over its
# chunks only); many short samples (one chunk each); C odd; N = 2 and 3 (separate passes at 3
# threads, one sample per task at 1 and 2).
DET_SHAPES = [(3, 700, 40), (1, 2100, 33), (40, 70, 24), (2, 1100, 31), (3, 2 * CHUNK + 188, 48)]


@pytest.mark.parametrize("shape", DET_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_same_bits_any_threads(dtype, shape):
    assert np.prod(shape) >= PARALLEL_MIN
    rng = np.random.default_rng(21)
    x = make(rng, shape, dtype, loc=3.0, spread=2.0)
    dy = make(rng, shape, dtype)
    results = {}
    for n in (1, 2, 3):
        results[n], sample_tasks = _plan_outputs(x, dy, n)
        # the way consecutive-channel groups ran: one sample per task unless fewer samples than threads
        assert sample_tasks == [shape[0] >= n] * len(sample_tasks)
    assert_same_bits(results)


def _layer_run(factory, a, g, mode):
    """y, dx, gradients and state of a fresh layer on channels-last a, dy = g."""
    m = factory()
    randomize(m, 23)
    if mode == "eval":
        rng = np.random.default_rng(24)
        m.running_mean[...] = rng.standard_normal(m.num_features)
        m.running_var[...] = rng.uniform(0.5, 2.0, m.num_features)
        m.eval()
    y = m(a)
    dx = m.backward(g)
    assert is_cl(y) and is_cl(dx)
    return [y, dx, *(m.grads[k] for k in sorted(m.grads)), *(v for _, v in sorted(state_of(m).items()))]


# id -> (factory taking dtype, shape, mode); every input >= PARALLEL_MIN elements.
DET_LAYERS = {
    "bn2d": (lambda dt: nc.BatchNorm2d(16, dtype=dt), (8, 16, 24, 24), "train"),
    "bn2d-eval": (lambda dt: nc.BatchNorm2d(16, dtype=dt), (8, 16, 24, 24), "eval"),
    "bn3d": (lambda dt: nc.BatchNorm3d(4, dtype=dt), (2, 4, 10, 30, 30), "train"),
    "in2d": (lambda dt: nc.InstanceNorm2d(16, affine=True, track_running_stats=True, dtype=dt),
             (8, 16, 24, 24), "train"),
    "in2d-eval": (lambda dt: nc.InstanceNorm2d(16, affine=True, track_running_stats=True, dtype=dt),
                  (8, 16, 24, 24), "eval"),
    "gn": (lambda dt: nc.GroupNorm(4, 16, dtype=dt), (8, 16, 24, 24), "train"),
    # N = 2: fused at 1 and 2 threads, separate steps at 3 threads.
    "in2d-N2": (lambda dt: nc.InstanceNorm2d(8, affine=True, track_running_stats=True, dtype=dt),
                (2, 8, 70, 70), "train"),
    "gn-N2": (lambda dt: nc.GroupNorm(4, 8, dtype=dt), (2, 8, 70, 70), "train"),
    "gn-N2-G1": (lambda dt: nc.GroupNorm(1, 8, dtype=dt), (2, 8, 70, 70), "train"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DET_LAYERS))
def test_layer_same_bits_any_threads(name, dtype, cl_calls):
    factory, shape, mode = DET_LAYERS[name]
    assert np.prod(shape) >= PARALLEL_MIN
    rng = np.random.default_rng(25)
    a = to_cl(make(rng, shape, dtype, loc=3.0, spread=2.0))
    g = to_cl(make(rng, shape, dtype))
    results, fused = {}, {}
    for n in (1, 2, 3):
        nc.set_num_threads(n)
        try:
            cl_calls.cl_plans.clear()
            results[n] = [np.array(r, copy=True) for r in _layer_run(lambda: factory(dtype), a, g, mode)]
            fused[n] = any(p.sample_tasks for p in cl_calls.cl_plans)
        finally:
            nc.set_num_threads(None)
    # The path taken: fused for InstanceNorm / GroupNorm in training when N >= threads.
    own_stats = mode == "train" and not name.startswith("bn")
    assert fused == {n: own_stats and shape[0] >= n for n in (1, 2, 3)}
    assert_same_bits(results)


# ========================================================================= 5. special values

@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (3, 3, 17, 19)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channel_normalizes_to_beta(dtype, shape):
    """Channel 1 constant at 1.5e7 (float32: x - mean must be exact) normalises to exactly
    its bias in BatchNorm training, InstanceNorm and GroupNorm with a group per channel."""
    rng = np.random.default_rng(26)
    a = make(rng, shape, dtype, loc=1.5e7, spread=3.0)
    a[:, 1] = 1.5e7
    x = to_cl(a)
    for m in (nc.BatchNorm2d(3, dtype=dtype), nc.InstanceNorm2d(3, affine=True, dtype=dtype),
              nc.GroupNorm(3, 3, dtype=dtype)):
        m.weight[...] = [0.5, 2.0, -1.5]
        m.bias[...] = [0.25, -0.5, 2.0]
        y = m(x)
        assert is_cl(y)
        assert np.all(y[:, 1] == m.bias[1]), type(m).__name__
        assert np.all(np.isfinite(y))
        dx = m.backward(to_cl(np.ones_like(a)))
        assert np.all(np.isfinite(dx)) and all(np.all(np.isfinite(v)) for v in m.grads.values())
    bn = nc.BatchNorm2d(3, dtype=dtype)
    bn(x)
    assert bn.running_var[1] == dtype(0.9)  # (1 - 0.1) * 1 + 0.1 * 0: the unbiased variance is 0


@pytest.mark.parametrize("pos", [(0, 0, 0), (1, 0, 3), (1, 13, 9), (2, 16, 18)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_channel(dtype, pos):
    """A NaN in channel 2 of a channels-last BatchNorm2d: y, dx, the gradients and the running
    statistics of channel 2 are NaN, every other channel has the bits of the input without
    the NaN. Positions (of 17 * 19 = 323 = 256 + 67): a chunk's first, its shift ((h, w) =
    (0, 0), and (13, 9) = position 256), inside the unrolled rows, and 322 in the tail of the
    last chunk (64 unrolled rows + 3)."""
    shape = (3, 4, 17, 19)
    rng = np.random.default_rng(27)
    a = make(rng, shape, dtype, loc=1.0, spread=2.0)
    g = make(rng, shape, dtype)
    an = a.copy()
    an[(pos[0], 2, *pos[1:])] = np.nan

    def run(arr):
        m = nc.BatchNorm2d(4, dtype=dtype)
        randomize(m, 28)
        y = m(to_cl(arr))
        dx = m.backward(to_cl(g))
        return y, dx, m.grads, state_of(m)

    y0, dx0, g0, s0 = run(a)
    with np.errstate(invalid="ignore"):
        y1, dx1, g1, s1 = run(an)
    other = [0, 1, 3]
    assert np.all(np.isnan(y1[:, 2])) and np.all(np.isnan(dx1[:, 2]))
    assert same_bits(y1[:, other], y0[:, other]) and same_bits(dx1[:, other], dx0[:, other])
    assert np.all(np.isfinite(y1[:, other])) and np.all(np.isfinite(dx1[:, other]))
    assert np.isnan(g1["weight"][2]) and same_bits(g1["weight"][other], g0["weight"][other])
    assert same_bits(g1["bias"], g0["bias"])  # sum(dy) does not involve x
    for k in ("running_mean", "running_var"):
        assert np.isnan(s1[k][2]) and same_bits(s1[k][other], s0[k][other]), k


# ================================================================================ found bugs

@pytest.mark.parametrize("cls", [nc.BatchNorm2d, nc.InstanceNorm2d])
def test_eval_backward_uses_the_forward_statistics(cls):
    kw = {"affine": True, "track_running_stats": True} if cls is nc.InstanceNorm2d else {}
    rng = np.random.default_rng(29)
    a = make(rng, (2, 3, 4, 5), np.float64)
    g = make(rng, (2, 3, 4, 5), np.float64)
    grads = []
    for x in (a, to_cl(a)):
        m = cls(3, dtype=np.float64, **kw)
        m.running_mean[...] = [0.5, -0.5, 1.0]
        m.eval()
        m(x)
        m.reset_running_stats()  # between forward and backward
        m.backward(g)
        grads.append(m.grads["weight"])
    assert_close(grads[1], grads[0], np.float64, "weight gradient, channels-last vs C-contiguous")


@pytest.mark.parametrize("value", [1e308, -1.7e308, 8.9e307])
@pytest.mark.parametrize("make", [lambda: nc.BatchNorm2d(2, dtype=np.float64), lambda: nc.GroupNorm(1, 2, dtype=np.float64),
                                  lambda: nc.GroupNorm(2, 2, dtype=np.float64),
                                  lambda: nc.InstanceNorm2d(2, affine=True, dtype=np.float64)],
                         ids=["bn", "gn1", "gn2", "in"])
def test_constant_channels_near_the_largest_double_are_bias_in_both_layouts(make, value):
    """The merge of row means must not overflow where the values do not: channels-last gives
    bias as NCHW does (issue 12, item 8: it gave NaN), with the same running statistics."""
    x = np.full((2, 2, 3, 2), value)
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    results = []
    for a in (x, x_cl):
        m = make()
        m.bias[...] = [0.25, -3.0]
        y = m(a)
        dx = m.backward(np.ones_like(a))
        results.append((y, dx, m.state_dict()))
    (y, dx, sd), (y_cl, dx_cl, sd_cl) = results
    np.testing.assert_array_equal(y_cl, y)
    assert (y[:, 0] == 0.25).all() and (y[:, 1] == -3.0).all()
    np.testing.assert_array_equal(dx_cl, dx)
    for k in sd:
        np.testing.assert_array_equal(sd_cl[k], sd[k], err_msg=k)
