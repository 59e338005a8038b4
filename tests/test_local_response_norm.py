"""LocalResponseNorm: the float64 reference (checked by finite differences), the layer against
it and against PyTorch, bitwise determinism across threads, and its error rules."""
import numpy as np
import pytest

import normcore as nc
import reference as ref
from optional_peers import needs_torch, torch

TOL = {np.float32: 1e-5, np.float64: 1e-10}
SIZES = list(range(1, 17))


def rel_err(actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()) / max(1e-300, float(np.abs(expected).max()))


def lrn_input(shape, dtype, seed=0):
    """Values of several magnitudes, so that alpha * sum(x^2) matters against k."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * rng.choice([0.1, 1.0, 30.0], size=shape)).astype(dtype)


def test_reference_matches_finite_differences():
    rng = np.random.default_rng(1)
    for size, C in [(1, 3), (2, 4), (3, 5), (4, 3), (5, 7), (8, 3)]:
        x = rng.normal(size=(2, C, 3)) * 3
        r = rng.normal(size=x.shape)
        args = (size, 0.3, 0.75, 1.5)
        dx = ref.local_response_norm_backward(x, r, *args)
        num = ref.numeric_gradient(lambda: float(np.sum(ref.local_response_norm_forward(x, *args) * r)), x)
        np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", [(2, 7, 9), (2, 5, 4, 6), (1, 12, 3, 2, 5), (3, 3, 40)], ids=str)
def test_matches_reference(shape, size, dtype):
    """Odd and even sizes, size larger than C, 3-D to 5-D."""
    x = lrn_input(shape, dtype)
    dy = np.random.default_rng(2).normal(size=shape).astype(dtype)
    for beta in (0.75, 0.5, 0.3):
        m = nc.LocalResponseNorm(size, alpha=1e-2, beta=beta, k=2.0)
        y = m(x)
        dx = m.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype and y.shape == shape
        assert rel_err(y, ref.local_response_norm_forward(x, size, 1e-2, beta, 2.0)) <= TOL[dtype]
        assert rel_err(dx, ref.local_response_norm_backward(x, dy, size, 1e-2, beta, 2.0)) <= TOL[dtype]


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.3])
def test_finite_differences_float64(beta):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 6, 2, 3)) * 4
    r = rng.normal(size=x.shape)
    m = nc.LocalResponseNorm(4, alpha=0.2, beta=beta, k=1.0)
    m(x)
    dx = m.backward(r)
    num = ref.numeric_gradient(lambda: float(np.sum(m(x) * r)), x)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,shape", [(5, (4, 96, 27, 29)), (2, (2, 6, 5000)), (16, (3, 40, 31))], ids=str)
def test_bitwise_identical_for_any_thread_count(size, shape, dtype):
    x = lrn_input(shape, dtype, seed=4)
    dy = np.random.default_rng(5).normal(size=shape).astype(dtype)
    results = []
    try:
        for n in (1, 2, 3):
            nc.set_num_threads(n)
            m = nc.LocalResponseNorm(size)
            results.append((m(x).tobytes(), m.backward(dy).tobytes()))
    finally:
        nc.set_num_threads(None)
    assert results[0] == results[1] == results[2]


def test_any_memory_layout():
    x = lrn_input((3, 8, 5, 6), np.float64)
    expected = ref.local_response_norm_forward(x, 3, 1e-2, 0.75, 1.0)
    m = nc.LocalResponseNorm(3, alpha=1e-2)
    for view in (np.asfortranarray(x), np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2),
                 np.repeat(x, 2, axis=-1)[..., ::2], x[::-1][::-1]):
        assert rel_err(m(view), expected) <= 1e-12


def test_module_interface_and_functional():
    m = nc.LocalResponseNorm(5)
    assert isinstance(m, nc.Module) and repr(m) == "LocalResponseNorm(5, alpha=0.0001, beta=0.75, k=1.0)"
    assert m.state_dict() == {} and m.parameters() == {}
    assert m.eval() is m and m.train() is m
    x = lrn_input((2, 7, 4, 4), np.float32)
    np.testing.assert_array_equal(m(x), nc.functional.local_response_norm(x, 5))
    m.backward(np.ones_like(x))
    assert m.grads == {}
    m.load_state_dict({})


@pytest.mark.parametrize("bad,exc,words", [
    (np.ones((2, 3)), ValueError, r"Expected 3D or higher dimensionality input \(got 2 dimensions\)"),
    (np.ones(3), ValueError, "Expected 3D or higher"),
    (np.ones((2, 3, 4), np.int32), TypeError, "float32 or float64"),
    (np.ones((2, 3, 4), complex), TypeError, "float32 or float64"),
])
def test_bad_input(bad, exc, words):
    m = nc.LocalResponseNorm(3)
    x = lrn_input((2, 4, 3), np.float32)
    m(x)
    saved = m._saved
    with pytest.raises(exc, match=words):
        m(bad)
    assert m._saved is saved
    with pytest.raises(ValueError, match="dy must have the shape"):
        m.backward(np.ones((2, 4, 4), np.float32))


@pytest.mark.parametrize("args,exc", [((0,), ValueError), ((-1,), ValueError), ((2.5,), TypeError),
                                      ((3, "a"), TypeError), ((3, 1e-4, float("nan")), ValueError)])
def test_invalid_constructor_arguments(args, exc):
    with pytest.raises(exc):
        nc.LocalResponseNorm(*args)


def test_empty_input_and_backward_before_forward():
    m = nc.LocalResponseNorm(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        m.backward(np.ones((1, 2, 3)))
    for shape in [(0, 3, 4), (2, 0, 4), (2, 3, 0, 5)]:
        x = np.ones(shape, np.float32)
        assert m(x).shape == shape and m.backward(x).shape == shape


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 15, 16])
@pytest.mark.parametrize("shape", [(2, 7, 9), (2, 5, 4, 6), (1, 12, 3, 2, 5)], ids=str)
def test_matches_pytorch(shape, size, dtype):
    x = lrn_input(shape, dtype, seed=6)
    dy = np.random.default_rng(7).normal(size=shape).astype(dtype)
    for alpha, beta, k in [(1e-4, 0.75, 1.0), (1e-2, 0.5, 2.0), (3e-3, 0.9, 0.5)]:
        m = nc.LocalResponseNorm(size, alpha, beta, k)
        tm = torch.nn.LocalResponseNorm(size, alpha, beta, k)
        xt = torch.from_numpy(x).requires_grad_()
        yt = tm(xt)
        yt.backward(torch.from_numpy(dy))
        y, dx = m(x), m.backward(dy)
        # against torch in the same dtype: within the tolerance (torch float32 has its own error)
        assert rel_err(y, yt.detach().numpy()) <= 2 * TOL[dtype]
        assert rel_err(dx, xt.grad.numpy()) <= 2 * TOL[dtype]
        # and against torch in float64: normcore's float32 within 1e-5
        x64 = torch.from_numpy(x.astype(np.float64)).requires_grad_()
        tm(x64).backward(torch.from_numpy(dy.astype(np.float64)))
        assert rel_err(y, tm(x64).detach().numpy()) <= TOL[dtype]
        assert rel_err(dx, x64.grad.numpy()) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_drift_after_a_huge_channel(dtype):
    """A running sum with subtraction would carry the rounding of 1e30 into every later window;
    the window sums here never subtract, so channels after the huge one are exact."""
    x = lrn_input((2, 40, 7), dtype, seed=8)
    x[:, 3] = 1e15 if dtype == np.float64 else 1e18
    m = nc.LocalResponseNorm(5, alpha=1.0, beta=0.75, k=1.0)
    y = m(x)
    expected = ref.local_response_norm_forward(x, 5, 1.0, 0.75, 1.0)
    far = slice(8, None)  # windows that do not hold channel 3
    assert rel_err(y[:, far], expected[:, far]) <= TOL[dtype]


@pytest.mark.parametrize("beta", [0.75, 0.5, 0.6])
@pytest.mark.parametrize("scale, alpha, k", [
    (1e16, 1e-4, 1.0),    # s ~ 1e28: s^(-beta-1) underflows float
    (1e14, 1e-4, 1.0),
    (1e22, 1e-4, 1.0),    # x^2 beyond float: s overflows float
    (1e-15, 1.0, 0.0),    # s ~ 1e-30: s^(-beta-1) overflows float
    (1e-19, 1.0, 0.0),
    (1.0, 1e-4, 1.0),     # the float fast path
], ids=str)
def test_float32_correct_where_the_power_leaves_float_range(scale, alpha, k, beta):
    """float32 data whose s = k + alpha/size * sum(x^2), or s^(-beta-1), is beyond float: y and
    dx as the float64 reference on the same float32 values (issue 12, item 3). The chunk holding
    such a position is computed with the power in double."""
    base = np.array([1.0, -2.0, 3.0, 0.5, -1.5])
    x = (base.reshape(1, 5, 1) * scale).astype(np.float32)
    rng = np.random.default_rng(3)
    dy = rng.normal(size=x.shape).astype(np.float32)
    args = (3, alpha, beta, k)
    m = nc.LocalResponseNorm(*args)
    y = m(x)
    dx = m.backward(dy)
    y_ref = ref.local_response_norm_forward(x.astype(np.float64), *args)
    dx_ref = ref.local_response_norm_backward(x.astype(np.float64), dy.astype(np.float64), *args)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(dx, dx_ref) < 1e-6


def test_float32_out_of_range_positions_beside_ordinary_ones():
    """One spatial column far out of float's range among ordinary ones, wide chunks: every
    position as the reference, and the same bits at 1 and 2 threads."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 50)).astype(np.float32)
    x[1, :, 17] *= np.float32(1e18)
    dy = rng.normal(size=x.shape).astype(np.float32)
    m = nc.LocalResponseNorm(5, 1e-3, 0.75, 1.0)
    outs = []
    for threads in (1, 2):
        nc.set_num_threads(threads)
        try:
            outs.append((m(x), m.backward(dy)))
        finally:
            nc.set_num_threads(None)
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    y, dx = outs[0]
    args = (5, 1e-3, 0.75, 1.0)
    x64 = x.astype(np.float64)
    y_ref = ref.local_response_norm_forward(x64, *args)
    dx_ref = ref.local_response_norm_backward(x64, dy.astype(np.float64), *args)
    for n in range(2):  # per sample: the scale differs by 1e18 between them
        assert rel_err(y[n], y_ref[n]) < 1e-6
        assert rel_err(dx[n], dx_ref[n]) < 1e-6
