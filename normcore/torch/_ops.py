"""normcore's kernels as PyTorch operators: the ``normcore::`` custom ops, their fake (meta)
implementations and autograd formulas, and the eager fast path.

Every op is a thin bridge: it views the CPU tensors' memory as NumPy arrays (no copy), calls
the NumPy layer's own checked step (``normcore.functional.*_step``) or backward, and wraps the
resulting arrays as tensors (no copy). What autograd saves is tensors only: the input, the
weight and the float64 statistics the forward returned; the backward rebuilds the NumPy
layer's record from them (``grouped.resume`` and its twins), so it is bitwise the backward of
the NumPy layer.

Two ways in, one computation (the ``_*_arrays`` functions below):

- ``torch.ops.normcore.<op>`` (``torch.library.custom_op``, with ``register_fake`` and
  ``register_autograd``): what ``torch.compile`` and ``torch.export`` trace, and what the
  layers call while being compiled. Functional, as a custom op with an autograd formula must
  be: the forward ops return the running statistics' new values, which the caller copies
  into the buffers. The dispatcher and its autograd wrapper cost about 25 us a call.
- ``eager_<op>`` and its ``torch.autograd.Function``: what the layers call in eager
  mode, a few us a call. They write the new running statistics into the buffers themselves,
  and skip autograd altogether when no gradient is wanted.

Double backward is refused: the backward ops' own autograd formula raises, and the eager
backward goes through the backward op when autograd records the gradient's graph.
"""
import math
from typing import Optional

import numpy as np
import torch

from normcore import functional as core
from normcore.channel_norm import backward_from_stats, backward_saved
from normcore.layer_norm import layer_norm_backward, layer_norm_resume
from normcore.local_response_norm import local_response_norm_backward, lrn_resume

_F64 = torch.float64
Tensor = torch.Tensor


# -- tensors <-> arrays ---------------------------------------------------------------------------
def array(t):
    """A CPU tensor's memory as an ndarray (a view, no copy); None stays None. (A tensor that
    requires grad must be detached first; detaching costs as much as the view.)"""
    if t is None:
        return None
    return t.detach().numpy() if t.requires_grad else t.numpy()


def dense(x):
    """x in a layout the kernels read in place: itself when C-contiguous or channels-last
    ((N, *, C) contiguous: the kernels' rule, ``grouped.channels_last_rows``), else a
    contiguous copy. The real and the fake implementations both start from it, so that their
    outputs have the same strides."""
    if x.is_contiguous() or (x.dim() >= 3 and x.movedim(1, -1).is_contiguous()):
        return x
    return x.contiguous()


def like(a, x):
    """The kernels' output `a` for the dense input x as a tensor with the strides of
    ``torch.empty_like(x)``, which the fake implementations return. The kernels keep x's
    layout; NumPy and torch may still differ in the strides of dims of size 1, which address
    nothing."""
    t = torch.from_numpy(a)
    if t.stride() != x.stride():
        t = t.as_strided(x.shape, x.stride())
    return t


def _tensor(a):
    return torch.from_numpy(a)


def _stats(mean, rstd, n):
    """A forward's float64 statistics (None for an empty input: zeros of length n) as tensors."""
    if mean is None:
        return torch.zeros(n, dtype=_F64), torch.zeros(n, dtype=_F64)
    return _tensor(mean), _tensor(rstd)


def _record_stats(record, n):
    inner = record.inner
    return _stats(None if inner is None else inner.mean, None if inner is None else inner.rstd, n)


def _channels(x):
    return x.shape[1] if x.dim() > 1 else 0


class _Meta:
    """A parameter's dtype and shape: what a backward needs of a parameter it has no gradient
    formula through (the bias)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, t):
        self.dtype, self.shape = t.dtype, t.shape


def _meta(t):
    return None if t is None else _Meta(t)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _grad_of(g, p):
    """A float64 gradient array as a tensor of the dtype and shape of the parameter p (a tensor
    or its _Meta); None when there is no such parameter."""
    if p is None:
        return None
    return _tensor(np.asarray(g).astype(_NUMPY_DTYPES[p.dtype]).reshape(p.shape))


def _grad_of_tensor(g, p):
    """A float64 gradient tensor (from a backward op) in the dtype and shape of p, or None."""
    if p is None:
        return None
    return g.to(p.dtype).view(p.shape)


# -- double backward --------------------------------------------------------------------------
def _refuse_double_backward(op, name):
    """Give the backward op `op` an autograd formula that raises: double backward is refused
    with a message, rather than failing somewhere inside autograd."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"normcore.torch: double backward (the gradient of a gradient) through {name} is not supported; "
            f"keep torch.nn's layer where higher-order gradients are needed")

    def setup_context(ctx, inputs, output):
        pass

    op.register_autograd(backward, setup_context=setup_context)


# -- the eager path -----------------------------------------------------------------------------
def eager_function(name, forward, backward, doc):
    """A torch.autograd.Function from forward(ctx, *args) and backward(ctx, *grads), in the
    classic form: a Function with a separate setup_context binds its arguments with
    inspect.signature on every call, which costs more than the kernels on small inputs."""
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward), "__doc__": doc})


def needs_grad(*tensors):
    """Whether autograd is recording and any of the tensors (None allowed) requires grad: else
    the eager path computes without an autograd.Function."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- BatchNorm, InstanceNorm, GroupNorm: the grouped norms ----------------------------------------
def _running_new(running, updating):
    """The op's (new running_mean, new running_var): tensors of the buffers' dtype with the
    step's values, the current values when it updated nothing (an empty batch), empty tensors
    when not updating."""
    if not updating:
        return torch.empty(0, dtype=_F64), torch.empty(0, dtype=_F64)
    rm, rv, new = running
    if new is None:
        return _tensor(rm.copy()), _tensor(rv.copy())
    return _tensor(new[0].astype(rm.dtype)), _tensor(new[1].astype(rv.dtype))


def _fake_running(x, running_mean, running_var, updating):
    if not updating:
        return x.new_empty(0, dtype=_F64), x.new_empty(0, dtype=_F64)
    return torch.empty_like(running_mean), torch.empty_like(running_var)


def _commit(running):
    """Write a step's new running statistics into the buffers' memory (the eager path), cast
    to their dtype as nc.toolkit.write_arrays casts."""
    if running is not None and running[2] is not None:
        rm, rv, (new_mean, new_var) = running
        rm[...] = new_mean
        rv[...] = new_var


def _batch_norm_arrays(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """batch_norm of a dense x (``dense``), changing nothing: (y, its ForwardRecord, the length
    of its statistics, (running_mean, running_var, their new float64 values or None) as
    arrays)."""
    rm, rv = array(running_mean), array(running_var)
    y, record, new = core.batch_norm_step(array(x), rm, rv, array(weight), array(bias), training, momentum, eps)
    return like(y, x), record, x.shape[1], (rm, rv, new)


def _batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, momentum: float, eps: float
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, record, n, running = _batch_norm_arrays(dense(input), weight, bias, running_mean, running_var, training, momentum,
                                               eps)
    return y, *_record_stats(record, n), *_running_new(running, training and running_mean is not None)


batch_norm = torch.library.custom_op("normcore::batch_norm", _batch_norm, mutates_args=(), device_types="cpu")
batch_norm.__doc__ = """(y, mean, rstd, new running_mean, new running_var) of
``torch.nn.functional.batch_norm``; the new running statistics are empty tensors unless
training with them."""


@batch_norm.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    x = dense(input)
    C = _channels(x)
    return (torch.empty_like(x), x.new_empty(C, dtype=_F64), x.new_empty(C, dtype=_F64),
            *_fake_running(x, running_mean, running_var, training and running_mean is not None))


def _instance_norm_arrays(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    """instance_norm, changing nothing, as _batch_norm_arrays: the statistics per (n, c) with
    the input's own, per c with the running ones."""
    rm, rv = array(running_mean), array(running_var)
    y, record, new = core.instance_norm_step(array(x), rm, rv, array(weight), array(bias), use_input_stats,
                                             momentum, eps)
    n = x.shape[0] * x.shape[1] if use_input_stats else x.shape[1]
    return like(y, x), record, n, (rm, rv, new)


def _instance_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], use_input_stats: bool, momentum: float, eps: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, record, n, running = _instance_norm_arrays(dense(input), weight, bias, running_mean, running_var, use_input_stats,
                                                  momentum, eps)
    return y, *_record_stats(record, n), *_running_new(running, use_input_stats and running_mean is not None)


instance_norm = torch.library.custom_op("normcore::instance_norm", _instance_norm, mutates_args=(),
                                        device_types="cpu")
instance_norm.__doc__ = """(y, mean, rstd, new running_mean, new running_var) of
``torch.nn.functional.instance_norm``."""


@instance_norm.register_fake
def _(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    x = dense(input)
    n = x.shape[0] * _channels(x) if use_input_stats else _channels(x)
    return (torch.empty_like(x), x.new_empty(n, dtype=_F64), x.new_empty(n, dtype=_F64),
            *_fake_running(x, running_mean, running_var, use_input_stats and running_mean is not None))


def _group_norm_arrays(x, num_groups, weight, bias, eps):
    """group_norm, as _batch_norm_arrays (no running statistics)."""
    y, record = core.group_norm_step(array(x), num_groups, array(weight), array(bias), eps)
    return like(y, x), record, x.shape[0] * num_groups, None


def _group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    y, record, n, _ = _group_norm_arrays(dense(input), num_groups, weight, bias, eps)
    return y, *_record_stats(record, n)


group_norm = torch.library.custom_op("normcore::group_norm", _group_norm, mutates_args=(), device_types="cpu")
group_norm.__doc__ = """(y, mean, rstd) of ``torch.nn.functional.group_norm``, the statistics
per (n, group)."""


@group_norm.register_fake
def _(input, num_groups, weight, bias, eps):
    x = dense(input)
    n = x.shape[0] * num_groups
    return torch.empty_like(x), x.new_empty(n, dtype=_F64), x.new_empty(n, dtype=_F64)


def _grouped_backward_arrays(grad_output, input, weight, mean, rstd, groups, batch_stats):
    x = dense(input)
    dx, dweight, dbias = backward_from_stats(array(grad_output), array(x), array(weight), array(mean), array(rstd),
                                             groups, batch_stats)
    return like(dx, x), dweight, dbias


def _grouped_norm_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                           groups: int, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _grouped_backward_arrays(grad_output, input, weight, mean, rstd, groups, batch_stats)
    return dx, _tensor(np.asarray(dweight, np.float64)), _tensor(np.asarray(dbias, np.float64))


grouped_norm_backward = torch.library.custom_op("normcore::grouped_norm_backward", _grouped_norm_backward,
                                                mutates_args=(), device_types="cpu")
grouped_norm_backward.__doc__ = """(dx, dweight, dbias) of a batch, instance or group norm
forward from its input and saved statistics (``channel_norm.backward_from_stats``: groups 0
for statistics per channel, G for G groups per sample); dweight and dbias in float64."""


@grouped_norm_backward.register_fake
def _(grad_output, input, weight, mean, rstd, groups, batch_stats):
    x = dense(input)
    C = _channels(x)
    return torch.empty_like(x), x.new_empty(C, dtype=_F64), x.new_empty(C, dtype=_F64)


_refuse_double_backward(grouped_norm_backward, "batch, instance and group norm")


class _Grouped:
    """The autograd formula of the grouped-norm ops, whose inputs hold x, weight and bias at
    `positions` among n_inputs: what is saved, and the gradients from a backward call."""

    def __init__(self, n_inputs, positions, groups_of):
        self.n_inputs, self.positions = n_inputs, positions
        self.groups_of = groups_of  # inputs -> (groups, batch_stats) for backward_from_stats

    def setup(self, ctx, inputs, mean, rstd):
        x, weight, bias = (inputs[p] for p in self.positions)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups, ctx.batch_stats = self.groups_of(inputs)
        ctx.bias = _meta(bias)

    def setup_context(self, ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        self.setup(ctx, inputs, output[1], output[2])

    def _place(self, ctx, dx, dweight, dbias):
        out = [None] * self.n_inputs
        needs = [ctx.needs_input_grad[p] for p in self.positions]
        for position, need, g in zip(self.positions, needs, (dx, dweight, dbias)):
            out[position] = g if need else None
        return tuple(out)

    def op_backward(self, ctx, dy, *unused):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = grouped_norm_backward(dy, x, weight, mean, rstd, ctx.groups, ctx.batch_stats)
        return self._place(ctx, dx, _grad_of_tensor(dweight, weight), _grad_of_tensor(dbias, ctx.bias))

    def keep(self, ctx, inputs, record, n):
        """What the eager backward needs: the forward's record itself (the NumPy layer's, so
        nothing is rebuilt) and its inputs; x and the weight also saved for autograd's check
        that they were not modified in place before backward."""
        ctx.save_for_backward(inputs[self.positions[0]], inputs[self.positions[1]])
        ctx.record, ctx.n_stats, ctx.inputs = record, n, inputs

    def eager_backward(self, ctx, dy):
        x, weight = ctx.saved_tensors
        bias = ctx.inputs[self.positions[2]]
        if torch.is_grad_enabled():  # create_graph=True: through the op, which refuses double backward
            mean, rstd = _record_stats(ctx.record, ctx.n_stats)
            dx, dweight, dbias = grouped_norm_backward(dy, x, weight, mean, rstd, *self.groups_of(ctx.inputs))
            return self._place(ctx, dx, _grad_of_tensor(dweight, weight), _grad_of_tensor(dbias, bias))
        dx, dweight, dbias = backward_saved(array(dy), ctx.record)
        return self._place(ctx, like(dx, x), _grad_of(dweight, weight), _grad_of(dbias, bias))


def _grouped_eager(name, formula, compute):
    """The eager Function of a grouped-norm op: computes, writes the new running statistics,
    keeps the record for backward, returns y."""
    def forward(ctx, *args):
        y, record, n, running = compute(*args)
        _commit(running)
        formula.keep(ctx, args, record, n)
        return y

    return eager_function(name, forward, formula.eager_backward, f"The eager path of normcore::{name}.")


def _eager(function, compute, *args, differentiable):
    """function.apply(*args) when a gradient is wanted of the tensors `differentiable`, else
    compute(*args) alone: y, with the running statistics written, without autograd."""
    if needs_grad(*differentiable):
        return function.apply(*args)
    y, _, _, running = compute(*args)
    _commit(running)
    return y


def eager_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """batch_norm's y, the running statistics updated in place (eager mode)."""
    return _eager(BatchNormFunction, _batch_norm_arrays, input, weight, bias, running_mean, running_var, training,
                  momentum, eps, differentiable=(input, weight, bias))


def eager_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    """instance_norm's y, the running statistics updated in place (eager mode)."""
    return _eager(InstanceNormFunction, _instance_norm_arrays, input, weight, bias, running_mean, running_var,
                  use_input_stats, momentum, eps, differentiable=(input, weight, bias))


def eager_group_norm(input, num_groups, weight, bias, eps):
    """group_norm's y (eager mode)."""
    return _eager(GroupNormFunction, _group_norm_arrays, input, num_groups, weight, bias, eps,
                  differentiable=(input, weight, bias))


_bn_formula = _Grouped(8, (0, 1, 2), lambda inputs: (0, inputs[5]))
_in_formula = _Grouped(8, (0, 1, 2), lambda inputs: (inputs[0].shape[1] if inputs[5] else 0, inputs[5]))
_gn_formula = _Grouped(5, (0, 2, 3), lambda inputs: (inputs[1], True))
batch_norm.register_autograd(_bn_formula.op_backward, setup_context=_bn_formula.setup_context)
instance_norm.register_autograd(_in_formula.op_backward, setup_context=_in_formula.setup_context)
group_norm.register_autograd(_gn_formula.op_backward, setup_context=_gn_formula.setup_context)
BatchNormFunction = _grouped_eager("batch_norm", _bn_formula, _batch_norm_arrays)
InstanceNormFunction = _grouped_eager("instance_norm", _in_formula, _instance_norm_arrays)
GroupNormFunction = _grouped_eager("group_norm", _gn_formula, _group_norm_arrays)


# -- LayerNorm ------------------------------------------------------------------------------------
def _layer_norm(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    x = input.contiguous()
    y, saved = core.layer_norm_step(array(x), tuple(normalized_shape), array(weight), array(bias), eps)
    rows = math.prod(x.shape[: x.dim() - len(normalized_shape)])
    return (_tensor(y), *_stats(saved.mean, saved.rstd, rows))


layer_norm = torch.library.custom_op("normcore::layer_norm", _layer_norm, mutates_args=(), device_types="cpu")
layer_norm.__doc__ = """(y, mean, rstd) of ``torch.nn.functional.layer_norm``, the statistics per row."""


@layer_norm.register_fake
def _(input, normalized_shape, weight, bias, eps):
    rows = math.prod(input.shape[: input.dim() - len(normalized_shape)])
    return (torch.empty_like(input, memory_format=torch.contiguous_format), input.new_empty(rows, dtype=_F64),
            input.new_empty(rows, dtype=_F64))


def _layer_backward_arrays(grad_output, input, normalized_shape, weight, has_bias, mean, rstd):
    x = input.contiguous()
    shape = tuple(normalized_shape)
    L = math.prod(shape)
    if x.numel() == 0:
        return torch.zeros_like(x), np.zeros(L), np.zeros(L)
    saved = layer_norm_resume(array(x), shape, array(weight), has_bias, array(mean), array(rstd))
    dx, dweight, dbias = layer_norm_backward(array(grad_output), saved)
    return _tensor(dx), dweight, dbias


def _layer_norm_backward(grad_output: Tensor, input: Tensor, normalized_shape: list[int], weight: Optional[Tensor],
                         has_bias: bool, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _layer_backward_arrays(grad_output, input, normalized_shape, weight, has_bias, mean, rstd)
    return dx, _tensor(dweight), _tensor(dbias)


layer_norm_backward_op = torch.library.custom_op("normcore::layer_norm_backward", _layer_norm_backward,
                                                 mutates_args=(), device_types="cpu")


@layer_norm_backward_op.register_fake
def _(grad_output, input, normalized_shape, weight, has_bias, mean, rstd):
    L = math.prod(normalized_shape)
    return (torch.empty_like(input, memory_format=torch.contiguous_format), input.new_empty(L, dtype=_F64),
            input.new_empty(L, dtype=_F64))


_refuse_double_backward(layer_norm_backward_op, "layer norm")


def _layer_norm_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.normalized_shape = list(normalized_shape)
    ctx.bias = _meta(bias)


def _layer_norm_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    _layer_norm_setup(ctx, inputs, output)


def _layer_norm_place(ctx, dx, dweight, dbias):
    needs = ctx.needs_input_grad
    return dx if needs[0] else None, None, dweight if needs[2] else None, dbias if needs[3] else None, None


def _layer_norm_op_backward(ctx, dy, *unused):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_backward_op(dy, x, ctx.normalized_shape, weight, ctx.bias is not None, mean, rstd)
    return _layer_norm_place(ctx, dx, _grad_of_tensor(dweight, weight), _grad_of_tensor(dbias, ctx.bias))


def _layer_norm_eager_backward(ctx, dy):
    if torch.is_grad_enabled():
        return _layer_norm_op_backward(ctx, dy)
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_backward_arrays(dy, x, ctx.normalized_shape, weight, ctx.bias is not None, mean, rstd)
    return _layer_norm_place(ctx, dx, _grad_of(dweight, weight), _grad_of(dbias, ctx.bias))


def _layer_norm_eager_forward(ctx, *args):
    output = _layer_norm(*args)
    _layer_norm_setup(ctx, args, output)
    return output[0]


layer_norm.register_autograd(_layer_norm_op_backward, setup_context=_layer_norm_setup_context)
LayerNormFunction = eager_function("LayerNormFunction", _layer_norm_eager_forward, _layer_norm_eager_backward,
                                   "The eager path of normcore::layer_norm.")


def eager_layer_norm(input, normalized_shape, weight, bias, eps):
    """layer_norm's y (eager mode)."""
    if needs_grad(input, weight, bias):
        return LayerNormFunction.apply(input, normalized_shape, weight, bias, eps)
    return _layer_norm(input, normalized_shape, weight, bias, eps)[0]


# -- LocalResponseNorm ----------------------------------------------------------------------------
def _local_response_norm(input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    x = input.contiguous()
    y, _ = core.local_response_norm_step(array(x), size, alpha, beta, k)
    return _tensor(y)


local_response_norm = torch.library.custom_op("normcore::local_response_norm", _local_response_norm,
                                              mutates_args=(), device_types="cpu")
local_response_norm.__doc__ = """y of ``torch.nn.functional.local_response_norm``."""


@local_response_norm.register_fake
def _(input, size, alpha, beta, k):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _local_response_norm_backward(grad_output: Tensor, input: Tensor, size: int, alpha: float, beta: float,
                                  k: float) -> Tensor:
    x = input.contiguous()
    if x.numel() == 0:
        return torch.zeros_like(x)
    dx = local_response_norm_backward(array(grad_output), lrn_resume(array(x)), size, alpha, beta, k)
    return _tensor(dx)


local_response_norm_backward_op = torch.library.custom_op(
    "normcore::local_response_norm_backward", _local_response_norm_backward, mutates_args=(), device_types="cpu")


@local_response_norm_backward_op.register_fake
def _(grad_output, input, size, alpha, beta, k):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


_refuse_double_backward(local_response_norm_backward_op, "local response norm")


def _lrn_setup(ctx, inputs, output):
    x, size, alpha, beta, k = inputs
    ctx.save_for_backward(x)
    ctx.args = (size, alpha, beta, k)


def _lrn_op_backward(ctx, dy):
    x, = ctx.saved_tensors
    return local_response_norm_backward_op(dy, x, *ctx.args), None, None, None, None


def _lrn_eager_backward(ctx, dy):
    if torch.is_grad_enabled():
        return _lrn_op_backward(ctx, dy)
    x, = ctx.saved_tensors
    return _local_response_norm_backward(dy, x, *ctx.args), None, None, None, None


def _lrn_eager_forward(ctx, *args):
    y = _local_response_norm(*args)
    _lrn_setup(ctx, args, y)
    return y


local_response_norm.register_autograd(_lrn_op_backward, setup_context=_lrn_setup)
LocalResponseNormFunction = eager_function("LocalResponseNormFunction", _lrn_eager_forward, _lrn_eager_backward,
                                           "The eager path of normcore::local_response_norm.")


def eager_local_response_norm(input, size, alpha, beta, k):
    """local_response_norm's y (eager mode)."""
    if needs_grad(input):
        return LocalResponseNormFunction.apply(input, size, alpha, beta, k)
    return _local_response_norm(input, size, alpha, beta, k)
