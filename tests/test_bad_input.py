"""Bad input, layer by layer: every refused call raises the documented exception with words that
say what was wrong, and changes nothing (parameters, buffers, num_batches_tracked, the cached
forward, the grads, the training flag); backward still works on the last good forward.

Exception rules (PyTorch's where it has one): ValueError with torch's words for shape errors
(where torch raises RuntimeError), TypeError for dtype errors, KeyError for missing / unexpected
state-dict keys, RuntimeError for backward before any forward.

Each layer has a table of rows (id, kind, payload, exception, regex); ``test_bad_call`` runs every
row of every table on a module that has already done a good forward and backward.
"""
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import normcore as nc
from normcore.plugins import switchable as SN
from optional_peers import needs_torch, torch

F = nc.functional
TF = torch.nn.functional if torch is not None else None
V, T, K = ValueError, TypeError, KeyError

PER_CHANNEL = r"Expected more than 1 value per channel when training"
SPATIAL = r"Expected more than 1 spatial element"
FLOAT_WORDS = r"float32 or float64"
DY_SHAPE = r"dy must have the shape of the last forward's input"


# ---------------------------------------------------------------------------------------------
# The layers: a module with state (parameters and / or buffers where the layer has them), the
# shape of a good input, and the matching torch module (None where torch has none).
# ---------------------------------------------------------------------------------------------
LAYERS = {
    "bn1d": (lambda: nc.BatchNorm1d(3), (4, 3, 5), lambda: torch.nn.BatchNorm1d(3)),
    "bn2d": (lambda: nc.BatchNorm2d(3), (2, 3, 4, 4), lambda: torch.nn.BatchNorm2d(3)),
    "bn3d": (lambda: nc.BatchNorm3d(3), (2, 3, 2, 3, 4), lambda: torch.nn.BatchNorm3d(3)),
    "in1d": (lambda: nc.InstanceNorm1d(3, affine=True, track_running_stats=True), (2, 3, 5),
             lambda: torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True)),
    "in2d": (lambda: nc.InstanceNorm2d(3, affine=True), (2, 3, 4, 4),
             lambda: torch.nn.InstanceNorm2d(3, affine=True)),
    "in3d": (lambda: nc.InstanceNorm3d(3, track_running_stats=True), (2, 3, 2, 2, 3),
             lambda: torch.nn.InstanceNorm3d(3, track_running_stats=True)),
    "gn": (lambda: nc.GroupNorm(3, 6), (2, 6, 5), lambda: torch.nn.GroupNorm(3, 6)),
    "ln": (lambda: nc.LayerNorm((3, 4)), (2, 3, 4), lambda: torch.nn.LayerNorm((3, 4))),
    "lrn": (lambda: nc.LocalResponseNorm(3, alpha=0.1, beta=0.75, k=2.0), (2, 5, 4),
            lambda: torch.nn.LocalResponseNorm(3, alpha=0.1, beta=0.75, k=2.0)),
    "sn2d": (lambda: SN.SwitchableNorm2d(3), (2, 3, 4, 4), None),
    "sn1d": (lambda: SN.SwitchableNorm1d(3), (4, 3), None),
    "sn3d": (lambda: SN.SwitchableNorm3d(3), (2, 3, 2, 2, 3), None),
}


def good_data(name, dtype=np.float32):
    shape = LAYERS[name][1]
    rng = np.random.default_rng(sum(map(ord, name)))
    x = (rng.normal(size=shape) * 2 + 0.5).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    return x, dy


def randomise_state(m, seed=7):
    """Parameters and buffers away from their defaults, so that any write to them shows."""
    rng = np.random.default_rng(seed)
    for k in m._state_names():
        a = getattr(m, k)
        if a.dtype.kind == "f":
            a[...] = rng.uniform(0.5, 1.5, a.shape)
        else:
            a[...] = 5


def used(name):
    """A module after a good forward and backward: (module, x, dy, dx of that backward, grads)."""
    m = LAYERS[name][0]()
    randomise_state(m)
    x, dy = good_data(name)
    m(x)
    dx = m.backward(dy)
    return m, x, dy, dx, {k: v.copy() for k, v in m.grads.items()}


def snapshot(m):
    """Everything a call could change."""
    return dict(
        state={k: v.copy() for k, v in m.state_dict().items()},
        arrays={k: getattr(m, k) for k in m._state_names()},
        saved=m._saved,
        grads_dict=m.grads,
        grads={k: (v, v.copy()) for k, v in m.grads.items()},
        training=m.training,
        attrs=dict(vars(m)),
    )


def assert_unchanged(m, snap):
    now = m.state_dict()
    assert now.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now[k].dtype == v.dtype and now[k].shape == v.shape, k
        np.testing.assert_array_equal(now[k], v, err_msg=k)
    for k, a in snap["arrays"].items():
        assert getattr(m, k) is a, f"{k} was replaced rather than left alone"
    assert m._saved is snap["saved"], "the cached forward (_saved) changed"
    assert m.grads is snap["grads_dict"]
    assert m.grads.keys() == snap["grads"].keys()
    for k, (arr, copy) in snap["grads"].items():
        assert m.grads[k] is arr
        np.testing.assert_array_equal(arr, copy, err_msg=f"grads[{k!r}]")
    assert m.training is snap["training"]
    now_attrs = vars(m)
    assert now_attrs.keys() == snap["attrs"].keys()
    for k, v in snap["attrs"].items():
        assert now_attrs[k] is v, f"attribute {k} changed"


def assert_backward_on_last_good_forward(m, dy, dx_ref, grads_ref):
    dx = m.backward(dy)
    np.testing.assert_array_equal(dx, dx_ref)
    assert m.grads.keys() == grads_ref.keys()
    for k in grads_ref:
        np.testing.assert_array_equal(m.grads[k], grads_ref[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# The tables.
# ---------------------------------------------------------------------------------------------
def a(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# Per layer: the rows about the input's shape (wrong ndim, wrong channels, one value per channel)
# and the words a 0-d input must raise.
SHAPE_ROWS = {
    "bn1d": [
        ("1D", (3,), V, r"expected 2D or 3D input \(got 1D input\)"),
        ("4D", (4, 3, 5, 2), V, r"expected 2D or 3D input \(got 4D input\)"),
        ("channels-2D", (4, 2), V, r"expected input with 3 channels"),
        ("channels-3D", (4, 4, 5), V, r"expected input with 3 channels"),
        ("one-value-2D", (1, 3), V, PER_CHANNEL),
        ("one-value-3D", (1, 3, 1), V, PER_CHANNEL),
    ],
    "bn2d": [
        ("3D", (2, 3, 4), V, r"expected 4D input \(got 3D input\)"),
        ("5D", (2, 3, 4, 4, 1), V, r"expected 4D input \(got 5D input\)"),
        ("channels", (2, 4, 4, 4), V, r"expected input with 3 channels"),
        ("one-value", (1, 3, 1, 1), V, PER_CHANNEL),
    ],
    "bn3d": [
        ("4D", (2, 3, 4, 4), V, r"expected 5D input \(got 4D input\)"),
        ("6D", (2, 3, 2, 2, 2, 2), V, r"expected 5D input \(got 6D input\)"),
        ("channels", (2, 2, 2, 2, 2), V, r"expected input with 3 channels"),
        ("one-value", (1, 3, 1, 1, 1), V, PER_CHANNEL),
    ],
    "in1d": [
        ("1D", (5,), V, r"expected 2D or 3D input \(got 1D input\)"),
        ("4D", (2, 3, 5, 2), V, r"expected 2D or 3D input \(got 4D input\)"),
        ("channels", (2, 4, 5), V, r"expected input's size at dim=1 to match num_features \(3\), but got: 4"),
        ("channels-unbatched", (4, 5), V, r"expected input's size at dim=0 to match num_features \(3\), but got: 4"),
        ("one-spatial", (2, 3, 1), V, SPATIAL + " when training"),
        ("one-spatial-unbatched", (3, 1), V, SPATIAL + " when training"),
    ],
    "in2d": [
        ("2D", (4, 4), V, r"expected 3D or 4D input \(got 2D input\)"),
        ("5D", (2, 3, 4, 4, 1), V, r"expected 3D or 4D input \(got 5D input\)"),
        ("channels", (2, 2, 4, 4), V, r"match num_features \(3\), but got: 2"),
        ("one-spatial", (2, 3, 1, 1), V, SPATIAL + " when training"),
        ("one-spatial-unbatched", (3, 1, 1), V, SPATIAL + " when training"),
    ],
    "in3d": [
        ("3D", (2, 2, 3), V, r"expected 4D or 5D input \(got 3D input\)"),
        ("6D", (2, 3, 2, 2, 3, 1), V, r"expected 4D or 5D input \(got 6D input\)"),
        ("channels", (2, 4, 2, 2, 3), V, r"match num_features \(3\) of the running statistics, but got: 4"),
        ("one-spatial", (2, 3, 1, 1, 1), V, SPATIAL + " when training"),
    ],
    "gn": [
        ("1D", (6,), V, r"Expected at least 2 dimensions for input tensor but received 1"),
        ("channels-not-divisible", (2, 4, 5), V,
         r"Expected number of channels in input to be divisible by num_groups, but got input of shape "
         r"\[2, 4, 5\] and num_groups=3"),
        ("channels-divisible-but-not-6", (2, 9, 5), V,
         r"Expected weight to be a vector of size equal to the number of channels in input"),
    ],
    "ln": [
        ("1D", (4,), V, r"Given normalized_shape=\[3, 4\], expected input with shape \[\*, 3, 4\], "
                        r"but got input of size\[4\]"),
        ("trailing", (2, 3, 5), V, r"but got input of size\[2, 3, 5\]"),
        ("trailing-swapped", (2, 4, 3), V, r"but got input of size\[2, 4, 3\]"),
    ],
    "lrn": [
        ("2D", (5, 4), V, r"Expected 3D or higher dimensionality input \(got 2 dimensions\)"),
        ("1D", (5,), V, r"Expected 3D or higher dimensionality input \(got 1 dimensions\)"),
    ],
    "sn2d": [
        ("3D", (2, 3, 4), V, r"expected 4D input \(got 3D input\)"),
        ("5D", (2, 3, 4, 4, 1), V, r"expected 4D input \(got 5D input\)"),
        ("channels", (2, 4, 4, 4), V, r"expected input with 3 channels"),
        ("one-spatial", (2, 3, 1, 1), V, SPATIAL),
    ],
    "sn1d": [
        ("1D", (3,), V, r"expected 2D input \(got 1D input\)"),
        ("3D", (4, 3, 2), V, r"expected 2D input \(got 3D input\)"),
        ("channels", (4, 4), V, r"expected input with 3 channels"),
        ("one-sample", (1, 3), V, r"Expected more than 1 value"),
    ],
    "sn3d": [
        ("4D", (2, 3, 4, 4), V, r"expected 5D input \(got 4D input\)"),
        ("6D", (2, 3, 2, 2, 2, 2), V, r"expected 5D input \(got 6D input\)"),
        ("channels", (2, 2, 2, 2, 3), V, r"expected input with 3 channels"),
        ("one-spatial", (2, 3, 1, 1, 1), V, SPATIAL),
    ],
}
ZERO_D = {
    "bn1d": r"expected 2D or 3D input \(got 0D input\)",
    "bn2d": r"expected 4D input \(got 0D input\)",
    "bn3d": r"expected 5D input \(got 0D input\)",
    "in1d": r"expected 2D or 3D input \(got 0D input\)",
    "in2d": r"expected 3D or 4D input \(got 0D input\)",
    "in3d": r"expected 4D or 5D input \(got 0D input\)",
    "gn": r"Expected at least 2 dimensions for input tensor but received 0",
    "ln": r"expected input with shape \[\*, 3, 4\], but got input of size\[\]",
    "lrn": r"Expected 3D or higher dimensionality input \(got 0 dimensions\)",
    "sn2d": r"expected 4D input \(got 0D input\)",
    "sn1d": r"expected 2D input \(got 0D input\)",
    "sn3d": r"expected 5D input \(got 0D input\)",
}
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object, "U3", "S3", np.float16,
              np.longdouble]


def _nested(shape, value):
    return value if not shape else [_nested(shape[1:], value) for _ in range(shape[0])]


def forward_rows(name):
    shape = LAYERS[name][1]
    rows = [(f"x-{sid}", "forward", a(s), exc, words) for sid, s, exc, words in SHAPE_ROWS[name]]
    zero = ZERO_D[name]
    rows += [
        ("x-0d-float32", "forward", np.array(1.5, np.float32), V, zero),
        ("x-0d-float64", "forward", np.array(1.5), V, zero),
        ("x-numpy-scalar", "forward", np.float64(1.5), V, zero),
        ("x-python-float", "forward", 1.5, V, zero),
        ("x-python-int", "forward", 2, V, zero),
    ]
    rows += [(f"x-dtype-{np.dtype(dt).name}", "forward", np.ones(shape, dt), T, FLOAT_WORDS) for dt in BAD_DTYPES]
    rows += [
        ("x-str", "forward", "abc", T, FLOAT_WORDS),
        ("x-bytes", "forward", b"abc", T, FLOAT_WORDS),
        ("x-None", "forward", None, T, FLOAT_WORDS),
        ("x-dict", "forward", {"x": 1.0}, T, FLOAT_WORDS),
        ("x-list-of-str", "forward", _nested(shape, "a"), T, FLOAT_WORDS),
        ("x-list-of-complex", "forward", _nested(shape, 1 + 2j), T, FLOAT_WORDS),
        ("x-list-of-None", "forward", _nested(shape, None), T, FLOAT_WORDS),
        ("x-list-of-float16-arrays", "forward", list(np.ones(shape, np.float16)), T, FLOAT_WORDS),
        ("x-ragged-list", "forward", [_nested(shape[1:], 1.0), [1.0]], T, r"could not be converted"),
    ]
    return rows


def backward_rows(name):
    shape = LAYERS[name][1]
    bigger = shape[:-1] + (shape[-1] + 1,)
    rows = [
        ("dy-last-dim+1", "backward", a(bigger), V, DY_SHAPE),
        ("dy-reversed", "backward", a(shape[::-1]), V, DY_SHAPE),
        ("dy-broadcastable", "backward", a((1,) + shape[1:]), V, DY_SHAPE),
        ("dy-flat", "backward", a((math.prod(shape),)), V, DY_SHAPE),
        ("dy-extra-dim", "backward", a(shape + (1,)), V, DY_SHAPE),
        ("dy-0d", "backward", np.array(1.0, np.float32), V, DY_SHAPE),
        ("dy-python-float", "backward", 1.0, V, DY_SHAPE),
        ("dy-list-wrong-shape", "backward", a(bigger).tolist(), V, DY_SHAPE),
    ]
    rows += [(f"dy-dtype-{np.dtype(dt).name}", "backward", np.ones(shape, dt), T, FLOAT_WORDS) for dt in BAD_DTYPES]
    rows += [
        ("dy-str", "backward", "abc", T, FLOAT_WORDS),
        ("dy-None", "backward", None, T, FLOAT_WORDS),
        ("dy-list-of-str", "backward", _nested(shape, "a"), T, FLOAT_WORDS),
        ("dy-list-of-complex", "backward", _nested(shape, 1j), T, FLOAT_WORDS),
        ("dy-ragged-list", "backward", [_nested(shape[1:], 1.0), [1.0]], T, r"could not be converted"),
    ]
    return rows


def _other_valid_state(m):
    """A valid state dict with every value different from the module's (so a partial load shows)."""
    return {k: v + (5 if v.dtype.kind in "iu" else 0.25) for k, v in m.state_dict().items()}


def state_rows(name):
    m = LAYERS[name][0]()
    good = _other_valid_state(m)
    keys = list(good)
    rows = [
        ("sd-list-of-pairs", "load", list(good.items()), T, r"mapping"),
        ("sd-None", "load", None, T, r"mapping"),
        ("sd-str", "load", "weight", T, r"mapping"),
        ("sd-int", "load", 3, T, r"mapping"),
        ("sd-unexpected", "load", {**good, "extra": np.ones(3)}, K, r"unexpected key.*extra"),
        ("sd-unexpected-prefixed", "load", {**good, "norm.weight": np.ones(3)}, K, r"unexpected key"),
    ]
    for i, k in enumerate(keys):
        current = good[k]
        wrong_shape = np.ones((1,), current.dtype) if current.ndim == 0 else np.ones(tuple(d + 1 for d in current.shape))
        rows += [
            (f"sd-missing-{k}", "load", {j: v for j, v in good.items() if j != k}, K, rf"missing key.*{k}"),
            (f"sd-shape-{k}", "load", {**good, k: wrong_shape}, V, rf"size mismatch for {k}"),
            (f"sd-str-{k}", "load", {**good, k: np.full(current.shape, "a")}, T, rf"state_dict\['{k}'\]"),
        ]
        if i in (0, len(keys) - 1):  # the first entry and the last one checked
            rows += [
                (f"sd-missing-{k}-and-unexpected", "load",
                 {**{j: v for j, v in good.items() if j != k}, "extra": 1.0}, K,
                 rf"missing key.*{k}.*unexpected key.*extra"),
                # a torch tensor as the value: the row is kept without torch and skips (see needs_torch_row)
                (f"sd-torch-shape-{k}", "load",
                 {**good, k: torch.from_numpy(wrong_shape) if torch is not None else None}, V,
                 rf"size mismatch for {k}"),
                (f"sd-complex-{k}", "load", {**good, k: current.astype(np.complex128)}, T, rf"state_dict\['{k}'\]"),
                (f"sd-None-{k}", "load", {**good, k: None}, T, rf"state_dict\['{k}'\]"),
                (f"sd-ragged-{k}", "load", {**good, k: [[1.0], [1.0, 2.0]]}, T, rf"state_dict\['{k}'\]"),
            ]
        if current.dtype.kind in "iu":
            rows.append((f"sd-float-{k}", "load", {**good, k: current.astype(np.float64) + 0.5}, T,
                         rf"state_dict\['{k}'\] must hold integers"))
    return rows


def other_rows(name):
    return [
        ("train-str", "train", "yes", V, r"training mode is expected to be boolean"),
        ("train-int", "train", 1, V, r"training mode is expected to be boolean"),
        ("train-None", "train", None, V, r"training mode is expected to be boolean"),
    ]


TABLES = {name: forward_rows(name) + backward_rows(name) + state_rows(name) + other_rows(name) for name in LAYERS}
ROWS = {(name, row[0]): row for name, rows in TABLES.items() for row in rows}
assert len(ROWS) == sum(map(len, TABLES.values())), "row ids repeat"


def needs_torch_row(row_id, *values):
    """A table row as a pytest.param, marked needs_torch where its payload is a torch object."""
    return pytest.param(*values, id=row_id, marks=needs_torch if "-torch-" in row_id or row_id.endswith("-torch")
                        else ())


def call(m, kind, payload):
    if kind == "forward":
        return m(payload)
    if kind == "backward":
        return m.backward(payload)
    if kind == "load":
        return m.load_state_dict(payload)
    if kind == "train":
        return m.train(payload)
    raise AssertionError(kind)


@pytest.mark.parametrize("name,row_id", [needs_torch_row(f"{name}::{row_id}", name, row_id) for name, row_id in ROWS])
def test_bad_call(name, row_id):
    """One row of a layer's table, on a module that has done a good forward and backward."""
    _, kind, payload, exc, words = ROWS[name, row_id]
    m, x, dy, dx_ref, grads_ref = used(name)
    snap = snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused call raises; it does not warn and go on
        with pytest.raises(exc, match=words):
            call(m, kind, payload)
    assert_unchanged(m, snap)
    assert_backward_on_last_good_forward(m, dy, dx_ref, grads_ref)


@pytest.mark.parametrize("name", LAYERS)
def test_bad_calls_in_eval_change_nothing(name):
    """The same refusals in eval mode (where BN / IN read the running statistics)."""
    m, x, dy, dx_ref, grads_ref = used(name)
    m.eval()
    y_eval = m(x)
    dx_eval = m.backward(dy)
    grads_eval = {k: v.copy() for k, v in m.grads.items()}
    for row_id, kind, payload, exc, words in TABLES[name]:
        if kind != "forward" or "one-" in row_id:  # one value per channel is fine in eval (see below)
            continue
        snap = snapshot(m)
        with pytest.raises(exc, match=words):
            call(m, kind, payload)
        assert_unchanged(m, snap)
    assert_backward_on_last_good_forward(m, dy, dx_eval, grads_eval)
    np.testing.assert_array_equal(m(x), y_eval)


# ---------------------------------------------------------------------------------------------
# Positive rows: Python lists (and tuples, and lists of arrays) are converted.
# ---------------------------------------------------------------------------------------------
def assert_same_module_state(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k], err_msg=k)


@pytest.mark.parametrize("name", LAYERS)
def test_lists_are_converted(name):
    x, dy = good_data(name)
    cases = [
        ("list-of-floats", x.tolist(), np.asarray(x.tolist()), dy.tolist(), np.asarray(dy.tolist())),
        ("tuple", tuple(x.tolist()), np.asarray(x.tolist()), tuple(dy.tolist()), np.asarray(dy.tolist())),
        ("list-of-ints", np.round(x * 10).astype(int).tolist(), np.round(x * 10).astype(np.float64),
         np.round(dy * 10).astype(int).tolist(), np.round(dy * 10).astype(np.float64)),
        ("list-of-float32-arrays", list(x), x, list(dy), dy),
    ]
    for label, xl, xa, dyl, dya in cases:
        m1, m2 = used(name)[0], used(name)[0]
        y1, y2 = m1(xl), m2(xa)
        assert y1.dtype == xa.dtype and y1.shape == xa.shape, label
        np.testing.assert_array_equal(y1, y2, err_msg=label)
        assert_same_module_state(m1, m2)
        dx1, dx2 = m1.backward(dyl), m2.backward(dya)
        assert dx1.dtype == xa.dtype, label
        np.testing.assert_array_equal(dx1, dx2, err_msg=label)
        for k in m2.grads:
            np.testing.assert_array_equal(m1.grads[k], m2.grads[k], err_msg=f"{label} {k}")


# ---------------------------------------------------------------------------------------------
# Backward before any forward, and after failed forwards.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LAYERS)
def test_backward_before_any_forward(name):
    m = LAYERS[name][0]()
    x, dy = good_data(name)
    with pytest.raises(RuntimeError, match=r"backward called before any forward"):
        m.backward(dy)
    snap = snapshot(m)
    bad = [(row_id, payload, exc, words) for row_id, kind, payload, exc, words in TABLES[name] if kind == "forward"]
    assert len(bad) > 20
    for row_id, payload, exc, words in bad:
        with pytest.raises(exc, match=words):
            m(payload)
        assert_unchanged(m, snap)
        # A fresh module whose forward failed has still no forward to go back through.
        with pytest.raises(RuntimeError, match=r"backward called before any forward"):
            m.backward(dy)
        assert_unchanged(m, snap)


@pytest.mark.parametrize("name", LAYERS)
def test_backward_after_failed_forward_uses_last_good_one(name):
    m, x, dy, dx_ref, grads_ref = used(name)
    for row_id, kind, payload, exc, words in TABLES[name]:
        if kind == "forward":
            with pytest.raises(exc):
                m(payload)
    assert_backward_on_last_good_forward(m, dy, dx_ref, grads_ref)


# ---------------------------------------------------------------------------------------------
# One value per channel: an error in training (and wherever batch / instance statistics are used),
# fine in eval with running statistics; as torch.
# ---------------------------------------------------------------------------------------------
# words: the start of torch's message.
ONE_VALUE = [
    ("bn1d", lambda: nc.BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), (1, 3), PER_CHANNEL),
    ("bn1d", lambda: nc.BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), (1, 3, 1), PER_CHANNEL),
    ("bn2d", lambda: nc.BatchNorm2d(3), lambda: torch.nn.BatchNorm2d(3), (1, 3, 1, 1), PER_CHANNEL),
    ("bn3d", lambda: nc.BatchNorm3d(3), lambda: torch.nn.BatchNorm3d(3), (1, 3, 1, 1, 1), PER_CHANNEL),
    ("bn1d-untracked", lambda: nc.BatchNorm1d(3, track_running_stats=False),
     lambda: torch.nn.BatchNorm1d(3, track_running_stats=False), (1, 3), PER_CHANNEL),
    ("in1d", lambda: nc.InstanceNorm1d(3, track_running_stats=True),
     lambda: torch.nn.InstanceNorm1d(3, track_running_stats=True), (2, 3, 1), SPATIAL),
    ("in1d-unbatched", lambda: nc.InstanceNorm1d(3, track_running_stats=True),
     lambda: torch.nn.InstanceNorm1d(3, track_running_stats=True), (3, 1), SPATIAL),
    ("in2d", lambda: nc.InstanceNorm2d(3, track_running_stats=True),
     lambda: torch.nn.InstanceNorm2d(3, track_running_stats=True), (2, 3, 1, 1), SPATIAL),
    ("in3d", lambda: nc.InstanceNorm3d(3, track_running_stats=True),
     lambda: torch.nn.InstanceNorm3d(3, track_running_stats=True), (2, 3, 1, 1, 1), SPATIAL),
    ("in2d-untracked", lambda: nc.InstanceNorm2d(3), lambda: torch.nn.InstanceNorm2d(3), (2, 3, 1, 1), SPATIAL),
]


@needs_torch
@pytest.mark.parametrize("name,make,make_torch,shape,words", ONE_VALUE, ids=[f"{r[0]}-{r[3]}" for r in ONE_VALUE])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_one_value_per_channel_as_torch(name, make, make_torch, shape, words, training):
    x = a(shape, seed=3)
    m, t = make().train(training), make_torch().train(training)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = t(torch.from_numpy(x)).detach().numpy()
    except ValueError as e:
        assert re.search(words, str(e))
        snap = snapshot(m)
        with pytest.raises(ValueError, match=words) as info:
            m(x)
        assert re.search(r"when training, got input size \(", str(info.value))
        assert_unchanged(m, snap)
        return
    np.testing.assert_allclose(m(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Empty batch: eval gives an empty array; training does what torch 2.13 does (the output, the
# running statistics and num_batches_tracked after), except where torch fails (see below).
# ---------------------------------------------------------------------------------------------
EMPTY = {
    "bn1d-2D": (lambda: nc.BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), (0, 3)),
    "bn1d": (lambda: nc.BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), (0, 3, 5)),
    "bn1d-cma": (lambda: nc.BatchNorm1d(3, momentum=None), lambda: torch.nn.BatchNorm1d(3, momentum=None), (0, 3, 5)),
    "bn2d": (lambda: nc.BatchNorm2d(3), lambda: torch.nn.BatchNorm2d(3), (0, 3, 4, 4)),
    "bn3d": (lambda: nc.BatchNorm3d(3), lambda: torch.nn.BatchNorm3d(3), (0, 3, 2, 2, 2)),
    "in1d": (lambda: nc.InstanceNorm1d(3), lambda: torch.nn.InstanceNorm1d(3), (0, 3, 5)),
    "in1d-affine-tracked": (LAYERS["in1d"][0], LAYERS["in1d"][2], (0, 3, 5)),
    "in2d-affine": (LAYERS["in2d"][0], LAYERS["in2d"][2], (0, 3, 4, 4)),
    "in3d-tracked": (LAYERS["in3d"][0], LAYERS["in3d"][2], (0, 3, 2, 2, 3)),
    "gn": (LAYERS["gn"][0], LAYERS["gn"][2], (0, 6, 5)),
    "ln": (LAYERS["ln"][0], LAYERS["ln"][2], (0, 3, 4)),
    "lrn": (LAYERS["lrn"][0], LAYERS["lrn"][2], (0, 5, 4)),
    "lrn-4D": (LAYERS["lrn"][0], LAYERS["lrn"][2], (0, 5, 2, 2)),
}
# Where torch 2.13 fails on an empty batch normcore keeps its own rule (an empty output, nothing
# updated, nothing counted). These are the torch failures, asserted below so that a change shows.
TORCH_EMPTY_FAILURES = {
    # InstanceNorm with affine parameters: an IndexError from inside torch, in training and eval.
    "in1d-affine-tracked": "IndexError",
    "in2d-affine": "IndexError",
    # InstanceNorm tracking running stats: training sets them to NaN (a mean over no instances).
    "in3d-tracked": "nan-running-stats",
}


def _torch_from(m, t):
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict().items()})
    return t


@needs_torch
@pytest.mark.parametrize("name", EMPTY)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_as_torch(name, training):
    make, make_torch, shape = EMPTY[name]
    m = make()
    randomise_state(m)
    x_good = a((2,) + shape[1:], seed=1)
    m(x_good)
    m.backward(np.ones_like(x_good))
    t = _torch_from(m, make_torch())
    m.train(training)
    t.train(training)
    before = m.state_dict()
    x = np.zeros(shape, np.float32)
    y = m(x)
    assert type(y) is np.ndarray and y.shape == shape and y.dtype == np.float32
    # backward goes through the empty forward: an empty dx, zero gradients.
    dx = m.backward(np.zeros(shape, np.float32))
    assert dx.shape == shape and dx.dtype == np.float32
    assert m.grads.keys() == m.parameters().keys()
    for k, g in m.grads.items():
        assert g.shape == getattr(m, k).shape and not g.any(), k
    after = m.state_dict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ty = t(torch.from_numpy(x))
        torch_failure = None
        tstate = {k: v.numpy() for k, v in t.state_dict().items()}
        if any(np.isnan(v).any() for v in tstate.values() if v.dtype.kind == "f"):
            torch_failure = "nan-running-stats"
    except IndexError:
        torch_failure = "IndexError"
    expected_failure = TORCH_EMPTY_FAILURES.get(name)
    if expected_failure == "nan-running-stats" and not training:
        expected_failure = None
    assert torch_failure == expected_failure, f"torch 2.13 on an empty batch: {torch_failure}"
    if torch_failure is None:
        assert tuple(ty.shape) == shape
        assert after.keys() == tstate.keys()
        for k in after:
            np.testing.assert_allclose(after[k], tstate[k], rtol=1e-6, err_msg=k)
    else:  # normcore's rule: nothing updated, nothing counted
        for k in after:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    if "running_mean" in before:
        np.testing.assert_array_equal(after["running_mean"], before["running_mean"])
        np.testing.assert_array_equal(after["running_var"], before["running_var"])
        counted = training and name.startswith("bn")
        assert int(after["num_batches_tracked"]) == int(before["num_batches_tracked"]) + counted


@pytest.mark.parametrize("cls", ["SwitchableNorm1d", "SwitchableNorm2d", "SwitchableNorm3d"])
@pytest.mark.parametrize("population_variance", [False, True], ids=["unbiased", "population"])
@pytest.mark.parametrize("using_bn", [True, False], ids=["bn", "no-bn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_switchable_empty_batch(cls, population_variance, using_bn, training):
    """No torch layer to follow: the plugin's rules. Eval (and training without the BN branch,
    whose statistics are all per sample) gives an empty output, as every built-in does; training
    with the BN branch has no batch statistics to take and refuses, changing nothing."""
    C = 3
    spatial = {"SwitchableNorm1d": (), "SwitchableNorm2d": (4, 4), "SwitchableNorm3d": (2, 2, 3)}[cls]
    m = getattr(SN, cls)(C, using_bn=using_bn, population_variance=population_variance)
    randomise_state(m)
    x_good = a((4, C) + spatial, seed=2)
    m(x_good)
    m.backward(np.ones_like(x_good))
    m.train(training)
    x = np.zeros((0, C) + spatial, np.float32)
    if training and using_bn:
        snap = snapshot(m)
        with pytest.raises(ValueError, match=r"at least one sample|Expected more than 1 value per sample"):
            m(x)
        assert_unchanged(m, snap)
        return
    before = m.state_dict()
    y = m(x)
    assert y.shape == x.shape and y.dtype == np.float32
    dx = m.backward(np.zeros_like(x))
    assert dx.shape == x.shape
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Constructor arguments.
# ---------------------------------------------------------------------------------------------
CHANNEL_CLASSES = [nc.BatchNorm1d, nc.BatchNorm2d, nc.BatchNorm3d, nc.InstanceNorm1d, nc.InstanceNorm2d,
                   nc.InstanceNorm3d]
NAN, INF = float("nan"), float("inf")


def _ctor_rows():
    rows = []
    for cls in CHANNEL_CLASSES:
        c = cls.__name__
        rows += [
            (f"{c}-nf0", lambda cls=cls: cls(0), V, r"num_features must be a positive int"),
            (f"{c}-nf-neg", lambda cls=cls: cls(-3), V, r"num_features must be a positive int"),
            (f"{c}-nf-float", lambda cls=cls: cls(2.5), T, r"num_features must be an int"),
            (f"{c}-nf-float-integral", lambda cls=cls: cls(3.0), T, r"num_features must be an int"),
            (f"{c}-nf-str", lambda cls=cls: cls("3"), T, r"num_features must be an int"),
            (f"{c}-nf-None", lambda cls=cls: cls(None), T, r"num_features must be an int"),
            (f"{c}-nf-bool", lambda cls=cls: cls(True), T, r"num_features must be an int"),
            (f"{c}-eps-neg", lambda cls=cls: cls(3, eps=-1e-5), V, r"eps"),
            (f"{c}-eps-nan", lambda cls=cls: cls(3, eps=NAN), V, r"eps"),
            (f"{c}-eps-inf", lambda cls=cls: cls(3, eps=INF), V, r"eps"),
            (f"{c}-eps-str", lambda cls=cls: cls(3, eps="1e-5"), T, r"eps"),
            (f"{c}-eps-None", lambda cls=cls: cls(3, eps=None), T, r"eps"),
            (f"{c}-momentum-str", lambda cls=cls: cls(3, momentum="0.1"), T, r"momentum"),
            (f"{c}-momentum-nan", lambda cls=cls: cls(3, momentum=NAN), V, r"momentum"),
            (f"{c}-momentum-inf", lambda cls=cls: cls(3, momentum=INF), V, r"momentum"),
            (f"{c}-momentum-list", lambda cls=cls: cls(3, momentum=[0.1]), T, r"momentum"),
            (f"{c}-affine-int", lambda cls=cls: cls(3, affine=1), T, r"affine must be a bool"),
            (f"{c}-affine-str", lambda cls=cls: cls(3, affine="yes"), T, r"affine must be a bool"),
            (f"{c}-affine-None", lambda cls=cls: cls(3, affine=None), T, r"affine must be a bool"),
            (f"{c}-track-int", lambda cls=cls: cls(3, track_running_stats=0), T, r"track_running_stats must be a bool"),
            (f"{c}-dtype-int32", lambda cls=cls: cls(3, dtype=np.int32), T, FLOAT_WORDS),
            (f"{c}-dtype-float16", lambda cls=cls: cls(3, dtype=np.float16), T, FLOAT_WORDS),
            (f"{c}-dtype-complex", lambda cls=cls: cls(3, dtype=np.complex64), T, FLOAT_WORDS),
            (f"{c}-dtype-garbage", lambda cls=cls: cls(3, dtype="nonsense"), T, FLOAT_WORDS),
            (f"{c}-dtype-torch", lambda cls=cls: cls(3, dtype=torch.float16), T, FLOAT_WORDS),
        ]
    G = nc.GroupNorm
    rows += [
        ("GroupNorm-not-divisible", lambda: G(4, 6), V, r"num_channels \(6\) must be divisible by num_groups \(4\)"),
        ("GroupNorm-more-groups", lambda: G(8, 4), V, r"num_channels \(4\) must be divisible by num_groups \(8\)"),
        ("GroupNorm-groups0", lambda: G(0, 6), V, r"num_groups must be a positive int"),
        ("GroupNorm-groups-neg", lambda: G(-2, 6), V, r"num_groups must be a positive int"),
        ("GroupNorm-groups-float", lambda: G(2.0, 6), T, r"num_groups must be an int"),
        ("GroupNorm-groups-None", lambda: G(None, 6), T, r"num_groups must be an int"),
        ("GroupNorm-channels0", lambda: G(2, 0), V, r"num_channels must be a positive int"),
        ("GroupNorm-channels-neg", lambda: G(2, -4), V, r"num_channels must be a positive int"),
        ("GroupNorm-channels-float", lambda: G(2, 6.0), T, r"num_channels must be an int"),
        ("GroupNorm-eps-neg", lambda: G(2, 6, eps=-1.0), V, r"eps"),
        ("GroupNorm-eps-nan", lambda: G(2, 6, eps=NAN), V, r"eps"),
        ("GroupNorm-eps-inf", lambda: G(2, 6, eps=INF), V, r"eps"),
        ("GroupNorm-eps-str", lambda: G(2, 6, eps="x"), T, r"eps"),
        ("GroupNorm-affine-int", lambda: G(2, 6, affine=1), T, r"affine must be a bool"),
        ("GroupNorm-dtype", lambda: G(2, 6, dtype=np.int64), T, FLOAT_WORDS),
    ]
    L = nc.LayerNorm
    rows += [
        ("LayerNorm-empty-tuple", lambda: L(()), V, r"at least 1-dimensional"),
        ("LayerNorm-empty-list", lambda: L([]), V, r"at least 1-dimensional"),
        ("LayerNorm-negative", lambda: L(-1), V, r"negative"),
        ("LayerNorm-negative-in-tuple", lambda: L((3, -1)), V, r"negative"),
        ("LayerNorm-float", lambda: L(3.0), T, r"normalized_shape must be an int or a sequence of ints"),
        ("LayerNorm-float-in-tuple", lambda: L((3, 4.0)), T, r"normalized_shape must be an int or a sequence of ints"),
        ("LayerNorm-str", lambda: L("3"), T, r"normalized_shape must be an int or a sequence of ints"),
        ("LayerNorm-None", lambda: L(None), T, r"normalized_shape must be an int or a sequence of ints"),
        ("LayerNorm-bool", lambda: L(True), T, r"normalized_shape must be an int or a sequence of ints"),
        ("LayerNorm-bool-in-tuple", lambda: L((3, True)), T, r"normalized_shape must be an int or a sequence of ints"),
        ("LayerNorm-eps-neg", lambda: L(3, eps=-1e-5), V, r"eps"),
        ("LayerNorm-eps-nan", lambda: L(3, eps=NAN), V, r"eps"),
        ("LayerNorm-eps-inf", lambda: L(3, eps=INF), V, r"eps"),
        ("LayerNorm-elementwise_affine-int", lambda: L(3, elementwise_affine=1), T, r"elementwise_affine must be a bool"),
        ("LayerNorm-bias-str", lambda: L(3, bias="no"), T, r"bias must be a bool"),
        ("LayerNorm-dtype", lambda: L(3, dtype=np.float16), T, FLOAT_WORDS),
    ]
    LRN = nc.LocalResponseNorm
    rows += [
        ("LRN-size0", lambda: LRN(0), V, r"size must be a positive int"),
        ("LRN-size-neg", lambda: LRN(-1), V, r"size must be a positive int"),
        ("LRN-size-float", lambda: LRN(2.0), T, r"size must be an int"),
        ("LRN-size-str", lambda: LRN("2"), T, r"size must be an int"),
        ("LRN-size-None", lambda: LRN(None), T, r"size must be an int"),
        ("LRN-size-bool", lambda: LRN(True), T, r"size must be an int"),
    ]
    for arg in ("alpha", "beta", "k"):
        rows += [
            (f"LRN-{arg}-str", lambda arg=arg: LRN(3, **{arg: "0.5"}), T, rf"{arg} must be a real number"),
            (f"LRN-{arg}-None", lambda arg=arg: LRN(3, **{arg: None}), T, rf"{arg} must be a real number"),
            (f"LRN-{arg}-complex", lambda arg=arg: LRN(3, **{arg: 1j}), T, rf"{arg} must be a real number"),
            (f"LRN-{arg}-bool", lambda arg=arg: LRN(3, **{arg: True}), T, rf"{arg} must be a real number"),
            (f"LRN-{arg}-nan", lambda arg=arg: LRN(3, **{arg: NAN}), V, rf"{arg} must be finite"),
            (f"LRN-{arg}-inf", lambda arg=arg: LRN(3, **{arg: INF}), V, rf"{arg} must be finite"),
        ]
    for cls in (SN.SwitchableNorm1d, SN.SwitchableNorm2d, SN.SwitchableNorm3d):
        c = cls.__name__
        rows += [
            (f"{c}-nf0", lambda cls=cls: cls(0), V, r"num_features must be a positive int"),
            (f"{c}-nf-float", lambda cls=cls: cls(3.0), T, r"num_features must be an int"),
            (f"{c}-nf-bool", lambda cls=cls: cls(True), T, r"num_features must be an int"),
            (f"{c}-eps-neg", lambda cls=cls: cls(3, eps=-1e-5), V, r"eps"),
            (f"{c}-eps-nan", lambda cls=cls: cls(3, eps=NAN), V, r"eps"),
            (f"{c}-eps-inf", lambda cls=cls: cls(3, eps=INF), V, r"eps"),
            (f"{c}-eps-str", lambda cls=cls: cls(3, eps="1e-5"), T, r"eps"),
            (f"{c}-momentum-above-1", lambda cls=cls: cls(3, momentum=1.5), V, r"momentum"),
            (f"{c}-momentum-negative", lambda cls=cls: cls(3, momentum=-0.1), V, r"momentum"),
            (f"{c}-momentum-nan", lambda cls=cls: cls(3, momentum=NAN), V, r"momentum"),
            (f"{c}-momentum-str", lambda cls=cls: cls(3, momentum="0.9"), T, r"momentum"),
            (f"{c}-using_bn-int", lambda cls=cls: cls(3, using_bn=1), T, r"using_bn must be a bool"),
            (f"{c}-moving-average-str", lambda cls=cls: cls(3, using_moving_average="y"), T,
             r"using_moving_average must be a bool"),
            (f"{c}-dtype-int", lambda cls=cls: cls(3, dtype=np.int32), T, FLOAT_WORDS),
            (f"{c}-dtype-garbage", lambda cls=cls: cls(3, dtype="nonsense"), T, FLOAT_WORDS),
        ]
    return rows


CTOR_ROWS = _ctor_rows()


@pytest.mark.parametrize("make,exc,words", [needs_torch_row(*r) for r in CTOR_ROWS])
def test_invalid_constructor_arguments(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


VALID_CTORS = [
    ("BatchNorm2d-numpy-scalars", lambda: nc.BatchNorm2d(np.int64(3), eps=np.float32(1e-5), momentum=np.float32(0.1),
                                                          affine=np.bool_(True))),
    ("BatchNorm2d-momentum-None", lambda: nc.BatchNorm2d(3, momentum=None)),
    ("BatchNorm2d-eps-0", lambda: nc.BatchNorm2d(3, eps=0)),
    ("GroupNorm-numpy-scalars", lambda: nc.GroupNorm(np.int32(2), np.int64(6), eps=np.float32(1e-5))),
    ("LayerNorm-numpy-shape", lambda: nc.LayerNorm(np.array([3, 4]))),
    ("LayerNorm-zero-size", lambda: nc.LayerNorm(0)),
    ("LRN-numpy-scalars", lambda: nc.LocalResponseNorm(np.int64(3), alpha=np.float32(1e-4), beta=np.float64(0.75),
                                                       k=np.int64(1))),
    ("LRN-negative-alpha-beta-k", lambda: nc.LocalResponseNorm(3, alpha=-1e-4, beta=-0.5, k=-1.0)),  # as torch
    ("SwitchableNorm2d-numpy-scalars", lambda: SN.SwitchableNorm2d(np.int64(3), eps=np.float32(1e-5),
                                                                   momentum=np.float32(0.5))),
    ("SwitchableNorm2d-int-eps", lambda: SN.SwitchableNorm2d(3, eps=0, momentum=1)),
]


@pytest.mark.parametrize("make", [r[1] for r in VALID_CTORS], ids=[r[0] for r in VALID_CTORS])
def test_valid_constructor_arguments(make):
    m = make()
    assert isinstance(m, nc.Module)


LRN_HUGE_SIZE = """
import numpy as np, normcore as nc
size = {size}
x = np.ones((2, 3, 4))
try:
    y = nc.LocalResponseNorm(size)(x)
except (MemoryError, ValueError, OverflowError) as e:
    print("refused", type(e).__name__, e)
else:
    # every channel is in the window: y = x * (k + alpha / size * sum(x^2)) ** -beta = 1.0 here
    expected = (1.0 + 1e-4 / size * 3.0) ** -0.75
    assert np.allclose(y, expected, rtol=1e-12, atol=0), (y.ravel()[:4], expected)
    print("ok")
"""


@pytest.mark.parametrize("size", ["2**40", "2**62", "2**63 - 1", "2**64"])
def test_lrn_huge_size_gives_the_right_answer_or_a_clean_error(size):
    """A size far beyond C (the window then holds every channel) must give the right result or a
    Python exception; never a crash or garbage. Run in a subprocess: the failure is a segfault."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", LRN_HUGE_SIZE.format(size=size)], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"returncode {proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-1500:]}"


# ---------------------------------------------------------------------------------------------
# The functional API: the same refusals, and the running_mean / running_var passed in untouched.
# ---------------------------------------------------------------------------------------------
XF = a((4, 3, 5), seed=5)


def _readonly(v):
    v = v.view()
    v.flags.writeable = False
    return v


FUNCTIONAL_ROWS = []
for fn, kw in (("batch_norm", dict(training=True)), ("batch_norm-eval", dict(training=False)),
               ("instance_norm", dict(use_input_stats=True))):
    f = getattr(F, fn.split("-")[0])
    min_ndim = 3 if fn == "instance_norm" else 2
    FUNCTIONAL_ROWS += [
        (f"{fn}-x-{np.dtype(dt).name}", lambda rm, rv, f=f, kw=kw, dt=dt: f(XF.astype(dt), rm, rv, **kw), T, FLOAT_WORDS)
        for dt in (np.int32, np.int64, np.bool_, np.complex64, np.float16, object, "U3")
    ]
    FUNCTIONAL_ROWS += [
        (f"{fn}-x-str", lambda rm, rv, f=f, kw=kw: f("abc", rm, rv, **kw), T, FLOAT_WORDS),
        (f"{fn}-x-None", lambda rm, rv, f=f, kw=kw: f(None, rm, rv, **kw), T, FLOAT_WORDS),
        (f"{fn}-x-ragged", lambda rm, rv, f=f, kw=kw: f([[1.0, 2.0, 3.0], [1.0]], rm, rv, **kw), T,
         r"could not be converted"),
        (f"{fn}-x-0d", lambda rm, rv, f=f, kw=kw: f(np.float32(1.0), rm, rv, **kw), V,
         rf"at least {min_ndim} dimensions"),
        (f"{fn}-x-1d", lambda rm, rv, f=f, kw=kw: f(XF[0, 0], rm, rv, **kw), V, rf"at least {min_ndim} dimensions"),
        (f"{fn}-x-channels", lambda rm, rv, f=f, kw=kw: f(a((4, 4, 5)), rm, rv, **kw), V,
         r"running_mean should contain 4 elements \(one per channel\), got shape \(3,\)"),
        (f"{fn}-rm-shape", lambda rm, rv, f=f, kw=kw: f(XF, rm[:2], rv, **kw), V, r"running_mean should contain 3"),
        (f"{fn}-rv-shape", lambda rm, rv, f=f, kw=kw: f(XF, rm, np.ones(4, np.float32), **kw), V,
         r"running_var should contain 3"),
        (f"{fn}-rv-2d", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv[None], **kw), V, r"running_var should contain 3"),
        (f"{fn}-rv-int", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv.astype(np.int64), **kw), T, r"running_var"),
        (f"{fn}-rv-float16", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv.astype(np.float16), **kw), T, r"running_var"),
        (f"{fn}-rv-list", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv.tolist(), **kw), T, r"running_var must be a NumPy"),
        (f"{fn}-rv-None", lambda rm, rv, f=f, kw=kw: f(XF, rm, None, **kw), V, r"given together"),
        (f"{fn}-rm-None", lambda rm, rv, f=f, kw=kw: f(XF, None, rv, **kw), V, r"given together"),
        (f"{fn}-weight-shape", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, weight=np.ones(4), **kw), V,
         r"weight should contain 3 elements"),
        (f"{fn}-weight-int", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, weight=np.ones(3, int), **kw), T, r"weight"),
        (f"{fn}-bias-shape", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, bias=np.ones((3, 1)), **kw), V,
         r"bias should contain 3 elements"),
        (f"{fn}-bias-str", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, bias="abc", **kw), T, r"bias"),
        (f"{fn}-eps-neg", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, eps=-1.0, **kw), V, r"eps"),
        (f"{fn}-eps-nan", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, eps=NAN, **kw), V, r"eps"),
        (f"{fn}-eps-str", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, eps="x", **kw), T, r"eps"),
        (f"{fn}-momentum-str", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, momentum="x", **kw), T, r"momentum"),
        (f"{fn}-momentum-nan", lambda rm, rv, f=f, kw=kw: f(XF, rm, rv, momentum=NAN, **kw), V, r"momentum"),
    ]
    if fn != "batch_norm-eval":
        FUNCTIONAL_ROWS += [
            (f"{fn}-rv-readonly", lambda rm, rv, f=f, kw=kw: f(XF, rm, _readonly(rv), **kw), V, r"writeable"),
            (f"{fn}-rm-readonly", lambda rm, rv, f=f, kw=kw: f(XF, _readonly(rm), rv, **kw), V, r"writeable"),
        ]
FUNCTIONAL_ROWS += [
    ("batch_norm-one-value", lambda rm, rv: F.batch_norm(XF[:1, :, :1], rm, rv, training=True), V, PER_CHANNEL),
    ("batch_norm-one-value-2d", lambda rm, rv: F.batch_norm(XF[:1, :, 0], rm, rv, training=True), V, PER_CHANNEL),
    ("batch_norm-eval-no-stats", lambda rm, rv: F.batch_norm(XF, None, None, training=False), V,
     r"must be given when training=False"),
    ("instance_norm-one-spatial", lambda rm, rv: F.instance_norm(XF[:, :, :1], rm, rv), V, SPATIAL),
    ("instance_norm-2d", lambda rm, rv: F.instance_norm(XF[:, :, 0], rm, rv), V, r"at least 3 dimensions"),
    ("instance_norm-no-input-stats-no-stats", lambda rm, rv: F.instance_norm(XF, use_input_stats=False), V,
     r"must be given when use_input_stats=False"),
    ("layer_norm-x-int", lambda rm, rv: F.layer_norm(XF.astype(np.int32), 5), T, FLOAT_WORDS),
    ("layer_norm-x-complex", lambda rm, rv: F.layer_norm(XF.astype(np.complex64), 5), T, FLOAT_WORDS),
    ("layer_norm-shape", lambda rm, rv: F.layer_norm(XF, (4,)), V, r"Given normalized_shape=\[4\]"),
    ("layer_norm-0d", lambda rm, rv: F.layer_norm(np.float32(1.0), (5,)), V, r"got input of size\[\]"),
    ("layer_norm-empty-shape", lambda rm, rv: F.layer_norm(XF, ()), V, r"at least 1-dimensional"),
    ("layer_norm-float-shape", lambda rm, rv: F.layer_norm(XF, 5.0), T, r"normalized_shape"),
    ("layer_norm-weight-shape", lambda rm, rv: F.layer_norm(XF, (5,), weight=np.ones(4)), V, r"weight"),
    ("layer_norm-bias-str", lambda rm, rv: F.layer_norm(XF, (5,), bias="abc"), T, r"bias"),
    ("layer_norm-eps-nan", lambda rm, rv: F.layer_norm(XF, (5,), eps=NAN), V, r"eps"),
    ("group_norm-x-int", lambda rm, rv: F.group_norm(XF.astype(np.int64), 3), T, FLOAT_WORDS),
    ("group_norm-1d", lambda rm, rv: F.group_norm(XF[0, 0], 1), V, r"Expected at least 2 dimensions"),
    ("group_norm-not-divisible", lambda rm, rv: F.group_norm(XF, 2), V, r"divisible by num_groups"),
    ("group_norm-groups0", lambda rm, rv: F.group_norm(XF, 0), V, r"num_groups must be a positive int"),
    ("group_norm-groups-float", lambda rm, rv: F.group_norm(XF, 3.0), T, r"num_groups must be an int"),
    ("group_norm-weight-shape", lambda rm, rv: F.group_norm(XF, 3, weight=np.ones(4)), V, r"weight"),
    ("group_norm-bias-shape", lambda rm, rv: F.group_norm(XF, 3, bias=np.ones(4)), V, r"bias"),
    ("group_norm-eps-neg", lambda rm, rv: F.group_norm(XF, 3, eps=-1.0), V, r"eps"),
    ("lrn-x-int", lambda rm, rv: F.local_response_norm(XF.astype(np.int32), 3), T, FLOAT_WORDS),
    ("lrn-2d", lambda rm, rv: F.local_response_norm(XF[0], 3), V, r"Expected 3D or higher dimensionality input"),
    ("lrn-size0", lambda rm, rv: F.local_response_norm(XF, 0), V, r"size must be a positive int"),
    ("lrn-size-float", lambda rm, rv: F.local_response_norm(XF, 2.0), T, r"size must be an int"),
    ("lrn-alpha-nan", lambda rm, rv: F.local_response_norm(XF, 3, alpha=NAN), V, r"alpha must be finite"),
    ("lrn-beta-str", lambda rm, rv: F.local_response_norm(XF, 3, beta="x"), T, r"beta must be a real number"),
]


@pytest.mark.parametrize("bad,exc,words", [r[1:] for r in FUNCTIONAL_ROWS], ids=[r[0] for r in FUNCTIONAL_ROWS])
def test_functional_refuses_and_leaves_running_stats_alone(bad, exc, words):
    rng = np.random.default_rng(11)
    rm = rng.uniform(-1, 1, 3).astype(np.float32)
    rv = rng.uniform(0.5, 2, 3).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(exc, match=words):
        bad(rm, rv)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert rm.flags.writeable and rv.flags.writeable


@needs_torch
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
def test_functional_empty_batch(fn):
    """An empty batch in training: an empty output and running statistics untouched (torch's
    batch_norm; torch's instance_norm sets them to NaN, a mean over no instances)."""
    rm = np.array([0.5, -0.25, 1.0], np.float32)
    rv = np.array([2.0, 0.5, 1.5], np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    x = np.zeros((0, 3, 5), np.float32)
    if fn == "batch_norm":
        y = F.batch_norm(x, rm, rv, training=True)
        trm, trv = torch.from_numpy(rm0.copy()), torch.from_numpy(rv0.copy())
        TF.batch_norm(torch.from_numpy(x), trm, trv, training=True)
        np.testing.assert_array_equal(trm.numpy(), rm0)
        np.testing.assert_array_equal(trv.numpy(), rv0)
    else:
        y = F.instance_norm(x, rm, rv, use_input_stats=True)
        trm = torch.from_numpy(rm0.copy())
        TF.instance_norm(torch.from_numpy(x), trm, torch.from_numpy(rv0.copy()), use_input_stats=True)
        assert torch.isnan(trm).all()  # torch's failure, which normcore does not copy
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
