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


# The buffers a training step writes: InstanceNorm never counts batches (as torch), and
# SwitchableNorm has no counter.
WRITTEN = [(name, frozen) for name in TRACKING for frozen in ("running_mean", "running_var", "num_batches_tracked")
           if frozen != "num_batches_tracked" or name.startswith("bn")]


@pytest.mark.parametrize("name, frozen", WRITTEN)
def test_a_read_only_buffer_refuses_the_training_step_before_any_write(name, frozen):
    make, shape = TRACKING[name]
    m = make()
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


# -- backward differentiates the forward that ran (issue 12, item 9) ----------------------------------
def _sync_batch_norm(dtype):
    MPI = pytest.importorskip("mpi4py.MPI")
    return nc.SyncBatchNorm(3, comm=MPI.COMM_SELF, dtype=dtype)


WITH_PARAMETERS = {
    "bn2d": (lambda dt: nc.BatchNorm2d(3, dtype=dt), (2, 3, 3, 3), True),
    "bn2d-eval": (lambda dt: nc.BatchNorm2d(3, dtype=dt), (2, 3, 3, 3), False),
    "bn2d-channels-last": (lambda dt: nc.BatchNorm2d(3, dtype=dt), (2, 3, 3, 3), "cl"),
    "in2d": (lambda dt: nc.InstanceNorm2d(3, affine=True, dtype=dt), (2, 3, 3, 3), True),
    "gn": (lambda dt: nc.GroupNorm(3, 3, dtype=dt), (2, 3, 5), True),
    "gn-channels-last": (lambda dt: nc.GroupNorm(1, 3, dtype=dt), (2, 3, 2, 2), "cl"),
    "ln": (lambda dt: nc.LayerNorm((3, 4), dtype=dt), (2, 3, 4), True),
    "sn2d": (lambda dt: SN.SwitchableNorm2d(3, dtype=dt), (2, 3, 3, 3), True),
    "sync": (_sync_batch_norm, (4, 3, 2), True),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", WITH_PARAMETERS)
def test_backward_uses_the_parameters_as_they_were_at_forward(name, dtype):
    """Changing a parameter in place between forward and backward (an optimizer step in
    between, say) changes neither dx nor the gradients: one rule for every layer and dtype."""
    make, shape, mode = WITH_PARAMETERS[name]
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype(dtype)
    if mode == "cl":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, x.ndim - 1, *range(1, x.ndim - 1))
    dy = rng.normal(size=shape).astype(dtype)
    results = []
    for change in (False, True):
        m = make(dtype)
        for k, p in m.parameters().items():
            p[...] = rng.uniform(0.5, 1.5, p.shape)
        if mode is False:
            m(x)
            m.eval()
        m(x)
        if change:
            for p in m.parameters().values():
                p *= 3.0
                p += 1.0
        results.append((m.backward(dy), dict(m.grads)))
        rng = np.random.default_rng(5)  # the same parameters for the second module
        rng.normal(size=shape)
        rng.normal(size=shape)
    (dx0, g0), (dx1, g1) = results
    np.testing.assert_array_equal(dx1, dx0)
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_array_equal(g1[k], g0[k], err_msg=k)
