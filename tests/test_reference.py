"""Self-checks of tests/reference.py: finite differences, and torch.nn if available."""
import numpy as np
import pytest

from reference import (
    batch_norm_forward, batch_norm_backward, batch_norm_backward_eval,
    instance_norm_forward, instance_norm_backward,
    layer_norm_forward, layer_norm_backward,
    group_norm_forward, group_norm_backward,
    switchable_norm_forward, switchable_norm_backward, switchable_norm_stats,
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


SN_SHAPES = {1: (5, 4), 2: (3, 4, 3, 2), 3: (2, 4, 2, 3, 2)}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize("population", [False, True])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fd_switchable_norm(dims, population, using_bn, training):
    """dx and every parameter gradient (mean_weight and var_weight too) of the SwitchableNorm
    reference against finite differences of its forward; in eval the running buffers are
    constants."""
    rng = np.random.default_rng(7 + dims)
    shape = SN_SHAPES[dims]
    C = shape[1]
    n_src = (2 if dims == 1 else 3) - (not using_bn)
    params = dict(weight=rng.uniform(0.5, 1.5, C), bias=rng.standard_normal(C),
                  mean_weight=rng.standard_normal(n_src), var_weight=rng.standard_normal(n_src))
    rm = rng.standard_normal(C) if using_bn else None
    rv = rng.uniform(0.5, 2.0, C) if using_bn else None
    x = rng.standard_normal(shape) * 2 + 1
    r = rng.standard_normal(shape)
    opts = dict(using_bn=using_bn, eps=1e-3, population_variance=population)

    def loss():
        y = switchable_norm_forward(x, params["weight"], params["bias"], params["mean_weight"],
                                    params["var_weight"], rm, rv, training, momentum=0.9, **opts)[0]
        return float(np.sum(y * r))

    dx, grads = switchable_norm_backward(x, r, params["weight"], params["mean_weight"], params["var_weight"],
                                         rm, rv, training, **opts)
    assert set(grads) == set(params)
    np.testing.assert_allclose(dx, _numgrad(loss, x), **TOL)
    for name, p in params.items():
        np.testing.assert_allclose(grads[name], _numgrad(loss, p), **TOL, err_msg=name)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_switchable_norm_reference_statistics(dims):
    """The mixed statistics and the running buffers written out by hand (the released code's
    mean(var + mean^2) - mean^2, fine for these well-conditioned values)."""
    rng = np.random.default_rng(20 + dims)
    shape = SN_SHAPES[dims]
    N, C = shape[:2]
    x = rng.standard_normal(shape) + 0.5
    mw, vw = rng.standard_normal(2 if dims == 1 else 3), rng.standard_normal(2 if dims == 1 else 3)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    pm, pv = np.exp(mw) / np.exp(mw).sum(), np.exp(vw) / np.exp(vw).sum()
    if dims == 1:
        means = [x.mean(1, keepdims=True) + 0 * x, x.mean(0, keepdims=True) + 0 * x]
        variances = [x.var(1, ddof=1, keepdims=True) + 0 * x, x.var(0, ddof=1, keepdims=True) + 0 * x]
        mean_bn, var_bn = x.mean(0), x.var(0, ddof=1)
    else:
        xr = x.reshape(N, C, -1)
        m_in, v_in = xr.mean(2), xr.var(2, ddof=1)
        temp = v_in + m_in ** 2
        m_ln = m_in.mean(1, keepdims=True)
        m_bn = m_in.mean(0, keepdims=True)
        means = [m_in, m_ln + 0 * m_in, m_bn + 0 * m_in]
        variances = [v_in, temp.mean(1, keepdims=True) - m_ln ** 2 + 0 * m_in,
                     temp.mean(0, keepdims=True) - m_bn ** 2 + 0 * m_in]
        mean_bn, var_bn = m_bn[0], (temp.mean(0) - m_bn[0] ** 2)
    st = switchable_norm_stats(x, mw, vw, rm, rv, True)
    np.testing.assert_allclose(st["mean"], sum(p * m for p, m in zip(pm, means)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st["var"], sum(p * v for p, v in zip(pv, variances)), rtol=1e-12, atol=1e-12)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    y, nrm, nrv = switchable_norm_forward(x, w, b, mw, vw, rm, rv, True, momentum=0.7)
    np.testing.assert_allclose(nrm, 0.7 * rm + 0.3 * mean_bn, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(nrv, 0.7 * rv + 0.3 * var_bn, rtol=1e-12, atol=1e-12)
    _, nrm, nrv = switchable_norm_forward(x, w, b, mw, vw, rm, rv, True, using_moving_average=False)
    np.testing.assert_allclose(nrm, rm + mean_bn, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(nrv, rv + mean_bn ** 2 + var_bn, rtol=1e-12, atol=1e-12)
    _, nrm, nrv = switchable_norm_forward(x, w, b, mw, vw, rm, rv, False)
    np.testing.assert_array_equal(nrm, rm)  # eval: unchanged
    np.testing.assert_array_equal(nrv, rv)
    shape_c = (1, C) + (1,) * (x.ndim - 2)
    shape_nc = (N, C) + (1,) * (x.ndim - 2)
    expected = ((x - st["mean"].reshape(shape_nc)) / np.sqrt(st["var"].reshape(shape_nc) + 1e-5)
                * w.reshape(shape_c) + b.reshape(shape_c))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


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
