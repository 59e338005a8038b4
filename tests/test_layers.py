"""Every layer against the float64 NumPy reference (tests/reference.py): outputs, dx, parameter
gradients and running statistics over several steps, every constructor option, float32 and
float64, any memory layout; and finite differences of the layers themselves in float64."""
import numpy as np
import pytest

import normcore as nc
import reference as ref

TOL = {np.float32: 1e-5, np.float64: 1e-10}


def assert_close(actual, expected, dtype, what=""):
    """Error relative to the largest magnitude of the expected values."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} * {scale:.3g}"


def reference_step(m, x, dy):
    """(y, dx, dweight, dbias, new running_mean, new running_var) of the reference for module m
    in its current state (read before the call), in float64."""
    w = None if m.weight is None else m.weight.astype(np.float64)
    b = None if m.bias is None else m.bias.astype(np.float64)
    name = type(m).__name__
    rm = rv = None
    if name.startswith("BatchNorm"):
        tracking = m.track_running_stats
        batch = m.training or not tracking
        count = None
        if m.training and tracking:
            count = int(m.num_batches_tracked) + 1
        y, rm, rv = ref.batch_norm_forward(x, w, b, m.running_mean if tracking else None,
                                           m.running_var if tracking else None, batch, m.momentum, m.eps, count)
        if batch:
            axes = (0,) + tuple(range(2, x.ndim))
            mean, var = x.astype(np.float64).mean(axes), x.astype(np.float64).var(axes)
            dx, dw, db = ref.batch_norm_backward(x, dy, w, mean, var, m.eps)
        else:
            dx, dw, db = ref.batch_norm_backward_eval(x, dy, w, m.running_mean, m.running_var, m.eps)
    elif name.startswith("InstanceNorm"):
        unbatched = x.ndim == {"1d": 2, "2d": 3, "3d": 4}[name[-2:]]
        xb, dyb = (x[None], dy[None]) if unbatched else (x, dy)
        use_input = m.training or not m.track_running_stats
        y, rm, rv = ref.instance_norm_forward(xb, w, b, m.running_mean, m.running_var, use_input, m.momentum, m.eps)
        if use_input:
            dx, dw, db = ref.instance_norm_backward(xb, dyb, w, m.eps)
        else:
            dx, dw, db = ref.batch_norm_backward_eval(xb, dyb, w, m.running_mean, m.running_var, m.eps)
        y, dx = y.reshape(x.shape), dx.reshape(x.shape)
    elif name == "LayerNorm":
        y = ref.layer_norm_forward(x, m.normalized_shape, w, b, m.eps)
        dx, dw, db = ref.layer_norm_backward(x, dy, m.normalized_shape, w, m.eps)
    else:
        y = ref.group_norm_forward(x, m.num_groups, w, b, m.eps)
        dx, dw, db = ref.group_norm_backward(x, dy, m.num_groups, w, m.eps)
    return y, dx, dw, db, rm, rv


def randomize(m, rng):
    for name, p in m.parameters().items():
        p[...] = rng.uniform(0.5, 1.5, p.shape) if name == "weight" else rng.normal(0, 0.5, p.shape)


def check_steps(m, shape, dtype, rng, steps=3, offset=0.0, layout=None):
    """Several training steps then eval steps: every output against the reference."""
    randomize(m, rng)
    for step in range(steps + 2):
        if step == steps:
            m.eval()
        x = (offset + rng.normal(1.0, 2.0, shape)).astype(dtype)
        dy = rng.normal(0.0, 1.0, shape).astype(dtype)
        if layout is not None:
            x, dy = layout(x), layout(dy)
        expected = reference_step(m, x, dy)
        y = m(x)
        dx = m.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype and y.shape == shape and dx.shape == shape
        assert_close(y, expected[0], dtype, f"y step {step}")
        assert_close(dx, expected[1], dtype, f"dx step {step}")
        for name, grad in (("weight", expected[2]), ("bias", expected[3])):
            if getattr(m, name) is not None:
                assert m.grads[name].dtype == m.weight.dtype
                assert_close(m.grads[name], grad, dtype, f"grad {name} step {step}")
            else:
                assert name not in m.grads
        if expected[4] is not None:
            assert_close(m.running_mean, expected[4], dtype, "running_mean")
            assert_close(m.running_var, expected[5], dtype, "running_var")


DTYPES = [np.float32, np.float64]

BN_CASES = [
    (nc.BatchNorm1d, (16, 5)),
    (nc.BatchNorm1d, (4, 5, 7)),
    (nc.BatchNorm2d, (4, 3, 6, 5)),
    (nc.BatchNorm3d, (2, 3, 3, 4, 5)),
]
OPTIONS = [
    dict(),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("cls,shape", BN_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_batch_norm_matches_reference(cls, shape, options, dtype):
    check_steps(cls(shape[1], dtype=dtype, **options), shape, dtype, np.random.default_rng(1))


IN_CASES = [
    (nc.InstanceNorm1d, (3, 4, 9)),
    (nc.InstanceNorm1d, (4, 9)),
    (nc.InstanceNorm2d, (3, 4, 5, 6)),
    (nc.InstanceNorm2d, (4, 5, 6)),
    (nc.InstanceNorm3d, (2, 3, 2, 3, 4)),
]
IN_OPTIONS = [
    dict(),
    dict(affine=True),
    dict(track_running_stats=True),
    dict(affine=True, track_running_stats=True, momentum=0.3),
    dict(track_running_stats=True, momentum=None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", IN_OPTIONS, ids=str)
@pytest.mark.parametrize("cls,shape", IN_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_instance_norm_matches_reference(cls, shape, options, dtype):
    C = shape[-cls._no_batch_dim]
    check_steps(cls(C, dtype=dtype, **options), shape, dtype, np.random.default_rng(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalized_shape,shape", [
    (7, (5, 7)), ((4, 5), (3, 4, 5)), ([2, 3, 4], (2, 2, 3, 4)), (6, (6,)), (9000, (3, 9000)),
])
@pytest.mark.parametrize("options", [dict(), dict(bias=False), dict(elementwise_affine=False), dict(eps=1e-2)],
                         ids=str)
def test_layer_norm_matches_reference(normalized_shape, shape, options, dtype):
    check_steps(nc.LayerNorm(normalized_shape, dtype=dtype, **options), shape, dtype, np.random.default_rng(3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,shape", [(1, (3, 6, 4, 4)), (3, (3, 6, 4, 4)), (6, (2, 6, 5)), (2, (4, 4)),
                                          (2, (2, 4, 2, 3, 3)), (4, (2, 8, 70, 70))])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_reference(groups, shape, affine, dtype):
    check_steps(nc.GroupNorm(groups, shape[1], affine=affine, dtype=dtype), shape, dtype,
                np.random.default_rng(4), steps=1)


def channels_last(a):
    """The same values, stored channels-last: (N, C, H, W) view of an NHWC array."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(0, 3, 1, 2)


LAYOUTS = {
    "strided": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    "reversed": lambda a: np.ascontiguousarray(a[..., ::-1])[..., ::-1],
    "channels_last": channels_last,
    "fortran": np.asfortranarray,
    "readonly": lambda a: (a.setflags(write=False), a)[1],
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("make", [
    lambda: nc.BatchNorm2d(3), lambda: nc.InstanceNorm2d(3, affine=True), lambda: nc.GroupNorm(3, 3),
    lambda: nc.LayerNorm((3, 5, 6)),
], ids=["bn", "in", "gn", "ln"])
def test_any_memory_layout(make, layout):
    check_steps(make(), (4, 3, 5, 6), np.float32, np.random.default_rng(5), steps=2, layout=LAYOUTS[layout])


@pytest.mark.parametrize("make,shape", [
    (lambda: nc.BatchNorm2d(4), (3, 4, 20, 20)),
    (lambda: nc.InstanceNorm2d(4, affine=True), (3, 4, 20, 20)),
    (lambda: nc.GroupNorm(2, 4), (3, 4, 20, 20)),
    (lambda: nc.LayerNorm(400), (12, 400)),
], ids=["bn", "in", "gn", "ln"])
def test_large_offset_float32(make, shape):
    """x = 1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 would lose every digit."""
    check_steps(make(), shape, np.float32, np.random.default_rng(6), steps=2, offset=1e4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channel_normalizes_to_beta(dtype):
    x = np.random.default_rng(7).normal(size=(4, 3, 5, 5)).astype(dtype)
    x[:, 1] = 1.5e7
    for m in (nc.BatchNorm2d(3, dtype=dtype), nc.InstanceNorm2d(3, affine=True, dtype=dtype)):
        m.bias[...] = [0.25, -0.5, 2.0]
        y = m(x)
        assert np.all(y[:, 1] == m.bias[1]).item()
        assert np.isfinite(m.backward(np.ones_like(x))).all()
    ln = nc.LayerNorm((5, 5), dtype=dtype)
    ln.bias[...] = 0.75
    assert np.all(ln(x)[:, 1] == np.asarray(0.75, dtype)).item()
    gn = nc.GroupNorm(3, 3, dtype=dtype)
    gn.bias[...] = -1.25
    assert np.all(gn(x)[:, 1] == np.asarray(-1.25, dtype)).item()


def test_eval_without_tracking_uses_batch_statistics():
    x = np.random.default_rng(8).normal(3.0, 2.0, (6, 2, 4)).astype(np.float64)
    m = nc.BatchNorm1d(2, track_running_stats=False, dtype=np.float64).eval()
    assert_close(m(x), ref.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[0], np.float64)


@pytest.mark.parametrize("make,shape", [
    (lambda: nc.BatchNorm2d(3, dtype=np.float64), (2, 3, 2, 3)),
    (lambda: nc.BatchNorm2d(3, dtype=np.float64).eval(), (2, 3, 2, 3)),
    (lambda: nc.BatchNorm1d(3, dtype=np.float64), (4, 3)),
    (lambda: nc.InstanceNorm1d(3, affine=True, dtype=np.float64), (2, 3, 4)),
    (lambda: nc.LayerNorm((3, 4), dtype=np.float64), (2, 3, 4)),
    (lambda: nc.GroupNorm(2, 4, dtype=np.float64), (2, 4, 3)),
], ids=["bn", "bn-eval", "bn1d", "in", "ln", "gn"])
def test_finite_differences_float64(make, shape):
    rng = np.random.default_rng(9)
    m = make()
    randomize(m, rng)
    if getattr(m, "running_var", None) is not None:
        m.running_mean[...] = rng.normal(size=m.running_mean.shape)
        m.running_var[...] = rng.uniform(0.5, 2.0, m.running_var.shape)
    x = rng.normal(size=shape)
    r = rng.normal(size=shape)
    buffers = {k: getattr(m, k).copy() for k in m._buffer_names if getattr(m, k, None) is not None}

    def loss():
        for k, v in buffers.items():  # running stats must not drift between evaluations
            getattr(m, k)[...] = v
        return float(np.sum(m(x) * r))

    loss()
    dx = m.backward(r)
    grads = dict(m.grads)
    np.testing.assert_allclose(dx, ref.numeric_gradient(loss, x), rtol=1e-6, atol=1e-7)
    for name, p in m.parameters().items():
        np.testing.assert_allclose(grads[name], ref.numeric_gradient(loss, p), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_matches_reference(dtype):
    rng = np.random.default_rng(10)
    x = rng.normal(2.0, 3.0, (4, 6, 5, 3)).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, 6), rng.normal(size=6)
    rm, rv = rng.normal(size=6), rng.uniform(0.5, 2, 6)
    F = nc.functional
    y_ref, rm_ref, rv_ref = ref.batch_norm_forward(x, w, b, rm, rv, True, 0.2, 1e-5)
    rm_nc, rv_nc = rm.copy(), rv.copy()
    assert_close(F.batch_norm(x, rm_nc, rv_nc, w, b, training=True, momentum=0.2), y_ref, dtype)
    assert_close(rm_nc, rm_ref, np.float64)
    assert_close(rv_nc, rv_ref, np.float64)
    assert_close(F.batch_norm(x, rm, rv, w, b), ref.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5)[0], dtype)
    assert_close(F.instance_norm(x, weight=w, bias=b),
                 ref.instance_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)[0], dtype)
    assert_close(F.instance_norm(x, rm, rv, use_input_stats=False),
                 ref.instance_norm_forward(x, None, None, rm, rv, False, 0.1, 1e-5)[0], dtype)
    assert_close(F.layer_norm(x, (5, 3), np.ones((5, 3)), None, eps=1e-3),
                 ref.layer_norm_forward(x, (5, 3), None, None, 1e-3), dtype)
    assert_close(F.group_norm(x, 3, w, b), ref.group_norm_forward(x, 3, w, b, 1e-5), dtype)
