"""SwitchableNorm (normcore.plugins.switchable) against the released algorithm written in PyTorch
(released_switchnorm.ReleasedSwitchNorm; autograd gives every gradient), and finite differences in
float64 (mean_weight and var_weight included)."""
import numpy as np
import pytest

import normcore as nc
import reference as ref
from normcore.plugins.switchable import SwitchableNorm1d, SwitchableNorm2d, SwitchableNorm3d
from optional_peers import needs_torch, torch


CLASSES = {1: SwitchableNorm1d, 2: SwitchableNorm2d, 3: SwitchableNorm3d}
SHAPES = {1: (6, 5), 2: (3, 5, 4, 3), 3: (2, 5, 2, 3, 2)}
OPTIONS = [
    dict(),
    dict(using_moving_average=False),
    dict(using_bn=False),
    dict(last_gamma=True),
    dict(population_variance=True),
    dict(momentum=0.5, eps=1e-3),
]


def randomize(m, t, rng):
    with torch.no_grad():
        for name in ("weight", "bias", "mean_weight", "var_weight"):
            v = rng.normal(size=getattr(m, name).shape) * 0.5 + (1.0 if name == "weight" else 0.0)
            getattr(m, name)[...] = v
            getattr(t, name).copy_(torch.from_numpy(getattr(m, name).astype(np.float64)))


def rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max()) / max(1.0, float(np.abs(b).max()))


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_matches_released_algorithm(dims, options, dtype):
    from released_switchnorm import ReleasedSwitchNorm  # needs torch

    tol = 1e-5 if dtype == np.float32 else 1e-10
    m = CLASSES[dims](5, dtype=dtype, **options)
    t = ReleasedSwitchNorm(5, dims, m.eps, m.momentum, m.using_moving_average, m.using_bn, m.population_variance,
                           dtype=torch.float64)
    rng = np.random.default_rng(dims)
    randomize(m, t, rng)
    for step in range(5):
        if step == 3:
            m.eval()
            t.eval()
        x = (rng.normal(size=SHAPES[dims]) * 2 + 1).astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
        for p in t.parameters():
            p.grad = None
        yt = t(xt)
        yt.backward(torch.from_numpy(dy.astype(np.float64)))
        y = m(x)
        dx = m.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype
        assert rel(y, yt.detach().numpy()) <= tol, f"y step {step}"
        assert rel(dx, xt.grad.numpy()) <= tol, f"dx step {step}"
        for name in ("weight", "bias", "mean_weight", "var_weight"):
            assert rel(m.grads[name], getattr(t, name).grad.numpy()) <= tol, f"grad {name} step {step}"
        if m.using_bn:
            assert rel(m.running_mean, t.running_mean.numpy()) <= tol
            assert rel(m.running_var, t.running_var.numpy()) <= tol


@pytest.mark.parametrize("dims,options", [(2, {}), (2, dict(using_bn=False)), (3, {}), (1, {}),
                                          (2, dict(population_variance=True))], ids=str)
def test_finite_differences(dims, options):
    rng = np.random.default_rng(10 + dims)
    m = CLASSES[dims](5, dtype=np.float64, using_moving_average=True, **options)
    for name, p in m.parameters().items():
        p[...] = rng.normal(size=p.shape) * 0.5 + (1.0 if name == "weight" else 0.0)
    x = rng.normal(size=SHAPES[dims]) * 2 + 1
    r = rng.normal(size=x.shape)
    buffers = {k: getattr(m, k).copy() for k in ("running_mean", "running_var") if getattr(m, k) is not None}

    def loss():
        for k, v in buffers.items():
            getattr(m, k)[...] = v
        return float(np.sum(m(x) * r))

    loss()
    dx = m.backward(r)
    grads = dict(m.grads)
    np.testing.assert_allclose(dx, ref.numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)
    for name, p in m.parameters().items():
        np.testing.assert_allclose(grads[name], ref.numeric_gradient(loss, p), rtol=1e-6, atol=1e-8)


def test_registry_names_and_plugin_module():
    assert nc.get_norm("SwitchableNorm2d") is SwitchableNorm2d
    assert nc.get_norm("switchable-norm-1d") is SwitchableNorm1d
    assert nc.plugins.switchable.SwitchableNorm3d is SwitchableNorm3d
    m = nc.create_norm("switchable_norm2d", 8)
    assert m.momentum == 0.9 and SwitchableNorm3d(8).momentum == 0.997 and SwitchableNorm1d(8).momentum == 0.997


def test_state_dict_keys_and_released_shapes():
    m = SwitchableNorm2d(4)
    assert list(m.state_dict()) == ["weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"]
    assert np.array_equal(m.running_var, np.zeros(4)) and np.array_equal(m.mean_weight, np.ones(3))
    assert np.array_equal(SwitchableNorm2d(4, last_gamma=True).weight, np.zeros(4))
    assert list(SwitchableNorm2d(4, using_bn=False).state_dict()) == ["weight", "bias", "mean_weight", "var_weight"]
    released = {"weight": np.full((1, 4, 1, 1), 2.0), "bias": np.zeros((1, 4, 1, 1)), "mean_weight": np.ones(3),
                "var_weight": np.ones(3), "running_mean": np.full((1, 4, 1), 0.5), "running_var": np.ones((1, 4, 1))}
    m.load_state_dict(released)
    assert np.array_equal(m.weight, np.full(4, 2.0)) and np.array_equal(m.running_mean, np.full(4, 0.5))
    m1 = SwitchableNorm1d(4)
    m1.load_state_dict({"weight": np.ones((1, 4)), "bias": np.zeros((1, 4)), "mean_weight": np.ones(2),
                        "var_weight": np.ones(2), "running_mean": np.zeros((1, 4)), "running_var": np.ones((1, 4))})
    with pytest.raises(ValueError, match="size mismatch"):
        m.load_state_dict(dict(released, weight=np.ones((1, 5, 1, 1))))


def test_errors():
    m = SwitchableNorm2d(4)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="4 channels"):
        m(np.ones((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        m(np.ones((2, 4, 1, 1)))
    with pytest.raises(TypeError):
        m(np.ones((2, 4, 3, 3), np.int64))
    with pytest.raises(RuntimeError, match="before any forward"):
        m.backward(np.ones((2, 4, 3, 3)))
    with pytest.raises(ValueError):
        SwitchableNorm2d(4, momentum=1.5)
