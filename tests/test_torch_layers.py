"""normcore.torch: the torch.nn twins against torch.nn (parity) and against the NumPy layers
(the same bits: the bridge adds nothing to the kernels), gradcheck, the custom ops, state
dicts both ways, convert / revert / torch.compile, wrap, and the errors."""
import copy
import inspect
import subprocess
import sys

import numpy as np
import pytest

import normcore as nc
from optional_peers import torch

pytestmark = pytest.mark.skipif(torch is None, reason="normcore.torch needs torch")

if torch is not None:
    import normcore.torch as nct
    from normcore.torch import _ops

DTYPES = ["float32", "float64"]
TOL = {"float32": 1e-5, "float64": 1e-10}

# (class name, args, kwargs, input shape)
CASES = [
    ("BatchNorm1d", (3,), {}, (5, 3)),
    ("BatchNorm1d", (3,), {"momentum": None}, (4, 3, 6)),
    ("BatchNorm2d", (3,), {}, (4, 3, 5, 6)),
    ("BatchNorm2d", (3,), {"affine": False}, (4, 3, 5, 6)),
    ("BatchNorm2d", (3,), {"track_running_stats": False}, (2, 3, 4, 4)),
    ("BatchNorm2d", (3,), {"affine": False, "track_running_stats": False, "eps": 0.1}, (2, 3, 4, 4)),
    ("BatchNorm2d", (3,), {"bias": False, "momentum": 0.3}, (2, 3, 4, 4)),
    ("BatchNorm3d", (2,), {}, (2, 2, 3, 4, 5)),
    ("InstanceNorm1d", (3,), {}, (2, 3, 7)),
    ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}, (3, 7)),
    ("InstanceNorm2d", (3,), {"affine": True}, (2, 3, 5, 4)),
    ("InstanceNorm2d", (3,), {"track_running_stats": True, "momentum": 0.3}, (2, 3, 5, 4)),
    ("InstanceNorm3d", (2,), {"affine": True, "track_running_stats": True}, (2, 2, 3, 3, 4)),
    ("LayerNorm", (6,), {}, (4, 5, 6)),
    ("LayerNorm", ((5, 6),), {"elementwise_affine": False}, (4, 5, 6)),
    ("LayerNorm", ((3, 4, 4),), {"bias": False}, (2, 3, 4, 4)),
    ("GroupNorm", (2, 6), {}, (3, 6, 5)),
    ("GroupNorm", (3, 6), {"affine": False}, (2, 6, 4, 4)),
    ("GroupNorm", (1, 4), {"eps": 0.01}, (2, 4, 3, 3, 2)),
    ("LocalResponseNorm", (3,), {}, (2, 5, 4, 4)),
    ("LocalResponseNorm", (2,), {"alpha": 0.1, "beta": 0.6, "k": 2.0}, (2, 6, 7)),
]
CASE_IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(CASES)]


def make(name, args, kwargs, dtype, seed=0):
    """(torch layer with random parameters and buffers, its normcore.torch twin loaded from its
    state_dict, the NumPy layer loaded from it)."""
    takes_dtype = name != "LocalResponseNorm"
    extra = {"dtype": getattr(torch, dtype)} if takes_dtype else {}
    ref = getattr(torch.nn, name)(*args, **kwargs, **extra)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in ref.state_dict().items():
            if key == "num_batches_tracked":
                t.fill_(3)
            elif t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
    ours = getattr(nct, name)(*args, **kwargs, **extra)
    ours.load_state_dict(ref.state_dict())
    numpy_kwargs = dict(kwargs, dtype=dtype) if takes_dtype else kwargs
    plain = getattr(nc, name)(*args, **numpy_kwargs)
    plain.load_state_dict(ref.state_dict())
    return ref, ours, plain


def layouts(shape):
    return [False, True] if len(shape) in (4, 5) else [False]


def as_layout(x, channels_last):
    if not channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max(initial=0.0)) / max(1.0, float(np.abs(ref).max(initial=0.0)))


def step(m, x, dy):
    x = x.clone().requires_grad_()
    y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], dy)
    return y.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,args,kwargs,shape", CASES, ids=CASE_IDS)
def test_parity_with_torch_and_the_same_bits_as_the_numpy_layer(name, args, kwargs, shape, dtype):
    for channels_last in layouts(shape):
        ref, ours, plain = make(name, args, kwargs, dtype)
        g = torch.Generator().manual_seed(1)
        for i in range(5):  # three training steps, then two in eval
            if i == 3:
                ref.eval(), ours.eval(), plain.eval()
            x = as_layout(torch.randn(shape, generator=g, dtype=getattr(torch, dtype)) * 2 + 1, channels_last)
            dy = torch.randn(shape, generator=g, dtype=x.dtype)
            y_ref, g_ref = step(ref, x, dy)
            y, grads = step(ours, x, dy)
            assert rel_err(y, y_ref) <= TOL[dtype]
            for a, b in zip(grads, g_ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert rel_err(a, b) <= TOL[dtype]
            for key, t in ref.state_dict().items():
                assert rel_err(ours.state_dict()[key], t) <= TOL[dtype], key
                assert ours.state_dict()[key].dtype == t.dtype
            # Memory format as torch's, except InstanceNorm, which keeps channels-last.
            if name.startswith("InstanceNorm") and channels_last:
                assert y.stride() == x.stride() and grads[0].stride() == x.stride()
            else:
                assert y.stride() == y_ref.stride() and grads[0].stride() == g_ref[0].stride()
            # The NumPy layer on the same memory: the same bits.
            y_np = plain(x.numpy())
            dx_np = plain.backward(dy.numpy())
            assert np.array_equal(y.numpy(), y_np)
            assert np.array_equal(grads[0].numpy(), dx_np)
            for p_name, gp in zip([n for n, _ in ours.named_parameters()], grads[1:]):
                assert np.array_equal(gp.numpy(), plain.grads[p_name]), p_name
            for key, t in ours.state_dict().items():
                assert np.array_equal(t.numpy(), plain.state_dict()[key]), key


def test_the_kernels_read_the_tensor_memory_in_place(monkeypatch):
    """No copy of a contiguous or channels-last input: the kernels get a view of its memory."""
    seen = []
    step_ = nc.functional.batch_norm_step

    def spy(x, *args):
        seen.append(x)
        return step_(x, *args)

    monkeypatch.setattr(_ops.core, "batch_norm_step", spy)
    m = nct.BatchNorm2d(3)
    for x in (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)):
        seen.clear()
        m(x.requires_grad_())
        assert np.shares_memory(seen[0], x.detach().numpy())


@pytest.mark.parametrize("name,args,kwargs,shape", CASES, ids=CASE_IDS)
def test_gradcheck_float64(name, args, kwargs, shape):
    _, ours, _ = make(name, args, kwargs, "float64")
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = list(ours.parameters())

    def f(x, *p):
        return ours(x)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradcheck_through_the_registered_ops():
    """torch.ops.normcore.* with their registered autograd formulas (the compiled path)."""
    f64 = dict(dtype=torch.float64)
    x = torch.randn(4, 3, 5, **f64, requires_grad=True)
    w = torch.rand(3, **f64, requires_grad=True)
    b = torch.rand(3, **f64, requires_grad=True)
    ops = torch.ops.normcore
    assert torch.autograd.gradcheck(lambda x, w, b: ops.batch_norm(x, w, b, None, None, True, 0.1, 1e-5)[0],
                                    (x, w, b))
    rm, rv = torch.zeros(3, **f64), torch.ones(3, **f64)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)[0], (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.instance_norm(x, w, b, None, None, True, 0.1, 1e-5)[0],
                                    (x, w, b))
    w6, b6 = torch.rand(6, **f64, requires_grad=True), torch.rand(6, **f64, requires_grad=True)
    x6 = torch.randn(2, 6, 4, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.group_norm(x, 3, w, b, 1e-5)[0], (x6, w6, b6))
    w5, b5 = torch.rand(5, **f64, requires_grad=True), torch.rand(5, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, [5], w, b, 1e-5)[0], (x.transpose(0, 1), w5, b5))
    assert torch.autograd.gradcheck(lambda x: ops.local_response_norm(x, 2, 0.1, 0.75, 1.0), (x,))
    torch.library.opcheck(ops.batch_norm.default, (x, w, b, rm, rv, True, 0.1, 1e-5))
    torch.library.opcheck(ops.layer_norm.default, (x, [5], w5, b5, 1e-5))


def test_the_ops_pass_torch_library_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    ops = torch.ops.normcore
    for args in [(ops.batch_norm.default, (x, w, b, rm, rv, True, 0.1, 1e-5)),
                 (ops.batch_norm.default, (x, None, None, None, None, True, 0.1, 1e-5)),
                 (ops.batch_norm.default, (x.contiguous(memory_format=torch.contiguous_format), w, b, rm, rv, False,
                                           0.1, 1e-5)),
                 (ops.instance_norm.default, (x, w, b, rm, rv, True, 0.1, 1e-5)),
                 (ops.group_norm.default, (torch.randn(2, 6, 3, requires_grad=True), 2, None, None, 1e-5)),
                 (ops.layer_norm.default, (x, [3, 5], None, None, 1e-5)),
                 (ops.local_response_norm.default, (x, 3, 1e-4, 0.75, 1.0))]:
        torch.library.opcheck(*args)
    cl = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.batch_norm.default, (cl, w, b, rm, rv, True, 0.1, 1e-5))
    torch.library.opcheck(ops.group_norm.default, (cl, 3, w, b, 1e-5))


def test_double_backward_is_refused_with_a_message():
    for m in (nct.BatchNorm2d(3), nct.LayerNorm(4), nct.LocalResponseNorm(2)):
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        (g,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            g.sum().backward()


@pytest.mark.parametrize("name,args,kwargs,shape", CASES, ids=CASE_IDS)
def test_torch_interface(name, args, kwargs, shape):
    """Signature, repr, parameters, buffers (names, shapes, dtypes, requires_grad), state_dict
    keys; checkpoints load both ways."""
    ref, ours, _ = make(name, args, kwargs, "float32")
    cls = getattr(nct, name)
    assert isinstance(ours, getattr(torch.nn, name))
    assert inspect.signature(cls) == inspect.signature(getattr(torch.nn, name))
    assert repr(ours) == repr(ref)
    assert [(n, p.shape, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype, p.requires_grad) for n, p in ref.named_parameters()]
    assert [(n, b.shape, b.dtype) for n, b in ours.named_buffers()] == [(n, b.shape, b.dtype)
                                                                       for n, b in ref.named_buffers()]
    back = copy.deepcopy(ref)
    for t in back.state_dict().values():
        t.zero_()
    back.load_state_dict(ours.state_dict())  # normcore's checkpoint into torch
    for key, t in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], t)
    assert ours.eval().training is False and ours.train().training is True


def test_a_refused_input_changes_no_state():
    m = nct.BatchNorm2d(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for bad in (torch.randn(2, 4, 3, 3), torch.randn(1, 3, 1, 1), torch.randn(2, 3, 3, 3).half()):
        with pytest.raises((ValueError, TypeError)):
            m(bad)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_clear_errors():
    m = nct.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="run on the CPU.*keep torch.nn's own layer for meta"):
        m(torch.empty(2, 3, 4, 4, device="meta"))
    with pytest.raises(TypeError, match="float32 and float64.*torch.float16"):
        m(torch.randn(2, 3, 4, 4).half())
    with pytest.raises(TypeError, match="float32 and float64.*torch.bfloat16"):
        nct.LayerNorm(4)(torch.randn(2, 4).bfloat16())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        nct.GroupNorm(1, 3)(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="runs on the CPU"):
        nct.BatchNorm2d(3, device="meta")
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 3, 4))


def conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        torch.nn.LocalResponseNorm(3), torch.nn.Flatten(1), torch.nn.LayerNorm(8 * 6 * 6),
        torch.nn.Linear(8 * 6 * 6, 4))


def train_steps(model, steps=3):
    dtype = torch.float64
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=dtype)
        target = torch.randn(4, 4, generator=g, dtype=dtype)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convert_trains_as_the_torch_original():
    original = conv_model()
    converted = nct.convert(original)
    assert type(original[1]) is torch.nn.BatchNorm2d  # inplace=False: the original is untouched
    assert [type(m).__module__ for m in converted if "Norm" in type(m).__name__] == ["normcore.torch.layers"] * 5
    ref_losses, losses = train_steps(original), train_steps(converted)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    for (k, a), b in zip(original.state_dict().items(), converted.state_dict().values()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    back = nct.revert(converted)
    assert [type(m) for m in back] == [type(m) for m in original]


def test_convert_carries_state_mode_and_requires_grad():
    model = conv_model().eval()
    model[1].weight.requires_grad_(False)
    model[1].running_mean.fill_(0.25)
    weight = model[4].weight
    converted = nct.convert(model, inplace=True)
    assert converted is model and model[4].weight is weight
    assert not model[1].training and not model[1].weight.requires_grad
    assert torch.all(model[1].running_mean == 0.25)


def test_torch_compile_of_a_converted_model():
    model = nct.convert(conv_model()).float()
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    eager_model = copy.deepcopy(model)
    y_eager = eager_model(x)
    y = compiled(x)
    np.testing.assert_allclose(y.detach().numpy(), y_eager.detach().numpy(), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    y_eager.sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-3, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(model[1].running_mean.numpy(), eager_model[1].running_mean.numpy(), rtol=1e-5,
                               atol=1e-6)
    assert int(model[1].num_batches_tracked) == int(eager_model[1].num_batches_tracked) == 1
    model.eval(), eager_model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(compiled(x).numpy(), eager_model(x).numpy(), rtol=1e-4, atol=1e-5)


class Scale(nc.Module):
    """A third-party norm of the test: y = weight[c] * x / rms(x) per sample."""

    _parameter_names = ("weight",)
    _buffer_names = ("calls",)

    def __init__(self, num_features):
        super().__init__()
        self.weight = np.ones(num_features, np.float32)
        self.calls = np.zeros((), np.int64)
        self._saved = None

    def forward(self, x):
        x = nc.toolkit.as_float_array(x)
        r = 1.0 / np.sqrt((x * x).mean(axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-5)
        self._saved = (x, r)
        if self.training:
            self.calls[...] += 1
        return x * r * self.weight.reshape(1, -1, *([1] * (x.ndim - 2)))

    def backward(self, dy):
        x, r = self._require_forward()
        shape = (1, -1, *([1] * (x.ndim - 2)))
        axes = tuple(range(1, x.ndim))
        w = self.weight.reshape(shape)
        self.grads = {"weight": (dy * x * r).sum(axis=(0, *axes[1:]))}
        g = dy * w
        return r * g - r ** 3 * x * (g * x).mean(axis=axes, keepdims=True)


def frn_layer(num_features):
    """The example third-party plugin's layer (examples/frn), imported from the source tree."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "frn"))
    try:
        import normcore_frn
    finally:
        sys.path.pop(0)
    layer = normcore_frn.FilterResponseNorm(num_features)
    layer.tau[...] = -0.5  # keep the TLU mostly open
    return layer


@pytest.mark.parametrize("norm", ["switchable_norm2d", "scale", "frn"])
def test_wrap_runs_the_layers_own_forward_and_backward(norm):
    layer = {"scale": Scale, "frn": frn_layer}.get(norm, lambda c: nc.create_norm(norm, c))(4)
    twin = copy.deepcopy(layer)
    m = nct.wrap(layer)
    assert sorted(m.state_dict()) == sorted(layer.state_dict())
    for name, p in m.named_parameters():
        assert np.shares_memory(p.detach().numpy(), getattr(layer, name))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float32, requires_grad=True)
        dy = torch.randn(3, 4, 5, 5, generator=g)
        y = m(x)
        y.backward(dy)
        y_twin = twin(x.detach().numpy())
        dx_twin = twin.backward(dy.numpy())
        assert np.array_equal(y.detach().numpy(), y_twin)
        assert np.array_equal(x.grad.numpy(), dx_twin)
        for name, p in m.named_parameters():
            assert np.array_equal(p.grad.numpy(), twin.grads[name]), name
            p.grad = None
    for key, value in twin.state_dict().items():
        assert np.array_equal(m.state_dict()[key].numpy(), value), key


def test_a_wrapped_layer_called_twice_before_backward_differentiates_each_call():
    m = nct.wrap(Scale(3))
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x1 = torch.randn(2, 3, 4, requires_grad=True)
    x2 = torch.randn(5, 3, 4, requires_grad=True)
    (m(x1).sum() + 2 * m(x2).sum()).backward()
    ref = copy.deepcopy(m.layer)
    ref(x1.detach().numpy())
    dx1 = ref.backward(np.ones((2, 3, 4), np.float32))
    g1 = ref.grads["weight"]
    ref(x2.detach().numpy())
    dx2 = ref.backward(np.full((5, 3, 4), 2.0, np.float32))
    np.testing.assert_allclose(x1.grad.numpy(), dx1, rtol=1e-6)
    np.testing.assert_allclose(x2.grad.numpy(), dx2, rtol=1e-6)
    np.testing.assert_allclose(m.weight.grad.numpy(), g1 + ref.grads["weight"], rtol=1e-5)


def test_a_built_in_layer_shared_by_two_calls_matches_torch():
    ref, ours, _ = make("BatchNorm2d", (3,), {}, "float64")
    xs = [torch.randn(4, 3, 2, 2, dtype=torch.float64) for _ in range(2)]
    grads = []
    for m in (ref, ours):
        a, b = (x.clone().requires_grad_() for x in xs)
        (m(a) * m(b)).sum().backward()
        grads.append((a.grad, b.grad, m.weight.grad, m.bias.grad))
    for got, want in zip(grads[1], grads[0]):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)


def test_import_normcore_does_not_import_torch():
    code = "import sys, normcore; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("obj", ["convert", "wrap"])
def test_docstring_examples_run(obj):
    import doctest

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(getattr(nct, obj), obj, globs={"np": np, "nc": nc}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_torch_export_and_dynamic_shapes():
    """The custom ops appear in an exported graph, and a compiled model takes new shapes."""
    model = nct.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                            torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(6))).eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"normcore.batch_norm.default", "normcore.group_norm.default", "normcore.layer_norm.default"} <= targets
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))
        compiled = torch.compile(model, dynamic=True)
        for shape in ((3, 3, 8, 8), (5, 3, 8, 8)):
            x = torch.randn(shape)
            np.testing.assert_allclose(compiled(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_torch_compile_runs_wrapped_layers_eagerly():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), nct.wrap("switchable_norm2d", 4), nct.BatchNorm2d(4))
    eager_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5)
    y = torch.compile(model)(x)
    np.testing.assert_allclose(y.detach().numpy(), eager_model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert model[1].weight.grad is not None
