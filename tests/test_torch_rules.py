"""Where PyTorch refuses an input or a call and normcore must too (and the reverse), with
PyTorch's exception types and words (issue 12, items 10 to 17). Each rule is asserted on its own
and, where torch is installed, side by side with torch 2.13."""
import re
import sys

import numpy as np
import pytest

import normcore as nc
from optional_peers import needs_torch, torch

F = nc.functional


def state_of(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


def assert_state_equal(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


# -- item 10: eps = 0 -----------------------------------------------------------------------------
EPS_WORDS = r"batch_norm eps must be positive during training, but got 0"


@pytest.mark.parametrize("make, shape", [
    (lambda: nc.BatchNorm1d(3, eps=0), (4, 3)),
    (lambda: nc.BatchNorm2d(3, eps=0.0), (2, 3, 2, 2)),
    (lambda: nc.BatchNorm3d(3, eps=0), (2, 3, 1, 2, 2)),
    (lambda: nc.BatchNorm2d(3, eps=0, track_running_stats=False).eval(), (2, 3, 2, 2)),  # batch stats in eval
    (lambda: nc.BatchNorm2d(3, eps=0), (0, 3, 2, 2)),  # also an empty batch, as torch
])
def test_batch_norm_with_batch_statistics_refuses_eps_0(make, shape):
    m = make()
    before, saved = state_of(m), m._saved
    with pytest.raises(ValueError, match=EPS_WORDS):
        m(np.random.default_rng(0).normal(size=shape))
    assert_state_equal(m, before)
    assert m._saved is saved


def test_batch_norm_eps_0_is_fine_in_eval_with_running_statistics():
    m = nc.BatchNorm2d(3, eps=0).eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 2))
    np.testing.assert_allclose(m(x), x, rtol=1e-6)  # running var 1, mean 0


def test_functional_batch_norm_refuses_eps_0_in_training():
    x = np.random.default_rng(0).normal(size=(4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=EPS_WORDS):
        F.batch_norm(x, rm, rv, training=True, eps=0.0)
    assert not rm.any() and (rv == 1).all()
    F.batch_norm(x, rm, rv, training=False, eps=0.0)  # eval: allowed, as torch


@needs_torch
def test_eps_0_refusals_are_torch_s():
    x = torch.randn(4, 3)
    for call in (lambda: torch.nn.BatchNorm1d(3, eps=0)(x),
                 lambda: torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, eps=0.0)):
        with pytest.raises(ValueError, match=EPS_WORDS):
            call()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_instance_norm_eps_0_constant_instance_gives_bias_and_zero_gradients(dtype, layout):
    """torch's InvStd: 1/sqrt(var + eps) is 0 where var + eps is 0, so a constant instance with
    eps = 0 gives bias (not NaN) and zero gradients; the other instances are unchanged."""
    x = np.ones((2, 2, 2, 3), dtype)
    x[1, 1] = np.arange(6, dtype=dtype).reshape(2, 3)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    m = nc.InstanceNorm2d(2, eps=0, affine=True, dtype=dtype)
    m.bias[...] = [0.5, -1.0]
    m.weight[...] = [2.0, 3.0]
    y = m(x)
    dy = np.random.default_rng(1).normal(size=x.shape).astype(dtype)
    dx = m.backward(dy)
    assert (y[0, 0] == 0.5).all() and (y[0, 1] == -1.0).all() and (y[1, 0] == 0.5).all()
    assert (dx[:1] == 0).all() and (dx[1, 0] == 0).all()
    v = x[1, 1].astype(np.float64)
    np.testing.assert_allclose(y[1, 1], 3.0 * (v - v.mean()) / v.std() - 1.0, rtol=1e-5)
    assert np.isfinite(dx).all() and np.abs(dx[1, 1]).max() > 0
    assert np.isfinite(m.grads["weight"]).all()
    fn = F.instance_norm(x, weight=m.weight, bias=m.bias, eps=0.0)
    np.testing.assert_array_equal(fn, y)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_instance_norm_eps_0_as_torch(dtype):
    x = np.ones((2, 2, 4), dtype)
    x[1, 1] = np.arange(4)
    dy = np.random.default_rng(0).normal(size=x.shape).astype(dtype)
    m = nc.InstanceNorm1d(2, eps=0, affine=True, dtype=dtype)
    t = torch.nn.InstanceNorm1d(2, eps=0, affine=True, dtype=getattr(torch, np.dtype(dtype).name))
    with torch.no_grad():
        t.bias[...] = torch.tensor([0.5, -1.0])
    m.bias[...] = [0.5, -1.0]
    xt = torch.tensor(x, requires_grad=True)
    yt = t(xt)
    yt.backward(torch.from_numpy(dy))
    y, dx = m(x), m.backward(dy)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=tol)
    np.testing.assert_allclose(m.grads["weight"], t.weight.grad.numpy(), atol=tol)


# -- item 15: load_state_dict(strict=...) -----------------------------------------------------------
def test_load_state_dict_strict_false_loads_what_matches_and_reports_the_rest():
    m = nc.BatchNorm2d(3)
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    del sd["running_var"]
    sd["extra"] = np.ones(2)
    before_var = m.running_var.copy()
    result = m.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["running_var"] and result.unexpected_keys == ["extra"]
    assert tuple(result) == (["running_var"], ["extra"])
    assert (m.weight == 2).all() and (m.running_mean == 1).all() and int(m.num_batches_tracked) == 1
    np.testing.assert_array_equal(m.running_var, before_var)
    with pytest.raises(KeyError, match="missing key"):
        m.load_state_dict(sd, strict=True)
    assert m.load_state_dict(m.state_dict()) == ([], [])
    with pytest.raises(TypeError, match="strict must be a bool"):
        m.load_state_dict(m.state_dict(), strict="no")


def test_load_state_dict_strict_false_still_checks_every_entry_first():
    m = nc.BatchNorm1d(3)
    sd = {"weight": np.full(3, 5.0), "bias": np.ones(4)}  # bias has the wrong shape
    with pytest.raises(ValueError, match="size mismatch for bias"):
        m.load_state_dict(sd, strict=False)
    assert (m.weight == 1).all()


@needs_torch
def test_load_state_dict_returns_what_torch_returns():
    t = torch.nn.BatchNorm1d(3)
    m = nc.BatchNorm1d(3)
    sd = {k: v for k, v in t.state_dict().items() if k != "bias"}
    sd["extra"] = torch.ones(2)
    assert tuple(m.load_state_dict(sd, strict=False)) == tuple(t.load_state_dict(sd, strict=False))


# -- item 17: a copy does not carry the last forward --------------------------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: nc.BatchNorm2d(4), (8, 4, 16, 16)),
    (lambda: nc.LayerNorm(16), (8, 4, 16, 16)),
    (lambda: nc.GroupNorm(2, 4), (8, 4, 16, 16)),
    (lambda: nc.LocalResponseNorm(3), (8, 4, 16, 16)),
])
def test_pickle_and_deepcopy_leave_the_last_forward_out(make, shape):
    import copy
    import pickle

    m = make()
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    m(x)
    empty = pickle.dumps(make())
    blob = pickle.dumps(m)
    assert len(blob) < len(empty) + 4096 < x.nbytes  # no copy of x inside
    for twin in (pickle.loads(blob), copy.deepcopy(m)):
        with pytest.raises(RuntimeError, match="backward called before any forward"):
            twin.backward(np.ones_like(x))
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(twin.state_dict()[k], v)
    m.backward(np.ones_like(x))  # the original keeps its forward
    m.eval()
    twin = copy.deepcopy(m)
    np.testing.assert_array_equal(twin(x), m(x))


# -- item 6: any 1-D array torch accepts as a parameter or statistic ------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_forms_take_strided_parameters_and_statistics(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 3)).astype(dtype)
    buf = rng.uniform(0.5, 1.5, 32).astype(dtype)
    w, b, rm, rv = buf[::4], buf[1::4], buf[2::4], buf[3::4]  # strided views
    cw, cb = w.copy(), b.copy()
    for training in (False, True):
        rm1, rv1 = buf.copy()[2::4], buf.copy()[3::4]
        rm2, rv2 = rm.copy(), rv.copy()
        y1 = F.batch_norm(x, rm1, rv1, w, b, training=training)
        y2 = F.batch_norm(x, rm2, rv2, cw, cb, training=training)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(rm1, rm2)
        np.testing.assert_array_equal(rv1, rv2)
    np.testing.assert_array_equal(F.instance_norm(x, weight=w, bias=b), F.instance_norm(x, weight=cw, bias=cb))
    rm1, rv1 = buf.copy()[2::4], buf.copy()[3::4]
    F.instance_norm(x, rm1, rv1, use_input_stats=True)
    np.testing.assert_array_equal(F.group_norm(x, 4, w, b), F.group_norm(x, 4, cw, cb))
    wl = np.repeat(buf, 2)[::2][:3]
    np.testing.assert_array_equal(F.layer_norm(x, (3,), wl[::-1], wl), F.layer_norm(x, (3,), wl[::-1].copy(), wl.copy()))
    assert not rm.flags.c_contiguous  # the views really were strided


def test_strided_parameters_of_a_module_work():
    m = nc.BatchNorm1d(4, dtype=np.float64)
    big = np.ones(8)
    m.weight = big[::2]
    x = np.random.default_rng(0).normal(size=(5, 4))
    m(x)
    m.backward(x)
    np.testing.assert_allclose(m(x), nc.BatchNorm1d(4, dtype=np.float64)(x))


# -- item 11: GroupNorm needs more than one value per group ---------------------------------------
@pytest.mark.parametrize("shape", [(1, 2), (1, 2, 1), (1, 2, 1, 1)])
def test_group_norm_with_one_value_per_group_is_refused(shape):
    m = nc.GroupNorm(2, 2)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size \[1, 2"):
        m(np.ones(shape))
    assert m._saved is None
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.group_norm(np.ones(shape), 2)
    m(np.ones((2,) + shape[1:]))  # two samples: two values per (group, batch): as torch, fine


@needs_torch
def test_group_norm_one_value_rule_is_torch_s():
    for shape in [(1, 2), (2, 2), (1, 4), (1, 2, 2)]:
        x = np.random.default_rng(0).normal(size=shape)
        try:
            torch.nn.GroupNorm(2, shape[1], dtype=torch.float64)(torch.from_numpy(x))
            torch_refuses = False
        except ValueError:
            torch_refuses = True
        try:
            nc.GroupNorm(2, shape[1])(x)
            ours_refuses = False
        except ValueError:
            ours_refuses = True
        assert ours_refuses == torch_refuses, shape


# -- item 12: the functional forms check their argument types --------------------------------------
X = np.random.default_rng(0).normal(size=(4, 3, 5))


@pytest.mark.parametrize("call, words", [
    (lambda rm, rv: F.batch_norm(X, rm, rv, training="no"), r"argument 'training' must be bool, not str"),
    (lambda rm, rv: F.batch_norm(X, rm, rv, training=None), r"argument 'training' must be bool, not NoneType"),
    (lambda rm, rv: F.batch_norm(X, rm, rv, training=1), r"argument 'training' must be bool, not int"),
    (lambda rm, rv: F.batch_norm(X, rm, rv, training=True, momentum=None), r"argument 'momentum' must be float"),
    (lambda rm, rv: F.batch_norm(X, rm, rv, training=True, momentum="0.1"), r"argument 'momentum' must be float"),
    (lambda rm, rv: F.instance_norm(X, rm, rv, use_input_stats="yes"), r"argument 'use_input_stats' must be bool"),
    (lambda rm, rv: F.instance_norm(X, rm, rv, use_input_stats=None), r"argument 'use_input_stats' must be bool"),
    (lambda rm, rv: F.instance_norm(X, rm, rv, momentum=None), r"argument 'momentum' must be float"),
    (lambda rm, rv: F.layer_norm(X, {5}), r"normalized_shape must be an int or a sequence of ints \(a tuple or list\), got set"),
    (lambda rm, rv: F.layer_norm(X, {5: 1}), r"got dict"),
    (lambda rm, rv: F.layer_norm(X, "5"), r"got str"),
    (lambda rm, rv: F.layer_norm(X, (d for d in (5,))), r"got generator"),
])
def test_functional_type_errors(call, words):
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match=words):
        call(rm, rv)
    assert not rm.any() and (rv == 1).all()


def test_functional_accepts_what_torch_accepts():
    rm, rv = np.zeros(3), np.ones(3)
    F.batch_norm(X, rm, rv, training=np.bool_(True), momentum=1)  # an int momentum, a NumPy bool
    np.testing.assert_allclose(rm, X.mean(axis=(0, 2)))
    np.testing.assert_array_equal(F.layer_norm(X, [5]), F.layer_norm(X, (5,)))
    np.testing.assert_array_equal(F.layer_norm(X, 5), F.layer_norm(X, (5,)))


@needs_torch
def test_functional_type_errors_are_torch_s():
    x = torch.from_numpy(X)
    for kwargs in [dict(training="no"), dict(training=None), dict(training=True, momentum=None)]:
        with pytest.raises(TypeError):
            torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), **kwargs)
    with pytest.raises(TypeError):
        torch.nn.functional.layer_norm(x, {5})


# -- item 13: numbers beyond float's range are ValueErrors ----------------------------------------
@pytest.mark.parametrize("make, words", [
    (lambda: nc.BatchNorm2d(3, eps=10**400), r"eps must be a finite number >= 0"),
    (lambda: nc.BatchNorm2d(3, momentum=10**400), r"momentum must be finite"),
    (lambda: nc.LayerNorm(3, eps=-10**400), r"eps must be a finite number >= 0"),
    (lambda: nc.GroupNorm(1, 3, eps=10**400), r"eps must be a finite number >= 0"),
    (lambda: nc.LocalResponseNorm(3, alpha=10**400), r"alpha must be finite"),
    (lambda: nc.LocalResponseNorm(3, beta=-10**400), r"beta must be finite"),
    (lambda: nc.LocalResponseNorm(3, k=10**400), r"k must be finite"),
    (lambda: F.batch_norm(X, None, None, training=True, eps=10**400), r"eps must be a finite number >= 0"),
    (lambda: F.local_response_norm(X, 3, alpha=10**400), r"alpha must be finite"),
])
def test_huge_ints_are_value_errors_not_overflow_errors(make, words):
    with pytest.raises(ValueError, match=words):
        make()


# -- item 14: bias=, device=, torch dtypes ---------------------------------------------------------
BIAS_FALSE = [
    (lambda **kw: nc.BatchNorm2d(3, **kw), "BatchNorm2d", (3,), (2, 3, 4, 4)),
    (lambda **kw: nc.BatchNorm1d(3, **kw), "BatchNorm1d", (3,), (4, 3)),
    (lambda **kw: nc.InstanceNorm2d(3, affine=True, **kw), "InstanceNorm2d", (3,), (2, 3, 4, 4)),
    (lambda **kw: nc.GroupNorm(1, 3, **kw), "GroupNorm", (1, 3), (2, 3, 5)),
]


@pytest.mark.parametrize("make, name, args, shape", BIAS_FALSE, ids=[r[1] for r in BIAS_FALSE])
def test_bias_false_gives_a_weight_and_no_bias(make, name, args, shape):
    m = make(bias=False)
    assert m.bias is None and m.weight is not None
    assert "bias" not in m.state_dict() and "bias" not in m.parameters()
    x = np.random.default_rng(0).normal(size=shape)
    m.weight[...] = 2.0
    y = m(x)
    ref = make()
    ref.weight[...] = 2.0
    np.testing.assert_array_equal(y, ref(x))  # a bias of zeros
    m.backward(np.ones_like(x))
    assert set(m.grads) == {"weight"}
    m.reset_parameters()
    assert (m.weight == 1).all()


@needs_torch
@pytest.mark.parametrize("make, name, args, shape", BIAS_FALSE, ids=[r[1] for r in BIAS_FALSE])
def test_bias_false_checkpoints_load_both_ways_and_match_torch(make, name, args, shape):
    kwargs = dict(affine=True) if name.startswith("Instance") else {}
    t = getattr(torch.nn, name)(*args, bias=False, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
    m = make(bias=False, dtype=np.float64)
    m.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    assert sorted(m.state_dict()) == sorted(t.state_dict())
    x = np.random.default_rng(1).normal(size=shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = t(xt)
    yt.backward(torch.ones_like(yt))
    np.testing.assert_allclose(m(x), yt.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(m.backward(np.ones_like(x)), xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(m.grads["weight"], t.weight.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("make", [lambda **kw: nc.BatchNorm2d(3, **kw), lambda **kw: nc.InstanceNorm1d(3, **kw),
                                  lambda **kw: nc.GroupNorm(1, 3, **kw), lambda **kw: nc.LayerNorm(3, **kw)])
def test_device_and_dtype_arguments_as_torch_code_passes_them(make):
    assert make(device=None).dtype == np.float32 and make(dtype=None).dtype == np.float32
    assert make(device="cpu").dtype == np.float32
    for bad in ("cuda", "cuda:0", "meta", 0):
        with pytest.raises(ValueError, match=r"normcore runs on the CPU only: device must be None or 'cpu'"):
            make(device=bad)
    if torch is not None:
        assert make(device=torch.device("cpu"), dtype=torch.float64).dtype == np.float64
        assert make(dtype=torch.float32).dtype == np.float32
        for bad in (torch.float16, torch.bfloat16, torch.int64):
            with pytest.raises(TypeError, match="dtype must be float32 or float64"):
                make(dtype=bad)
        with pytest.raises(ValueError, match="CPU only"):
            make(device=torch.device("meta"))


def test_torch_s_positional_order():
    """torch: (num_features, eps, momentum, affine, track_running_stats, device, dtype)."""
    m = nc.BatchNorm2d(3, 1e-3, 0.2, True, False, "cpu", np.float64)
    assert (m.eps, m.momentum, m.track_running_stats, m.dtype) == (1e-3, 0.2, False, np.float64)
    g = nc.GroupNorm(1, 3, 1e-3, True, None, np.float64)
    assert g.dtype == np.float64
    ln = nc.LayerNorm(3, 1e-3, True, False, None, np.float64)
    assert ln.bias is None and ln.dtype == np.float64


# -- item 16: errors name the public class ----------------------------------------------------------
def _public_layer_classes():
    from normcore.plugins import switchable
    return [nc.BatchNorm1d, nc.BatchNorm2d, nc.BatchNorm3d, nc.InstanceNorm1d, nc.InstanceNorm2d,
            nc.InstanceNorm3d, nc.GroupNorm, nc.LayerNorm, nc.LocalResponseNorm, nc.SyncBatchNorm,
            switchable.SwitchableNorm1d, switchable.SwitchableNorm2d, switchable.SwitchableNorm3d]


@pytest.mark.parametrize("cls", _public_layer_classes(), ids=lambda c: c.__name__)
def test_argument_errors_name_the_public_class(cls):
    with pytest.raises(TypeError) as info:
        cls(3, no_such_argument=1)
    message = str(info.value)
    assert "unexpected keyword argument 'no_such_argument'" in message
    assert not re.search(r"\b_[A-Za-z]\w*\.__init__", message), message  # no private base
    if sys.version_info >= (3, 11):
        assert message.startswith(f"{cls.__name__}.__init__()"), message
    with pytest.raises(TypeError) as info:
        cls(*range(1, 12))
    assert not re.search(r"\b_[A-Za-z]\w*\.__init__", str(info.value)), str(info.value)


def test_a_user_subclass_gets_its_own_name_too():
    class MyNorm(nc.BatchNorm2d):
        pass

    with pytest.raises(TypeError, match=r"MyNorm.__init__\(\) got an unexpected keyword argument 'x'"
                       if sys.version_info >= (3, 11) else "unexpected keyword argument 'x'"):
        MyNorm(3, x=1)
    assert MyNorm(3).num_features == 3 and isinstance(MyNorm(3), nc.BatchNorm2d)


def test_warnings_point_at_the_caller_s_line():
    """InstanceNorm's num_features warning names the user's file, not normcore's lock wrapper."""
    import warnings
    m = nc.InstanceNorm1d(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(np.ones((2, 4, 5)))
        m.forward(np.ones((2, 4, 5)))
    assert len(caught) == 2 and all(w.filename == __file__ for w in caught), [w.filename for w in caught]
