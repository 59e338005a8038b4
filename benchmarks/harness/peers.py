"""The implementations a benchmark compares, behind one factory signature.

    fn = make(impl, layer, mode, shape, dtype=np.float32, rng=None)
    fn()        # one iteration; returns y (forward modes) or dx (fwd+bwd)

Everything an iteration needs (the module, x, dy, weights, an ONNX Runtime session) is prepared
by the factory, outside the callable. For the same seed every implementation gets the same x, dy,
parameters and running statistics (`make_inputs`), so their outputs can be compared
(`cross_check`).

Implementations (`IMPLS`):

    normcore     this library's modules
    torch        torch.nn modules on the CPU: forward modes under torch.no_grad(); fwd+bwd through
                 autograd (x.requires_grad_(True); y = m(x); y.backward(dy)), with x.grad and the
                 parameters' grads set to None before each call. switchable_norm has no torch.nn
                 module: its torch peer is the tests' transcription of the released SwitchNorm
                 code (tests/released_switchnorm.py, imported as tests.released_switchnorm from
                 the checkout's root).
    onnxruntime  inference only (batch_norm eval; the forward of instance_norm, group_norm,
                 layer_norm, local_response_norm): a one-node ONNX model (BatchNormalization,
                 InstanceNormalization, GroupNormalization opset 21, LayerNormalization, LRN) built
                 in memory with onnx.helper, run by an InferenceSession on CPUExecutionProvider with
                 intra_op_num_threads = the thread count and inter_op_num_threads = 1.
    numpy        plain vectorised NumPy written here, float32 in, statistics the natural NumPy way
                 (x.mean / x.var on the float32 array), forward and backward, for every layer but
                 switchable_norm: the project's NumPy SwitchableNorm is the tests' float64
                 reference (tests/reference.py), written for clarity, not speed (timed as a peer it
                 took 3x the time of the vectorised float32 version this peer had, for a training
                 forward, and 4x for fwd+bwd), and a formula of its own here would be one more copy
                 of the algorithm. switchable_norm is timed against torch.

torch, onnxruntime and onnx are optional: imported on first use, and reported by
`available_peers()` / `unavailable_reason()` rather than raising at import.

Threads: `set_threads(n)` gives every implementation n threads (normcore.set_num_threads,
torch.set_num_threads when torch is imported, the ONNX Runtime sessions made afterwards, and
NumPy's BLAS through threadpoolctl when it is installed). An ONNX Runtime session keeps the count
it was made with, so call `set_threads` before `make`.
"""
import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass

import numpy as np

import normcore as nc
from . import cases

__all__ = [
    "IMPLS",
    "PeerUnavailable",
    "UnsupportedCase",
    "Inputs",
    "make_inputs",
    "param_shape",
    "make",
    "FACTORIES",
    "supports",
    "unavailable_reason",
    "available_peers",
    "versions",
    "set_threads",
    "current_threads",
    "cross_check",
    "to_numpy",
    "onnx_model",
]

IMPLS = ("normcore", "torch", "onnxruntime", "numpy")

EPS = 1e-5
BN_MOMENTUM = 0.1          # torch.nn.BatchNorm's
SN_MOMENTUM = 0.9          # SwitchableNorm: the fraction of the running statistics kept
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 1.0
ONNX_OPSET = 21            # GroupNormalization-21 takes per-channel scale and bias
ONNX_IR_VERSION = 10       # what onnxruntime has read for a long time

# What each optional peer imports, and what to install to get it.
_REQUIREMENTS = {
    "torch": (("torch",), "pip install torch"),
    "onnxruntime": (("onnxruntime", "onnx"), "pip install onnxruntime onnx"),
}
_ONNX_SUPPORTED = {
    "batch_norm": ("eval",),
    "instance_norm": ("forward",),
    "group_norm": ("forward",),
    "layer_norm": ("forward",),
    "local_response_norm": ("forward",),
}
_NUMPY_UNSUPPORTED = ("switchable_norm",)  # see the module docstring


class PeerUnavailable(ImportError):
    """An optional implementation whose package is not installed."""


class UnsupportedCase(ValueError):
    """An implementation that does not do this layer in this mode (ONNX Runtime has no training)."""


# -- availability ----------------------------------------------------------------------------

_import_errors = {}


def _optional(module):
    """The imported module, or PeerUnavailable naming what to install."""
    if module in sys.modules:
        return sys.modules[module]
    if module in _import_errors:
        raise PeerUnavailable(_import_errors[module])
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        _import_errors[module] = f"{module} is not installed ({exc})"
        raise PeerUnavailable(_import_errors[module]) from exc


def unavailable_reason(impl):
    """None when `impl` can run here, otherwise why not (a missing package and how to install it)."""
    _check_impl(impl)
    modules, install = _REQUIREMENTS.get(impl, ((), ""))
    for module in modules:
        try:
            _optional(module)
        except PeerUnavailable as exc:
            return f"{impl}: {exc}; {install}"
    return None


def available_peers():
    """The implementations that can run here, in `IMPLS` order."""
    return [impl for impl in IMPLS if unavailable_reason(impl) is None]


def supports(impl, layer, mode):
    """Whether `impl` does `layer` in `mode` (whether or not it is installed)."""
    _check_impl(impl)
    if mode not in cases.modes_for(layer):
        return False
    if impl == "onnxruntime":
        return mode in _ONNX_SUPPORTED.get(layer, ())
    if impl == "numpy":
        return layer not in _NUMPY_UNSUPPORTED
    return True


def versions():
    """{name: version} of NumPy, normcore and the optional peers ('-' when not installed), read
    from the installed distributions' metadata so that nothing heavy is imported for it."""
    out = {"numpy": np.__version__, "normcore": getattr(nc, "__version__", "?")}
    for module, dists in (("torch", ("torch",)), ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
                          ("onnx", ("onnx",))):
        out[module] = _version(module, dists)
    return out


def _version(module, dists):
    if module in sys.modules:
        return getattr(sys.modules[module], "__version__", "?")
    if module in _import_errors or importlib.util.find_spec(module) is None:
        return "-"
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; the implementations are: {', '.join(IMPLS)}")


# -- threads ---------------------------------------------------------------------------------

_threads = None  # the count set_threads set last (None: each library's default)


def current_threads():
    """The thread count the implementations use: set_threads's, else normcore's default."""
    return _threads if _threads is not None else nc.get_num_threads()


def _check_threads(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the thread count must be a positive int, got {n!r}")
    return int(n)


class set_threads:
    """Give every implementation `n` threads.

    `set_threads(4)` sets the count (normcore, torch when imported, ONNX Runtime sessions made
    after it, NumPy's BLAS via threadpoolctl when installed); `with set_threads(4): ...` also
    restores the previous settings on exit (normcore's to the count set_threads set before it,
    or to its default)."""

    def __init__(self, n):
        global _threads
        n = _check_threads(n)
        self.n = n
        self._previous = _threads
        torch = sys.modules.get("torch")
        self._previous_torch = torch.get_num_threads() if torch is not None else None
        self._blas = None
        _threads = n
        nc.set_num_threads(n)
        if torch is not None:
            torch.set_num_threads(n)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl is optional
            pass
        else:
            self._blas = threadpool_limits(limits=n, user_api="blas")

    def __enter__(self):
        return self.n

    def __exit__(self, *exc_info):
        self.restore()
        return False

    def restore(self):
        """Undo this call's settings."""
        global _threads
        _threads = self._previous
        nc.set_num_threads(self._previous)
        torch = sys.modules.get("torch")
        if torch is not None and self._previous_torch is not None:
            torch.set_num_threads(self._previous_torch)
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None


# -- inputs ----------------------------------------------------------------------------------

@dataclass
class Inputs:
    """What one benchmark iteration works on; every implementation gets the same values."""

    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray = None        # None for local_response_norm
    bias: np.ndarray = None
    running_mean: np.ndarray = None  # batch_norm and switchable_norm
    running_var: np.ndarray = None
    mean_weight: np.ndarray = None   # switchable_norm's mixing logits (IN, LN, BN)
    var_weight: np.ndarray = None


def param_shape(layer, shape):
    """Shape of the affine parameters of `layer` for x of `shape` (None: it has none)."""
    if layer == "local_response_norm":
        return None
    if layer == "layer_norm":
        return tuple(shape[-1:]) if len(shape) == 2 else tuple(shape[1:])
    return (shape[1],)


def make_inputs(layer, shape, dtype=np.float32, rng=None):
    """x, dy and non-trivial parameters / running statistics, drawn from `rng` in a fixed order."""
    rng = np.random.default_rng(0) if rng is None else rng
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dims (N, C, ...), got {shape}")
    inp = Inputs(rng.standard_normal(shape, dtype=dtype), rng.standard_normal(shape, dtype=dtype))
    pshape = param_shape(layer, shape)
    if pshape is not None:
        inp.weight = (1.0 + 0.2 * rng.standard_normal(pshape)).astype(dtype)
        inp.bias = (0.2 * rng.standard_normal(pshape)).astype(dtype)
    if layer in ("batch_norm", "switchable_norm"):
        C = shape[1]
        inp.running_mean = (0.1 * rng.standard_normal(C)).astype(dtype)
        inp.running_var = rng.uniform(0.5, 1.5, C).astype(dtype)
    if layer == "switchable_norm":
        inp.mean_weight = (0.5 * rng.standard_normal(3)).astype(dtype)
        inp.var_weight = (0.5 * rng.standard_normal(3)).astype(dtype)
    return inp


def make(impl, layer, mode, shape, dtype=np.float32, rng=None, inputs=None):
    """A zero-argument callable running one iteration of `layer` in `mode` on x of `shape` with
    `impl`. Raises PeerUnavailable (package missing) or UnsupportedCase (mode not done by impl).
    `inputs` (from make_inputs for this layer and shape) is used instead of drawing new ones from
    `rng`; no implementation writes to it, so several can share it."""
    _check_impl(impl)
    if mode not in cases.modes_for(layer):
        raise ValueError(f"{layer} is not benchmarked in mode {mode!r}; its modes: "
                         f"{', '.join(cases.modes_for(layer))}")
    if not supports(impl, layer, mode):
        raise UnsupportedCase(f"{impl} does not run {layer} in mode {mode!r}")
    reason = unavailable_reason(impl)
    if reason is not None:
        raise PeerUnavailable(reason)
    inp = make_inputs(layer, shape, dtype, rng) if inputs is None else inputs
    if inp.x.shape != tuple(shape) or inp.x.dtype != np.dtype(dtype):
        raise ValueError(f"inputs hold x of shape {inp.x.shape} {inp.x.dtype}, not {tuple(shape)} {np.dtype(dtype)}")
    return FACTORIES[impl](layer, mode, inp)


def _dim_class(layer, ndim):
    """normcore / torch.nn class name suffix for x with `ndim` dims."""
    if layer == "batch_norm":
        names = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
    else:
        names = {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}
    if ndim not in names:
        raise ValueError(f"{layer} takes 2-D to 5-D input here, got {ndim}-D")
    return names[ndim]


# -- normcore --------------------------------------------------------------------------------

def _normcore_module(layer, inp):
    x = inp.x
    C = x.shape[1]
    dtype = x.dtype
    if layer == "batch_norm":
        m = getattr(nc, _dim_class(layer, x.ndim))(C, dtype=dtype)
    elif layer == "instance_norm":
        m = getattr(nc, _dim_class(layer, x.ndim))(C, affine=True, dtype=dtype)
    elif layer == "group_norm":
        m = nc.GroupNorm(cases.group_count(C), C, dtype=dtype)
    elif layer == "layer_norm":
        m = nc.LayerNorm(param_shape(layer, x.shape), dtype=dtype)
    elif layer == "local_response_norm":
        m = nc.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
    else:
        m = nc.create_norm(f"switchable_norm{x.ndim - 2}d", C, dtype=dtype)
    for name in ("weight", "bias", "running_mean", "running_var", "mean_weight", "var_weight"):
        value = getattr(inp, name)
        if value is not None:
            getattr(m, name)[...] = value
    return m


def normcore_peer(layer, mode, inp):
    m = _normcore_module(layer, inp)
    x, dy = inp.x, inp.dy
    if mode == "eval":
        m.eval()
    else:
        m.train()
    if mode != "fwd+bwd":
        return lambda: m(x)

    def step():
        m(x)
        return m.backward(dy)

    return step


# -- torch -----------------------------------------------------------------------------------

def _torch_module(layer, inp):
    torch = _optional("torch")
    nn = torch.nn
    x = inp.x
    C = x.shape[1]
    if layer == "batch_norm":
        m = getattr(nn, _dim_class(layer, x.ndim))(C, eps=EPS, momentum=BN_MOMENTUM)
    elif layer == "instance_norm":
        m = getattr(nn, _dim_class(layer, x.ndim))(C, eps=EPS, affine=True)
    elif layer == "group_norm":
        m = nn.GroupNorm(cases.group_count(C), C, eps=EPS)
    elif layer == "layer_norm":
        m = nn.LayerNorm(param_shape(layer, x.shape), eps=EPS)
    elif layer == "local_response_norm":
        m = nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)
    else:
        from tests.released_switchnorm import ReleasedSwitchNorm

        m = ReleasedSwitchNorm(C, dims=x.ndim - 2, eps=EPS, momentum=SN_MOMENTUM)
    m = m.to({np.float32: torch.float32, np.float64: torch.float64}[x.dtype.type])
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "mean_weight", "var_weight"):
            value = getattr(inp, name)
            if value is not None:
                target = getattr(m, name)
                target.copy_(torch.from_numpy(value).reshape(target.shape))
    return m


def torch_peer(layer, mode, inp):
    torch = _optional("torch")
    torch.set_num_threads(current_threads())
    m = _torch_module(layer, inp)
    x = torch.from_numpy(inp.x)
    if mode == "eval":
        m.eval()
    else:
        m.train()
    if mode != "fwd+bwd":
        def forward():
            with torch.no_grad():
                return m(x)

        return forward
    x.requires_grad_(True)
    dy = torch.from_numpy(inp.dy)
    params = list(m.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        m(x).backward(dy)
        return x.grad

    return step


# -- onnxruntime -----------------------------------------------------------------------------

def onnx_model(layer, inp):
    """A one-node ONNX ModelProto computing the inference forward of `layer` on inp.x."""
    onnx = _optional("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    x = inp.x
    elem = {np.float32: onnx.TensorProto.FLOAT, np.float64: onnx.TensorProto.DOUBLE}[x.dtype.type]
    if layer == "batch_norm":
        op, attrs = "BatchNormalization", {"epsilon": EPS}
        inits = {"scale": inp.weight, "B": inp.bias, "mean": inp.running_mean, "var": inp.running_var}
    elif layer == "instance_norm":
        op, attrs, inits = "InstanceNormalization", {"epsilon": EPS}, {"scale": inp.weight, "B": inp.bias}
    elif layer == "group_norm":
        op, attrs = "GroupNormalization", {"epsilon": EPS, "num_groups": cases.group_count(x.shape[1])}
        inits = {"scale": inp.weight, "bias": inp.bias}
    elif layer == "layer_norm":
        axis = x.ndim - len(param_shape(layer, x.shape))
        op, attrs, inits = "LayerNormalization", {"epsilon": EPS, "axis": axis}, {"scale": inp.weight, "B": inp.bias}
    elif layer == "local_response_norm":
        op, attrs, inits = "LRN", {"size": LRN_SIZE, "alpha": LRN_ALPHA, "beta": LRN_BETA, "bias": LRN_K}, {}
    else:
        raise UnsupportedCase(f"onnxruntime does not run {layer}")
    node = helper.make_node(op, ["X", *inits], ["Y"], **attrs)
    graph = helper.make_graph(
        [node], f"normcore_bench_{layer}",
        [helper.make_tensor_value_info("X", elem, list(x.shape))],
        [helper.make_tensor_value_info("Y", elem, list(x.shape))],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    return model


def onnxruntime_peer(layer, mode, inp):
    ort = _optional("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = current_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(onnx_model(layer, inp).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"X": inp.x}
    outputs = ["Y"]
    return lambda: session.run(outputs, feed)[0]


# -- numpy -----------------------------------------------------------------------------------

class _NumpyNorm:
    """Forward and backward of one layer in plain NumPy; the forward keeps what backward needs."""

    def __init__(self, layer, inp, training):
        self.layer = layer
        self.training = training
        self.x_shape = inp.x.shape
        self.weight, self.bias = inp.weight, inp.bias
        self.running_mean = None if inp.running_mean is None else inp.running_mean.copy()
        self.running_var = None if inp.running_var is None else inp.running_var.copy()
        self.grads = {}
        self._cache = None

    def forward(self, x):
        return getattr(self, "_forward_" + self.layer)(x)

    def backward(self, dy):
        return getattr(self, "_backward_" + self.layer)(dy)

    # -- normalisation over groups of values: instance, group and layer norm ---------------
    def _groups(self):
        """(shape of x as [groups, values], shape the parameters broadcast as)."""
        N, C = self.x_shape[:2]
        if self.layer == "instance_norm":
            return (N * C, -1), (1, C) + (1,) * (len(self.x_shape) - 2)
        if self.layer == "group_norm":
            return (N * cases.group_count(C), -1), (1, C) + (1,) * (len(self.x_shape) - 2)
        p = param_shape("layer_norm", self.x_shape)
        return (-1, int(np.prod(p))), (1,) * (len(self.x_shape) - len(p)) + p

    def _group_forward(self, x):
        groups, pshape = self._groups()
        xg = x.reshape(groups)
        mean = xg.mean(axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(xg.var(axis=-1, keepdims=True) + EPS)
        xhat = ((xg - mean) * rstd).reshape(x.shape)
        self._cache = xhat, rstd
        return xhat * self.weight.reshape(pshape) + self.bias.reshape(pshape)

    def _group_backward(self, dy):
        groups, pshape = self._groups()
        xhat, rstd = self._cache
        param_axes = tuple(i for i, d in enumerate(pshape) if d == 1)
        self.grads = {"weight": (dy * xhat).sum(axis=param_axes).reshape(self.weight.shape),
                      "bias": dy.sum(axis=param_axes).reshape(self.bias.shape)}
        g = (dy * self.weight.reshape(pshape)).reshape(groups)
        xh = xhat.reshape(groups)
        dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xh * (g * xh).mean(axis=-1, keepdims=True))
        return dx.reshape(dy.shape)

    _forward_instance_norm = _forward_group_norm = _forward_layer_norm = _group_forward
    _backward_instance_norm = _backward_group_norm = _backward_layer_norm = _group_backward

    # -- batch norm ------------------------------------------------------------------------
    def _bn_axes(self):
        ndim = len(self.x_shape)
        return (0,) + tuple(range(2, ndim)), (1, self.x_shape[1]) + (1,) * (ndim - 2)

    def _forward_batch_norm(self, x):
        axes, pshape = self._bn_axes()
        if self.training:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            n = x.size // x.shape[1]
            self.running_mean[...] = (1 - BN_MOMENTUM) * self.running_mean + BN_MOMENTUM * mean
            self.running_var[...] = (1 - BN_MOMENTUM) * self.running_var + BN_MOMENTUM * var * (n / max(n - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
        rstd = 1.0 / np.sqrt(var + EPS)
        xhat = (x - mean.reshape(pshape)) * rstd.reshape(pshape)
        self._cache = xhat, rstd
        return xhat * self.weight.reshape(pshape) + self.bias.reshape(pshape)

    def _backward_batch_norm(self, dy):
        axes, pshape = self._bn_axes()
        xhat, rstd = self._cache
        d_bias = dy.sum(axis=axes)
        d_weight = (dy * xhat).sum(axis=axes)
        self.grads = {"weight": d_weight, "bias": d_bias}
        m = dy.size // dy.shape[1]
        scale = (self.weight * rstd / m).reshape(pshape)
        return scale * (m * dy - d_bias.reshape(pshape) - xhat * d_weight.reshape(pshape))

    # -- local response norm ---------------------------------------------------------------
    @staticmethod
    def _window_sum(a, before, after):
        """Sum over the channels c - before .. c + after (zeros outside), for every c."""
        C = a.shape[1]
        pad = [(0, 0)] * a.ndim
        pad[1] = (before, after)
        padded = np.pad(a, pad)
        total = padded[:, 0:C].copy()
        for i in range(1, before + after + 1):
            total += padded[:, i:i + C]
        return total

    def _forward_local_response_norm(self, x):
        base = LRN_K + (LRN_ALPHA / LRN_SIZE) * self._window_sum(x * x, LRN_SIZE // 2, (LRN_SIZE - 1) // 2)
        div = base ** LRN_BETA
        self._cache = x, base, div
        return x / div

    def _backward_local_response_norm(self, dy):
        x, base, div = self._cache
        self.grads = {}
        t = dy * x / (div * base)  # dy_c * x_c * base_c^(-beta-1)
        # x_i is in the window of c for c in i - (size-1)//2 .. i + size//2: the mirrored window.
        u = self._window_sum(t, (LRN_SIZE - 1) // 2, LRN_SIZE // 2)
        return dy / div - (2.0 * LRN_ALPHA * LRN_BETA / LRN_SIZE) * x * u


def numpy_peer(layer, mode, inp):
    m = _NumpyNorm(layer, inp, training=(mode != "eval"))
    x, dy = inp.x, inp.dy
    if mode != "fwd+bwd":
        return lambda: m.forward(x)

    def step():
        m.forward(x)
        return m.backward(dy)

    return step


FACTORIES = {
    "normcore": normcore_peer,
    "torch": torch_peer,
    "onnxruntime": onnxruntime_peer,
    "numpy": numpy_peer,
}


# -- correctness -----------------------------------------------------------------------------

def to_numpy(out):
    """An implementation's result as a NumPy array (torch tensors detached)."""
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    return np.asarray(out)


def cross_check(layer, mode, shape, impls=None, dtype=np.float32, rtol=1e-4, atol=1e-4, seed=0):
    """Run one iteration of every available implementation in `impls` (default: all) that does
    `layer` in `mode`, from the same inputs, and assert its output (y, or dx for fwd+bwd) equals
    normcore's within rtol/atol. Returns {impl: max abs difference from normcore}."""
    ref = to_numpy(make("normcore", layer, mode, shape, dtype, np.random.default_rng(seed))())
    diffs = {}
    for impl in IMPLS if impls is None else impls:
        if impl == "normcore" or not supports(impl, layer, mode) or unavailable_reason(impl) is not None:
            continue
        out = to_numpy(make(impl, layer, mode, shape, dtype, np.random.default_rng(seed))())
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol,
                                   err_msg=f"{impl} differs from normcore: {layer} {mode} {tuple(shape)}")
        diffs[impl] = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
    return diffs
