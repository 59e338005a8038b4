"""Parity of normcore with torch.nn / torch.nn.functional.

Every layer is compared with its torch counterpart, which first gets random weight, bias and
running statistics; torch's state dict is then loaded as is into normcore. Several training
steps (different random inputs) and eval steps compare outputs, dx, every parameter gradient
and the running statistics. Tolerances are on the max abs error relative to the largest
magnitude of the reference: float32 1e-5 (against torch float32 and torch float64 on the same
input, plus torch float32's own error against torch float64, see check_all), float64 1e-10
(against torch float64).

The accuracy stress tests (large offset, constant channels) compare normcore float32 and torch
float32 with a float64 computation on the same float32 input: normcore must be within 1e-5 and
never worse than torch float32. Run with -s to print the worst errors seen.
"""
import copy
import itertools
import os

import numpy as np
import pytest

import normcore as nc
from optional_peers import needs_torch, torch

# Every test here compares with torch: each one skips without it (and is counted as such).
pytestmark = needs_torch
F = torch.nn.functional if torch is not None else None

TOL = {np.float32: 1e-5, np.float64: 1e-10}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64} if torch is not None else {}
DTYPES = [np.float32, np.float64]
WORST = {}  # (comparison, what) -> (worst relative error, test), printed at the end with -s


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_and_report():
    """Tiny inputs: torch's thread pool only fights normcore's OpenMP threads (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for key, (err, test) in sorted(WORST.items()):
        print(f"worst relative error, {key[0]:<34} {key[1]:<26} {err:.2e}  {test}")


def note(key, err):
    """Keep the worst error per key, with the test that saw it."""
    if err >= WORST.get(key, (0.0, ""))[0]:
        WORST[key] = (err, os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0])


def rel_err(got, ref):
    """Max abs error of got, relative to max(1, the largest magnitude of ref)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    return float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))


def check(got, ref, dtype, what, ref_dtype=None, slack=0.0):
    """got within TOL[dtype] (+ slack) of ref, relative to ref's largest magnitude."""
    err = rel_err(got, ref)
    key = (f"{np.dtype(dtype).name} vs torch {str(ref_dtype or TORCH_DTYPE[dtype])[-7:]}", what)
    note(key, err)
    assert err <= TOL[dtype] + slack, f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e} + {slack:.1e}"


def check_all(got, refs, dtype, what):
    """got against {torch dtype: reference}. float32: the tolerance grows by torch float32's
    own error e32 against torch float64 -- TOL + e32 against float64, TOL + 2 * e32 against
    float32 (both may err, in opposite ways). Badly conditioned cases (GroupNorm groups of 1
    or 2 values) cost torch float32 up to ~6e-5."""
    e32 = rel_err(refs[torch.float32], refs[torch.float64]) if dtype == np.float32 else 0.0
    for tdt, ref in refs.items():
        check(got, ref, dtype, what, tdt, (1 + (tdt == torch.float32)) * e32)


def torch_dtypes(dtype):
    return [torch.float32, torch.float64] if dtype == np.float32 else [torch.float64]


def to_np(t):
    return t.detach().cpu().numpy()


def torch_refs(t32, dtype):
    """[torch float64 copy of t32], with t32 itself first for float32; tagged with .dtype_."""
    t64 = copy.deepcopy(t32).double()
    t32.dtype_, t64.dtype_ = torch.float32, torch.float64
    return [t64] if dtype == np.float64 else [t32, t64]


def make_pair(name, args, kwargs, dtype, seed=0):
    """(normcore module, [torch references]) with the same random non-trivial state.

    The references are a torch float64 module, plus the torch float32 one for float32.
    """
    t32 = getattr(torch.nn, name)(*args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t32.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if p is t32.weight
                    else torch.randn(p.shape, generator=gen))
        if getattr(t32, "running_mean", None) is not None:
            t32.running_mean.copy_(torch.randn(t32.running_mean.shape, generator=gen))
            t32.running_var.copy_(torch.rand(t32.running_var.shape, generator=gen) + 0.5)
            t32.num_batches_tracked.fill_(2)
    refs = torch_refs(t32, dtype)

    m = getattr(nc, name)(*args, **kwargs, dtype=dtype)
    t = refs[0]
    shapes = {k: tuple(v.shape) for k, v in t.state_dict().items()}
    assert {k: v.shape for k, v in m.state_dict().items()} == shapes
    m.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    for k, v in m.state_dict().items():
        assert v.dtype == (np.int64 if k == "num_batches_tracked" else dtype), (k, v.dtype)
        np.testing.assert_array_equal(v, t.state_dict()[k].numpy())
    return m, refs


def torch_step(t, x, dy):
    """{'y', 'dx', 'd<param>' for each parameter} of torch module t on NumPy x and dy."""
    xt = torch.tensor(x, dtype=t.dtype_, requires_grad=True)
    y = t(xt)
    y.backward(torch.tensor(dy, dtype=t.dtype_))
    out = {"y": to_np(y), "dx": to_np(xt.grad), **{f"d{n}": to_np(p.grad) for n, p in t.named_parameters()}}
    t.zero_grad(set_to_none=True)
    return out


def run_steps(m, refs, shape, dtype, n_train=3, n_eval=2, seed=1):
    """Train then eval steps on random inputs; compare y, dx, grads and the state."""
    rng = np.random.default_rng(seed)
    for step in range(n_train + n_eval):
        training = step < n_train
        mode = "train" if training else "eval"
        for mod in (m, *refs):
            mod.train() if training else mod.eval()
        x = (rng.standard_normal(shape) * (1 + step) + (step - 1.5)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y = m(x)
        ours = {"y": y, "dx": m.backward(dy), **{f"d{k}": g for k, g in m.grads.items()}}
        results = {t.dtype_: torch_step(t, x, dy) for t in refs}
        states = {t.dtype_: t.state_dict() for t in refs}
        assert all(set(r) == set(ours) for r in results.values())
        for what, got in ours.items():
            assert got.dtype == dtype and got.shape == results[torch.float64][what].shape, what
            check_all(got, {d: r[what] for d, r in results.items()}, dtype, f"{what} {mode}")
        assert set(m.state_dict()) == set(states[torch.float64])
        for k, v in m.state_dict().items():
            if k == "num_batches_tracked":
                assert all(int(v) == int(st[k]) for st in states.values()), (step, int(v))
            elif k.startswith("running"):
                check_all(v, {d: st[k].numpy() for d, st in states.items()}, dtype, k)


# -- modules -----------------------------------------------------------------------------------
BN_CASES = [("BatchNorm1d", (8, 4)), ("BatchNorm1d", (5, 4, 7)),
            ("BatchNorm2d", (4, 4, 5, 6)), ("BatchNorm3d", (3, 4, 3, 4, 5))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine,track", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("name,shape", BN_CASES)
def test_batch_norm(name, shape, eps, affine, track, momentum, dtype):
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    m, refs = make_pair(name, (4,), kwargs, dtype)
    run_steps(m, refs, shape, dtype)


IN_CASES = [("InstanceNorm1d", (3, 4, 9)), ("InstanceNorm1d", (4, 9)),
            ("InstanceNorm2d", (2, 4, 5, 6)), ("InstanceNorm2d", (4, 5, 6)),
            ("InstanceNorm3d", (2, 4, 3, 4, 5)), ("InstanceNorm3d", (4, 3, 4, 5))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine,track", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("name,shape", IN_CASES)
def test_instance_norm(name, shape, affine, track, momentum, dtype):
    kwargs = dict(eps=1e-3, momentum=momentum, affine=affine, track_running_stats=track)
    m, refs = make_pair(name, (4,), kwargs, dtype)
    run_steps(m, refs, shape, dtype)


@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
def test_instance_norm_defaults(name):
    m, t = getattr(nc, name)(4), getattr(torch.nn, name)(4)
    assert (m.affine, m.track_running_stats) == (t.affine, t.track_running_stats) == (False, False)
    assert m.weight is m.bias is m.running_mean is m.running_var is m.num_batches_tracked is None
    assert m.state_dict() == {} and t.state_dict() == {}
    run_steps(m, torch_refs(t, np.float32), (2, 4) + (5,) * int(name[-2]), np.float32)


LN_CASES = [(10, (4, 10)), ((7,), (2, 3, 7)), ((5, 6), (3, 5, 6)), ((3, 4, 5), (2, 3, 4, 5))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,bias", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("normalized_shape,shape", LN_CASES)
def test_layer_norm(normalized_shape, shape, eps, affine, bias, dtype):
    kwargs = dict(eps=eps, elementwise_affine=affine, bias=bias)
    m, refs = make_pair("LayerNorm", (normalized_shape,), kwargs, dtype)
    run_steps(m, refs, shape, dtype)


GN_SHAPES = [(5, 6), (3, 6, 7), (2, 6, 4, 5), (2, 6, 2, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", GN_SHAPES)
def test_group_norm(shape, groups, eps, affine, dtype):
    m, refs = make_pair("GroupNorm", (groups, 6), dict(eps=eps, affine=affine), dtype)
    run_steps(m, refs, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,args,shape", [("GroupNorm", (6, 6), (5, 6)), ("LayerNorm", (1,), (5, 6, 1))])
def test_one_value_groups(name, args, shape, dtype):
    """Normalising single values: y is exactly bias, dweight 0 and dx 0. normcore forms
    dx = a * dy + c in float64 and rounds once, so the cancellation leaves (almost) nothing;
    torch's float32 GroupNorm leaves noise of a few ulps of w * rstd * dy (rstd = 1/sqrt(eps))."""
    m, (*_, t64) = make_pair(name, args, {}, dtype)
    rng = np.random.default_rng(6)
    x, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    y, dx = m(x), m.backward(dy)
    assert np.array_equal(y, np.broadcast_to(m.bias, y.shape))
    ref = torch_step(t64, x, dy)
    assert np.all(m.grads["weight"] == 0)
    check(m.grads["bias"], ref["dbias"], dtype, "dbias one value")
    noise = np.abs(m.weight * dy).max() / np.sqrt(m.eps) * np.finfo(dtype).eps
    assert np.abs(ref["dx"]).max() <= 4 * noise
    assert np.abs(dx).max() <= 1e-12


# -- accuracy stress: large offset and constant channels ------------------------------------------
def stress_input(shape, const_channels, seed=0):
    """float32 x = 1e4 + N(0, 1), with the given channels (dim 1) all equal to 1.5e7."""
    rng = np.random.default_rng(seed)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    x[:, list(const_channels)] = np.float32(1.5e7)
    return x


STRESS = [  # name, constructor args, kwargs, channels made constant (a whole group for GroupNorm)
    ("BatchNorm2d", (4,), {}, [1]),
    ("InstanceNorm2d", (4,), dict(affine=True), [1]),
    ("GroupNorm", (2, 4), {}, [2, 3]),
    ("LayerNorm", ((8, 8),), {}, [1]),
]


@pytest.mark.parametrize("name,args,kwargs,const", STRESS, ids=[s[0] for s in STRESS])
def test_accuracy_stress(name, args, kwargs, const):
    m, (t32, t64) = make_pair(name, args, kwargs, np.float32)
    x = stress_input((6, 4, 8, 8), const)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    y, dx = m(x), m.backward(dy)
    ours = {"y": y, "dx": dx, **{f"d{k}": g for k, g in m.grads.items()}}
    refs = torch_step(t64, x, dy)  # float64 computation on the same float32 input
    theirs = torch_step(t32, x, dy)
    for what in refs:
        ours_err, torch_err = rel_err(ours[what], refs[what]), rel_err(theirs[what], refs[what])
        for who, err in (("normcore", ours_err), ("torch", torch_err)):
            key = (f"stress: {who} float32 vs float64", f"{name} {what}")
            note(key, err)
        assert ours_err <= 1e-5, f"{what}: normcore error {ours_err:.2e} vs float64"
        assert ours_err <= torch_err, f"{what}: normcore {ours_err:.2e} worse than torch {torch_err:.2e}"
    # A constant channel (group, row) normalises to exactly beta.
    bias = np.zeros(x.shape[1:], np.float32) if m.bias is None else m.bias
    for c in const:
        expected = bias[c] if name != "LayerNorm" else bias
        assert np.array_equal(y[:, c], np.broadcast_to(expected, y[:, c].shape)), (name, c)


# -- functional ----------------------------------------------------------------------------------
def _vectors(C, dtype, rng, with_weight, with_bias):
    w = (rng.random(C) + 0.5).astype(dtype) if with_weight else None
    b = rng.standard_normal(C).astype(dtype) if with_bias else None
    return w, b


def _t(a, tdt):
    return None if a is None else torch.tensor(a, dtype=tdt)


def _running_norm(nc_fn, torch_fn, shape, dtype, use_batch_stats, running, wb, momentum, seed):
    """batch_norm / instance_norm: 3 calls with running stats updated in place by both."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    w, b = _vectors(C, dtype, rng, *wb)
    rm = rng.standard_normal(C).astype(dtype) if running else None
    rv = (rng.random(C) + 0.5).astype(dtype) if running else None
    t_running = {d: (_t(rm, d), _t(rv, d)) for d in torch_dtypes(dtype)}
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + step).astype(dtype)
        y = nc_fn(x, rm, rv, w, b, use_batch_stats, momentum, 1e-4)
        ty = {d: to_np(torch_fn(_t(x, d), *t_running[d], _t(w, d), _t(b, d), use_batch_stats, momentum, 1e-4))
              for d in t_running}
        check_all(y, ty, dtype, f"functional {nc_fn.__name__}")
        for i, ours in enumerate((rm, rv) if running else ()):
            check_all(ours, {d: to_np(r[i]) for d, r in t_running.items()}, dtype, "functional running")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wb", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("training,running", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("momentum", [0.1, 0.3])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 7), (2, 3, 4, 5)])
def test_functional_batch_norm(shape, momentum, training, running, wb, dtype):
    _running_norm(nc.functional.batch_norm, F.batch_norm, shape, dtype, training, running, wb, momentum, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wb", [(True, True), (False, False)])
@pytest.mark.parametrize("use_input_stats,running", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(3, 4, 9), (2, 4, 5, 6), (2, 4, 3, 4, 5)])
def test_functional_instance_norm(shape, use_input_stats, running, wb, dtype):
    _running_norm(nc.functional.instance_norm, F.instance_norm, shape, dtype, use_input_stats, running, wb,
                  0.2, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wb", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("normalized_shape,shape", LN_CASES)
def test_functional_layer_norm(normalized_shape, shape, wb, dtype):
    rng = np.random.default_rng(4)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    w = (rng.random(ns) + 0.5).astype(dtype) if wb[0] else None
    b = rng.standard_normal(ns).astype(dtype) if wb[1] else None
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    y = nc.functional.layer_norm(x, normalized_shape, w, b, 1e-4)
    ty = {d: to_np(F.layer_norm(_t(x, d), ns, _t(w, d), _t(b, d), 1e-4)) for d in torch_dtypes(dtype)}
    check_all(y, ty, dtype, "functional layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wb", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("shape", GN_SHAPES)
def test_functional_group_norm(shape, groups, wb, dtype):
    rng = np.random.default_rng(5)
    w, b = _vectors(shape[1], dtype, rng, *wb)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    y = nc.functional.group_norm(x, groups, w, b, 1e-4)
    ty = {d: to_np(F.group_norm(_t(x, d), groups, _t(w, d), _t(b, d), 1e-4)) for d in torch_dtypes(dtype)}
    check_all(y, ty, dtype, "functional group_norm")
