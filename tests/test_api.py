"""The Module interface, state dicts, error rules and messages, and that a failed call
changes no state."""
import numpy as np
import pytest

import normcore as nc

ALL = {
    "bn1d": lambda: nc.BatchNorm1d(3),
    "bn2d": lambda: nc.BatchNorm2d(3),
    "bn3d": lambda: nc.BatchNorm3d(3),
    "in1d": lambda: nc.InstanceNorm1d(3, affine=True, track_running_stats=True),
    "in2d": lambda: nc.InstanceNorm2d(3),
    "in3d": lambda: nc.InstanceNorm3d(3, track_running_stats=True),
    "ln": lambda: nc.LayerNorm((3, 4)),
    "gn": lambda: nc.GroupNorm(3, 3),
}
GOOD_SHAPE = {"bn1d": (4, 3, 4), "bn2d": (2, 3, 4, 4), "bn3d": (2, 3, 2, 2, 2), "in1d": (2, 3, 4),
              "in2d": (2, 3, 4, 4), "in3d": (2, 3, 2, 2, 2), "ln": (2, 3, 4), "gn": (2, 3, 4, 4)}


def snapshot(m):
    """Everything a call could change: parameters, buffers, the cached forward, grads."""
    state = {k: v.copy() for k, v in m.state_dict().items()}
    return state, m._saved, {k: v.copy() for k, v in m.grads.items()}, m.training


def assert_unchanged(m, snap):
    state, saved, grads, training = snap
    now = m.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert np.array_equal(now[k], state[k]), k
    assert m._saved is saved
    assert m.grads.keys() == grads.keys()
    assert m.training == training


@pytest.mark.parametrize("name", ALL)
def test_module_interface(name):
    m = ALL[name]()
    assert isinstance(m, nc.Module)
    assert m.training is True
    assert m.eval() is m and m.training is False
    assert m.train() is m and m.training is True
    assert m.train(False) is m and not m.training
    m.train()
    x = np.random.default_rng(0).normal(size=GOOD_SHAPE[name]).astype(np.float32)
    y = m(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert m.forward(x).shape == x.shape
    dx = m.backward(np.ones_like(x))
    assert dx.shape == x.shape
    params = m.parameters()
    assert set(m.grads) == set(params)
    for k, p in params.items():
        assert p is getattr(m, k)
        assert m.grads[k].shape == p.shape and m.grads[k].dtype == p.dtype
    with pytest.raises(ValueError, match="boolean"):
        m.train("yes")


def test_module_base_class():
    m = nc.Module()
    assert m.training and m.grads == {} and m.parameters() == {} and m.state_dict() == {}
    with pytest.raises(NotImplementedError):
        m(np.zeros(3))
    with pytest.raises(NotImplementedError):
        m.backward(np.zeros(3))

    class Scale(nc.Module):
        _parameter_names = ("weight",)

        def __init__(self):
            super().__init__()
            self.weight = np.full(1, 2.0)

        def forward(self, x):
            self._x = x
            return x * self.weight

        def backward(self, dy):
            self.grads = {"weight": np.array([np.sum(dy * self._x)])}
            return dy * self.weight

    s = Scale()
    assert np.array_equal(s(np.ones(2)), [2.0, 2.0])
    assert s.state_dict() == {"weight": np.full(1, 2.0)}
    s.load_state_dict({"weight": np.array([3.0])})
    assert s.weight[0] == 3.0


def test_attributes_and_state_dict_keys():
    bn = nc.BatchNorm2d(4)
    assert bn.weight.dtype == np.float32 and np.array_equal(bn.weight, np.ones(4))
    assert np.array_equal(bn.bias, np.zeros(4)) and np.array_equal(bn.running_var, np.ones(4))
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    bn = nc.BatchNorm2d(4, affine=False, track_running_stats=False, dtype=np.float64)
    assert bn.weight is None and bn.bias is None and bn.running_mean is None and bn.num_batches_tracked is None
    assert bn.state_dict() == {} and bn.parameters() == {}
    assert nc.InstanceNorm2d(2).state_dict() == {}
    assert list(nc.LayerNorm(5, bias=False).state_dict()) == ["weight"]
    assert nc.LayerNorm((2, 3)).weight.shape == (2, 3)
    assert nc.LayerNorm(5, elementwise_affine=False).state_dict() == {}
    assert list(nc.GroupNorm(2, 4).state_dict()) == ["weight", "bias"]
    assert nc.BatchNorm2d(3, dtype=np.float64).running_mean.dtype == np.float64
    assert repr(nc.BatchNorm2d(3)) == "BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"


def test_state_dict_round_trip_and_copy():
    a = nc.BatchNorm2d(3)
    a(np.random.default_rng(1).normal(size=(4, 3, 2, 2)).astype(np.float32))
    sd = a.state_dict()
    sd["running_mean"][0] = 123.0  # a copy: the module is not touched
    assert a.running_mean[0] != 123.0
    b = nc.BatchNorm2d(3)
    ref_weight = b.weight
    b.load_state_dict(sd)
    assert b.weight is ref_weight  # loaded in place: references stay valid
    assert b.running_mean[0] == 123.0 and int(b.num_batches_tracked) == 1
    b.load_state_dict({k: v.tolist() for k, v in a.state_dict().items()})  # lists load too
    assert np.array_equal(b.running_mean, a.running_mean)


@pytest.mark.parametrize("bad,exc,words", [
    ({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)},
     KeyError, "missing key"),
    ({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3),
      "num_batches_tracked": np.array(1), "extra": np.ones(3)}, KeyError, "unexpected key"),
    ({"weight": np.ones(4), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3),
      "num_batches_tracked": np.array(1)}, ValueError, "size mismatch for weight"),
    ({"weight": np.ones(3), "bias": np.array(["a", "b", "c"]), "running_mean": np.zeros(3),
      "running_var": np.ones(3), "num_batches_tracked": np.array(1)}, TypeError, "bias"),
    ({"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3),
      "num_batches_tracked": np.array(1.5)}, TypeError, "num_batches_tracked"),
    ([("weight", np.ones(3))], TypeError, "mapping"),
])
def test_load_state_dict_refuses_and_changes_nothing(bad, exc, words):
    m = nc.BatchNorm2d(3)
    m.weight[...] = 7.0
    snap = snapshot(m)
    with pytest.raises(exc, match=words):
        m.load_state_dict(bad)
    assert_unchanged(m, snap)


# ---------------------------------------------------------------------------------------------
# Error rules (PyTorch's words, as ValueError / TypeError), each leaving the module unchanged.
# ---------------------------------------------------------------------------------------------
ERRORS = [
    ("bn2d", (2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
    ("bn1d", (2, 3, 4, 5), ValueError, r"expected 2D or 3D input \(got 4D input\)"),
    ("bn3d", (2, 3, 4, 5), ValueError, r"expected 5D input \(got 4D input\)"),
    ("bn2d", (2, 4, 4, 4), ValueError, r"expected input with 3 channels"),
    ("bn2d", (1, 3, 1, 1), ValueError, r"Expected more than 1 value per channel when training, got input size"),
    ("bn1d", (1, 3), ValueError, r"Expected more than 1 value per channel when training"),
    ("in2d", (2, 3, 1, 1), ValueError, r"Expected more than 1 spatial element when training"),
    ("in2d", (3, 4), ValueError, r"expected 3D or 4D input \(got 2D input\)"),
    ("in1d", (2, 4, 5), ValueError, r"expected input's size at dim=1 to match num_features \(3\), but got: 4"),
    ("in3d", (2, 4, 2, 2, 2), ValueError, r"match num_features \(3\)"),
    ("gn", (2, 4, 3), ValueError, r"divisible by num_groups"),
    ("gn", (3,), ValueError, r"Expected at least 2 dimensions for input tensor but received 1"),
    ("gn", (2, 6, 3), ValueError, r"Expected weight to be a vector of size equal to the number of channels"),
    ("ln", (2, 3, 5), ValueError, r"Given normalized_shape=\[3, 4\], expected input with shape \[\*, 3, 4\], "
                                  r"but got input of size\[2, 3, 5\]"),
    ("ln", (4,), ValueError, r"Given normalized_shape"),
]


@pytest.mark.parametrize("name,shape,exc,words", ERRORS, ids=lambda v: str(v) if not isinstance(v, type) else v.__name__)
def test_bad_input_raises_and_changes_nothing(name, shape, exc, words):
    m = ALL[name]()
    m(np.random.default_rng(0).normal(size=GOOD_SHAPE[name]).astype(np.float32))
    m.backward(np.ones(GOOD_SHAPE[name], np.float32))
    snap = snapshot(m)
    with pytest.raises(exc, match=words):
        m(np.ones(shape, np.float32))
    assert_unchanged(m, snap)
    # The last good forward is still the one backward refers to.
    assert m.backward(np.ones(GOOD_SHAPE[name], np.float32)).shape == GOOD_SHAPE[name]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex64, object, np.float16, "U3"])
def test_non_float_dtypes_raise_type_error(name, dtype):
    m = ALL[name]()
    snap = snapshot(m)
    with pytest.raises(TypeError, match="float32 or float64"):
        m(np.ones(GOOD_SHAPE[name], dtype=dtype))
    assert_unchanged(m, snap)


def test_lists_are_converted():
    y = nc.BatchNorm1d(2)([[1, 2], [3, 5], [4, 4]])
    assert y.dtype == np.float64 and y.shape == (3, 2)
    with pytest.raises(TypeError):
        nc.BatchNorm1d(2)("not an array")


def test_float64_input_with_float32_parameters():
    m = nc.GroupNorm(2, 4)
    x = np.random.default_rng(2).normal(size=(2, 4, 3))
    y = m(x)
    assert y.dtype == np.float64
    assert m.backward(np.ones_like(x)).dtype == np.float64
    assert m.grads["weight"].dtype == np.float32
    assert nc.LayerNorm(3)(x.astype(np.float32)).dtype == np.float32
    assert nc.LayerNorm(3, dtype=np.float64)(x.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("name", ALL)
def test_backward_errors(name):
    m = ALL[name]()
    with pytest.raises(RuntimeError, match="before any forward"):
        m.backward(np.ones(GOOD_SHAPE[name], np.float32))
    x = (np.ones(GOOD_SHAPE[name]) + np.arange(GOOD_SHAPE[name][-1])).astype(np.float32)
    m(x)
    bad = GOOD_SHAPE[name][:-1] + (GOOD_SHAPE[name][-1] + 1,)
    snap = snapshot(m)
    with pytest.raises(ValueError, match="dy must have the shape"):
        m.backward(np.ones(bad, np.float32))
    with pytest.raises(TypeError):
        m.backward(np.ones(GOOD_SHAPE[name], np.int64))
    assert_unchanged(m, snap)
    assert m.backward(np.ones(GOOD_SHAPE[name], np.float64)).dtype == np.float32  # dy cast to x's dtype


@pytest.mark.parametrize("make,exc,words", [
    (lambda: nc.BatchNorm2d(0), ValueError, "num_features"),
    (lambda: nc.BatchNorm2d(-2), ValueError, "num_features"),
    (lambda: nc.BatchNorm2d(2.5), TypeError, "num_features"),
    (lambda: nc.BatchNorm2d(3, eps=-1e-5), ValueError, "eps"),
    (lambda: nc.BatchNorm2d(3, momentum="x"), TypeError, "momentum"),
    (lambda: nc.BatchNorm2d(3, affine=1), TypeError, "affine"),
    (lambda: nc.BatchNorm2d(3, dtype=np.int32), TypeError, "dtype"),
    (lambda: nc.InstanceNorm2d(0), ValueError, "num_features"),
    (lambda: nc.GroupNorm(4, 6), ValueError, r"num_channels \(6\) must be divisible by num_groups \(4\)"),
    (lambda: nc.GroupNorm(0, 6), ValueError, "num_groups"),
    (lambda: nc.LayerNorm(()), ValueError, "at least 1-dimensional"),
    (lambda: nc.LayerNorm("3"), TypeError, "normalized_shape"),
    (lambda: nc.LayerNorm((3, -1)), ValueError, "negative"),
])
def test_invalid_constructor_arguments(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


def test_instance_norm_channel_mismatch_without_affine_warns():
    with pytest.warns(UserWarning, match="does not match num_features"):
        y = nc.InstanceNorm2d(3)(np.random.default_rng(0).normal(size=(2, 4, 3, 3)))
    assert y.shape == (2, 4, 3, 3)


def test_batch_norm_without_per_channel_state_accepts_any_channel_count():
    # As PyTorch: with neither affine parameters nor running statistics nothing depends on C.
    assert nc.BatchNorm2d(3, affine=False, track_running_stats=False)(np.ones((2, 5, 2, 2))).shape == (2, 5, 2, 2)


def test_running_stats_and_counter_semantics():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (8, 2, 5)).astype(np.float64)
    m = nc.BatchNorm1d(2, momentum=None, dtype=np.float64)
    m(x)
    m(x * 2)
    assert int(m.num_batches_tracked) == 2
    means = [x.mean((0, 2)), (2 * x).mean((0, 2))]
    np.testing.assert_allclose(m.running_mean, (means[0] + means[1]) / 2, rtol=1e-12)
    m.eval()
    before = m.state_dict()
    m(x)
    for k, v in m.state_dict().items():
        assert np.array_equal(v, before[k])
    inorm = nc.InstanceNorm1d(2, track_running_stats=True)
    inorm(x.astype(np.float32))
    assert int(inorm.num_batches_tracked) == 0  # PyTorch never counts InstanceNorm batches
    assert not np.array_equal(inorm.running_mean, np.zeros(2))
    inorm_none = nc.InstanceNorm1d(2, track_running_stats=True, momentum=None)
    inorm_none(x)
    assert np.array_equal(inorm_none.running_mean, np.zeros(2))  # momentum None: factor 0


@pytest.mark.parametrize("name", ALL)
def test_empty_batch(name):
    m = ALL[name]()
    shape = (0,) + GOOD_SHAPE[name][1:]
    y = m(np.ones(shape, np.float32))
    assert y.shape == shape
    dx = m.backward(np.ones(shape, np.float32))
    assert dx.shape == shape
    for g in m.grads.values():
        assert not g.any()


def test_functional_errors_and_in_place_update():
    F = nc.functional
    x = np.random.default_rng(4).normal(size=(4, 3, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="must be given when training=False"):
        F.batch_norm(x, None, None)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    F.batch_norm(x, rm, rv, training=True)
    assert rm.any()
    with pytest.raises(ValueError, match="running_mean should contain 3 elements"):
        F.batch_norm(x, np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="weight should contain 3 elements"):
        F.instance_norm(x, weight=np.ones(2))
    with pytest.raises(ValueError, match="Given normalized_shape"):
        F.layer_norm(x, (4,))
    with pytest.raises(ValueError, match="divisible"):
        F.group_norm(x, 2)
    with pytest.raises(TypeError):
        F.layer_norm(x.astype(np.int32), 5)


def test_threads_api():
    default = nc.get_num_threads()
    assert default >= 1
    try:
        nc.set_num_threads(3)
        assert nc.get_num_threads() == 3
        with pytest.raises(ValueError):
            nc.set_num_threads(0)
        with pytest.raises(TypeError):
            nc.set_num_threads(1.5)
        assert nc.get_num_threads() == 3
    finally:
        nc.set_num_threads(None)
    assert nc.get_num_threads() == default
    assert isinstance(nc.openmp_enabled(), bool)
