"""Any normcore layer as a torch module: the registry's norms (plugins such as SwitchableNorm,
third-party ones such as the FRN example) inside PyTorch models.

``normcore.torch.wrap("switchable_norm2d", 16)`` (or ``wrap(layer)`` for an instance) gives a
``NormLayer``: its parameters are torch Parameters and its buffers torch buffers that share
memory with the layer's arrays (the layer's ``state_dict`` keys), its forward is the layer's
``forward`` and its backward the layer's ``backward``, through one ``torch.autograd.Function``.
The torch module is the owner: before each forward the layer's attributes are pointed at the
current tensors' memory, so ``.double()``, ``load_state_dict(assign=True)`` or an optimizer
that replaces ``param.data`` all reach the layer.

A layer keeps what its backward needs in ``_saved`` (``nc.Module``'s convention, followed by
the built-in layers and plugins); the Function keeps each forward's ``_saved`` in its autograd
context and gives it back to the layer for that forward's backward, so a layer called several
times before one backward (weight sharing, gradient checkpointing) differentiates each call.
``torch.compile`` runs these layers eagerly (a graph break): their kernels are the NumPy
layer's, outside any op registry.
"""
import numpy as np
import torch

from normcore.module import Module
from normcore.registry import create_norm
from normcore.torch._ops import array, dense
from normcore.torch.functional import check_tensors

__all__ = ["NormLayer", "wrap", "run_layer"]


def _as_tensor(a):
    """A layer's ndarray result as a tensor sharing its memory (copied only if torch cannot
    view it: negative strides)."""
    a = np.asarray(a)
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


def _double_backward_refused(name):
    return RuntimeError(
        f"normcore.torch: double backward (create_graph=True, the gradient of a gradient) through {name} is not "
        f"supported")


class _LayerFunction(torch.autograd.Function):
    """forward: the layer's forward on the input's memory; backward: its backward for that
    forward, with the parameters' gradients from its ``grads``."""

    @staticmethod
    def forward(ctx, layer, layer_input, names, x, *params):
        with layer.lock:
            y = layer.forward(layer_input)
            ctx.record = layer._saved
        ctx.layer, ctx.names = layer, names
        ctx.param_meta = [(p.dtype, p.shape) for p in params]
        ctx.save_for_backward(x)  # for torch's check that x was not modified in place before backward
        return _as_tensor(y)

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        if torch.is_grad_enabled():
            raise _double_backward_refused(type(layer).__name__)
        ctx.saved_tensors  # noqa: B018 - raises if x was modified in place since the forward
        with layer.lock:
            current = layer._saved
            layer._saved = ctx.record
            try:
                dx = layer.backward(array(dy))
                grads = dict(layer.grads)
            finally:
                layer._saved = current
        out = [None, None, None, _as_tensor(dx)]
        for name, (dtype, shape), needed in zip(ctx.names, ctx.param_meta, ctx.needs_input_grad[4:]):
            g = grads.get(name) if needed else None
            out.append(None if g is None else torch.from_numpy(np.asarray(g)).to(dtype).reshape(shape))
        return tuple(out)


def run_layer(module, layer, layer_input, x):
    """y of `layer` (a normcore Module) on `layer_input` inside the torch `module` that owns its
    state: the layer's attributes pointed at the module's parameters and buffers, its mode
    set to the module's, differentiable through _LayerFunction; arrays the layer rebinds
    instead of writing in place are copied back into the module's tensors."""
    views = {}
    for name, t in (*module._parameters.items(), *module._buffers.items()):
        if t is not None:
            views[name] = array(t)
            setattr(layer, name, views[name])
    if layer.training != module.training:
        layer.train(module.training)
    names = [n for n, p in module._parameters.items() if p is not None]
    params = [module._parameters[n] for n in names]
    y = _LayerFunction.apply(layer, layer_input, names, x, *params)
    for name, view in views.items():
        current = getattr(layer, name)
        if current is not view:  # the layer replaced the array: keep the module's tensor the owner
            with torch.no_grad():
                getattr(module, name).copy_(torch.from_numpy(np.asarray(current)))
            setattr(layer, name, view)
    return y


class NormLayer(torch.nn.Module):
    """A normcore layer as a ``torch.nn.Module``.

    Parameters
    ----------
    layer : normcore.Module
        The layer (built-in, plugin or third-party). Its parameters become torch Parameters
        and its buffers torch buffers sharing its arrays' memory, under the layer's names.

    Attributes
    ----------
    layer : normcore.Module
        The wrapped layer; ``repr`` shows it.
    """

    def __init__(self, layer):
        super().__init__()
        if not isinstance(layer, Module):
            raise TypeError(f"NormLayer wraps a normcore layer (an nc.Module), got {type(layer).__name__}")
        self.layer = layer
        for name in layer._parameter_names:
            a = getattr(layer, name, None)
            if a is not None:
                self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(np.asarray(a))))
        for name in layer._buffer_names:
            a = getattr(layer, name, None)
            if a is not None:
                self.register_buffer(name, torch.from_numpy(np.asarray(a)))
        self.train(layer.training)

    @torch.compiler.disable
    def forward(self, input):
        check_tensors(type(self.layer).__name__, input)
        x = dense(input)
        return run_layer(self, self.layer, array(x), x)

    def extra_repr(self):
        return repr(self.layer)


def wrap(norm, *args, **kwargs):
    """A normcore layer as a torch module (``NormLayer``).

    Parameters
    ----------
    norm : str or normcore.Module
        A name of the registry (``nc.list_norms()``: built-ins, shipped plugins, third-party
        entry points), constructed with `args` and `kwargs`; or a layer instance (then no
        arguments).

    Returns
    -------
    NormLayer

    Examples
    --------
    >>> import normcore.torch as nct
    >>> m = nct.wrap("switchable_norm2d", 8)
    >>> sorted(name for name, _ in m.named_parameters())
    ['bias', 'mean_weight', 'var_weight', 'weight']
    """
    if isinstance(norm, Module):
        if args or kwargs:
            raise TypeError("wrap(layer) takes no constructor arguments: the layer is built already")
        return NormLayer(norm)
    return NormLayer(create_norm(norm, *args, **kwargs))
