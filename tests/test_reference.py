"""Self-checks of tests/reference.py: finite differences, and torch.nn if available."""
import numpy as np
import pytest

from reference import (
    batch_norm_forward, batch_norm_backward, batch_norm_backward_eval,
    instance_norm_forward, instance_norm_backward,
    layer_norm_forward, layer_norm_backward,
    group_norm_forward, group_norm_backward,
    numeric_gradient as _numgrad,
)

EPS = 1e-5
TOL = dict(rtol=1e-6, atol=1e-6)


def _check_fd(fwd, bwd, x_shape, p_shape, affine, seed=0):
    """fwd(x, w, b) -> y ; bwd(x, dy, w) -> (dx, dw, db). Checks against finite differences."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    w = rng.uniform(0.5, 1.5, p_shape) if affine else None
    b = rng.standard_normal(p_shape) if affine else None
    y0 = fwd(x, w, b)
    r = rng.standard_normal(y0.shape)

    def loss():
        return float(np.sum(fwd(x, w, b) * r))

    dx, dw, db = bwd(x, r, w)
    np.testing.assert_allclose(dx, _numgrad(loss, x), **TOL)
    if affine:
        np.testing.assert_allclose(dw, _numgrad(loss, w), **TOL)
        np.testing.assert_allclose(db, _numgrad(loss, b), **TOL)
    else:  # gradients as if weight were ones / bias zeros
        wo, bo = np.ones(p_shape), np.zeros(p_shape)
        fwd_ones = lambda: float(np.sum(fwd(x, wo, bo) * r))
        np.testing.assert_allclose(dw, _numgrad(fwd_ones, wo), **TOL)
        np.testing.assert_allclose(db, _numgrad(fwd_ones, bo), **TOL)


def _caxes(x):
    return (0,) + tuple(range(2, x.ndim))


# ---------------------------------------------------------------- finite differences

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3)])
def test_fd_batch_norm_train(shape, affine):
    fwd = lambda x, w, b: batch_norm_forward(x, w, b, None, None, True, 0.1, EPS)[0]
    bwd = lambda x, dy, w: batch_norm_backward(x, dy, w, x.mean(_caxes(x)), x.var(_caxes(x)), EPS)
    _check_fd(fwd, bwd, shape, (shape[1],), affine)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 4, 3, 3)])
def test_fd_batch_norm_eval(shape, affine):
    rng = np.random.default_rng(1)
    rm, rv = rng.standard_normal(shape[1]), rng.uniform(0.5, 2.0, shape[1])
    fwd = lambda x, w, b: batch_norm_forward(x, w, b, rm, rv, False, 0.1, EPS)[0]
    bwd = lambda x, dy, w: batch_norm_backward_eval(x, dy, w, rm, rv, EPS)
    _check_fd(fwd, bwd, shape, (shape[1],), affine)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 4, 3, 3)])
def test_fd_instance_norm(shape, affine):
    fwd = lambda x, w, b: instance_norm_forward(x, w, b, None, None, True, 0.1, EPS)[0]
    bwd = lambda x, dy, w: instance_norm_backward(x, dy, w, EPS)
    _check_fd(fwd, bwd, shape, (shape[1],), affine)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,ns", [((3, 4, 5), (5,)), ((3, 4, 5), (4, 5)), ((2, 4, 3, 3), (3, 3))])
def test_fd_layer_norm(shape, ns, affine):
    fwd = lambda x, w, b: layer_norm_forward(x, ns, w, b, EPS)
    bwd = lambda x, dy, w: layer_norm_backward(x, dy, ns, w, EPS)
    _check_fd(fwd, bwd, shape, ns, affine)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,groups", [((2, 6, 2, 2, 2), 3), ((3, 4, 5), 2), ((2, 4, 3, 3), 1)])
def test_fd_group_norm(shape, groups, affine):
    fwd = lambda x, w, b: group_norm_forward(x, groups, w, b, EPS)
    bwd = lambda x, dy, w: group_norm_backward(x, dy, groups, w, EPS)
    _check_fd(fwd, bwd, shape, (shape[1],), affine)


def test_forward_does_not_mutate_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 5))
    rm, rv = np.zeros(4), np.ones(4)
    _, nrm, nrv = batch_norm_forward(x, None, None, rm, rv, True, 0.1, EPS)
    assert np.all(rm == 0) and np.all(rv == 1) and nrm is not rm and nrv is not rv
    _, nrm, nrv = instance_norm_forward(x, None, None, rm, rv, True, 0.1, EPS)
    assert np.all(rm == 0) and np.all(rv == 1)
    assert batch_norm_forward(x, None, None, None, None, True, 0.1, EPS)[1:] == (None, None)


# ---------------------------------------------------------------- torch comparisons

def _t(a, torch, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _np(t):
    return None if t is None else t.detach().numpy().copy()


def _randomize(m, torch, rng):
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(_t(rng.uniform(0.5, 1.5, m.weight.shape), torch))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(_t(rng.standard_normal(m.bias.shape), torch))
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(_t(rng.standard_normal(m.running_mean.shape), torch))
            m.running_var.copy_(_t(rng.uniform(0.5, 2.0, m.running_var.shape), torch))


def _torch_step(m, x, r, torch):
    """Forward + backward through torch module; returns y, dx, dw, db as numpy."""
    m.zero_grad()
    xt = _t(x, torch, grad=True)
    y = m(xt)
    y.backward(_t(r, torch))
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (_np(y), _np(xt.grad), None if w is None else _np(w.grad),
            None if b is None else _np(b.grad))


def _close_grads(ref, got, m):
    np.testing.assert_allclose(ref[0], got[1], rtol=1e-9, atol=1e-10)
    if getattr(m, "weight", None) is not None:
        np.testing.assert_allclose(ref[1], got[2], rtol=1e-9, atol=1e-10)
    if getattr(m, "bias", None) is not None:
        np.testing.assert_allclose(ref[2], got[3], rtol=1e-9, atol=1e-10)


BN_SHAPES = [("BatchNorm1d", (8, 3)), ("BatchNorm1d", (4, 3, 5)),
             ("BatchNorm2d", (2, 3, 4, 4)), ("BatchNorm3d", (2, 3, 2, 3, 2))]


@pytest.mark.parametrize("cls,shape", BN_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_torch_batch_norm(cls, shape, momentum, affine, track):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    eps = 1e-3
    m = getattr(torch.nn, cls)(shape[1], eps=eps, momentum=momentum, affine=affine,
                               track_running_stats=track).double()
    _randomize(m, torch, rng)
    w, b = _np(m.weight) if affine else None, _np(m.bias) if affine else None
    rm, rv = (_np(m.running_mean), _np(m.running_var)) if track else (None, None)
    m.train()
    for step in range(1, 4):
        x, r = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
        got = _torch_step(m, x, r, torch)
        y, rm, rv = batch_norm_forward(x, w, b, rm, rv, True, momentum, eps, num_batches_tracked=step)
        np.testing.assert_allclose(y, got[0], rtol=1e-9, atol=1e-10)
        if track:
            np.testing.assert_allclose(rm, _np(m.running_mean), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(rv, _np(m.running_var), rtol=1e-12, atol=1e-12)
            assert int(m.num_batches_tracked) == step
        ax = _caxes(x)
        _close_grads(batch_norm_backward(x, r, w, x.mean(ax), x.var(ax), eps), got, m)
    m.eval()
    x, r = rng.standard_normal(shape), rng.standard_normal(shape)
    got = _torch_step(m, x, r, torch)
    y, rm2, rv2 = batch_norm_forward(x, w, b, rm, rv, track is False, momentum, eps, step + 1)
    np.testing.assert_allclose(y, got[0], rtol=1e-9, atol=1e-10)
    if track:
        np.testing.assert_array_equal(rm2, rm)  # eval: no running-stat update
        np.testing.assert_array_equal(rv2, rv)
        _close_grads(batch_norm_backward_eval(x, r, w, rm, rv, eps), got, m)
    else:
        _close_grads(batch_norm_backward(x, r, w, x.mean(_caxes(x)), x.var(_caxes(x)), eps), got, m)


IN_SHAPES = [("InstanceNorm1d", (4, 3, 5)), ("InstanceNorm2d", (2, 3, 4, 4)),
             ("InstanceNorm3d", (2, 3, 2, 3, 2))]


@pytest.mark.parametrize("cls,shape", IN_SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_torch_instance_norm(cls, shape, momentum, affine, track):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    eps = 1e-3
    m = getattr(torch.nn, cls)(shape[1], eps=eps, momentum=momentum, affine=affine,
                               track_running_stats=track).double()
    _randomize(m, torch, rng)
    w, b = _np(m.weight) if affine else None, _np(m.bias) if affine else None
    rm, rv = (_np(m.running_mean), _np(m.running_var)) if track else (None, None)
    m.train()
    for _ in range(3):
        x, r = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
        got = _torch_step(m, x, r, torch)
        y, rm, rv = instance_norm_forward(x, w, b, rm, rv, True, momentum, eps)
        np.testing.assert_allclose(y, got[0], rtol=1e-9, atol=1e-10)
        if track:
            np.testing.assert_allclose(rm, _np(m.running_mean), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(rv, _np(m.running_var), rtol=1e-12, atol=1e-12)
        _close_grads(instance_norm_backward(x, r, w, eps), got, m)
    m.eval()
    x, r = rng.standard_normal(shape), rng.standard_normal(shape)
    got = _torch_step(m, x, r, torch)
    y, _, _ = instance_norm_forward(x, w, b, rm, rv, not track, momentum, eps)
    np.testing.assert_allclose(y, got[0], rtol=1e-9, atol=1e-10)
    if track:  # running stats are per-channel constants: same gradient as eval BatchNorm
        _close_grads(batch_norm_backward_eval(x, r, w, rm, rv, eps), got, m)
    else:
        _close_grads(instance_norm_backward(x, r, w, eps), got, m)


@pytest.mark.parametrize("shape,ns", [((3, 4, 5), (5,)), ((3, 4, 5), (4, 5)),
                                      ((2, 3, 4, 4), (4, 4)), ((6, 7), (7,))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_torch_layer_norm(shape, ns, affine, bias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    eps = 1e-3
    m = torch.nn.LayerNorm(ns, eps=eps, elementwise_affine=affine, bias=bias).double()
    _randomize(m, torch, rng)
    w, b = _np(m.weight), _np(m.bias)
    x, r = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
    got = _torch_step(m, x, r, torch)
    np.testing.assert_allclose(layer_norm_forward(x, ns, w, b, eps), got[0], rtol=1e-9, atol=1e-10)
    _close_grads(layer_norm_backward(x, r, ns, w, eps), got, m)


@pytest.mark.parametrize("shape,groups", [((2, 6, 2, 2, 2), 3), ((3, 4, 5), 2),
                                          ((2, 4, 3, 3), 1), ((2, 4, 3, 3), 4), ((5, 6), 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_torch_group_norm(shape, groups, affine):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    eps = 1e-3
    m = torch.nn.GroupNorm(groups, shape[1], eps=eps, affine=affine).double()
    _randomize(m, torch, rng)
    w, b = _np(m.weight), _np(m.bias)
    x, r = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
    got = _torch_step(m, x, r, torch)
    np.testing.assert_allclose(group_norm_forward(x, groups, w, b, eps), got[0], rtol=1e-9, atol=1e-10)
    _close_grads(group_norm_backward(x, r, groups, w, eps), got, m)
