"""A call that raises changes nothing, even when it fails at the very end, while writing state
(issue 12, item 4): every destination is checked and every value cast before the first write."""
import warnings

import numpy as np
import pytest

import normcore as nc
from normcore.plugins import switchable as SN

F = nc.functional

TRACKING = {
    "bn1d": (lambda: nc.BatchNorm1d(3), (4, 3)),
    "bn1d-cma": (lambda: nc.BatchNorm1d(3, momentum=None), (4, 3, 2)),
    "bn2d": (lambda: nc.BatchNorm2d(3), (2, 3, 2, 2)),
    "bn3d-float64": (lambda: nc.BatchNorm3d(3, dtype=np.float64), (2, 3, 1, 2, 2)),
    "in1d": (lambda: nc.InstanceNorm1d(3, track_running_stats=True), (2, 3, 4)),
    "in2d-affine": (lambda: nc.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 2, 2)),
    "sn2d": (lambda: SN.SwitchableNorm2d(3), (2, 3, 2, 2)),
}


def full_state(m):
    return {k: np.array(v, copy=True) for k, v in m.state_dict().items()}


def assert_state(m, before):
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("name", TRACKING)
@pytest.mark.parametrize("frozen", ["running_mean", "running_var", "num_batches_tracked"])
def test_a_read_only_buffer_refuses_the_training_step_before_any_write(name, frozen):
    make, shape = TRACKING[name]
    m = make()
    if getattr(m, frozen, None) is None:
        pytest.skip(f"{name} has no {frozen}")
    if name.startswith("in") and frozen == "num_batches_tracked":
        pytest.skip("InstanceNorm never counts batches (as torch): its counter is not written")
    x = np.random.default_rng(0).normal(size=shape)
    m(x)  # a good step first: the saved forward and state are not the defaults
    before, saved = full_state(m), m._saved
    getattr(m, frozen).setflags(write=False)
    with pytest.raises(ValueError, match=f"{frozen} is read-only"):
        m(x * 2 + 1)
    assert_state(m, before)
    assert m._saved is saved
    getattr(m, frozen).setflags(write=True)
    m(x)  # and it works again once writeable


def test_functional_read_only_running_stat_changes_neither():
    x = np.random.default_rng(0).normal(size=(4, 3, 2))
    rm, rv = np.zeros(3), np.ones(3)
    rv.setflags(write=False)
    for call in (lambda: F.batch_norm(x, rm, rv, training=True),
                 lambda: F.instance_norm(x, rm, rv, use_input_stats=True)):
        with pytest.raises(ValueError, match="running_var is read-only"):
            call()
        assert not rm.any()


def test_a_cast_that_overflows_under_warnings_as_errors_writes_nothing():
    """float32 buffers, a float64 batch beyond float32: the cast warns; as an error, nothing is
    written (not num_batches_tracked nor running_mean before running_var fails)."""
    m = nc.BatchNorm1d(2, momentum=1.0)
    x = np.array([[1e39, 0.0], [-1e39, 1.0], [3e39, 2.0]])
    before = full_state(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="overflow"):
            m(x)
    assert_state(m, before)


@pytest.mark.parametrize("name", TRACKING)
def test_load_state_dict_into_a_read_only_buffer_writes_nothing(name):
    m = TRACKING[name][0]()
    good = {k: v + (3 if v.dtype.kind in "iu" else 0.5) for k, v in m.state_dict().items()}
    last = list(good)[-1]
    getattr(m, last).setflags(write=False)
    before = full_state(m)
    with pytest.raises(ValueError, match=f"{last} is read-only"):
        m.load_state_dict(good)
    assert_state(m, before)


def test_load_state_dict_with_a_value_that_warns_writes_nothing():
    m = nc.BatchNorm1d(2)
    sd = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in m.state_dict().items()}
    sd["weight"] = sd["weight"] + 1.0
    sd["running_var"] = np.array([1e300, 1.0])  # the float32 cast overflows: a RuntimeWarning
    before = full_state(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            m.load_state_dict(sd)
    assert_state(m, before)
    m.load_state_dict({**sd, "running_var": np.array([2.0, 1.0])})  # the same without the overflow
    assert m.weight[0] == 2.0 and m.running_var[0] == 2.0
