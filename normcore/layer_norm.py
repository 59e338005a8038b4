"""LayerNorm: statistics per row over the trailing normalized_shape dims, element-wise affine.

x is viewed as rows [R, L] with L = prod(normalized_shape). Forward: one fused pass per row
(moments, then the per-column affine while the row is in cache). Backward: one fused pass per
row (sums of weight * dy and weight * dy * (x - mean), dx, and the column sums that give the
weight and bias gradients). Both in pyx/layer_rows.pxi, run by the engine.
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

from normcore import docstrings
from normcore._kernels.engine import rows_backward, rows_forward
from normcore.module import Module
from normcore.registry import register_norm
from normcore.threads import get_num_threads
from normcore.validation import (
    as_float_array,
    check_bool,
    check_device_arg,
    check_dtype_arg,
    check_eps,
    check_grad_output,
)

__all__ = ["LayerNorm", "layer_norm_forward", "layer_norm_backward", "normalize_shape"]


def normalize_shape(normalized_shape):
    """normalized_shape (an int, or a tuple, list, torch.Size or 1-D array of ints) as a tuple of
    ints >= 0.

    A set, dict, string or other iterable is refused with TypeError, as torch's functional
    layer_norm does: its order is not that of dims."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    else:
        if not (isinstance(normalized_shape, (tuple, list))
                or (isinstance(normalized_shape, np.ndarray) and normalized_shape.ndim == 1)):
            raise TypeError(
                f"normalized_shape must be an int or a sequence of ints (a tuple or list), got "
                f"{type(normalized_shape).__name__}")
        shape = tuple(normalized_shape)
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape):
            raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
        shape = tuple(int(d) for d in shape)
    if not shape:
        raise ValueError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element")
    if any(d < 0 for d in shape):
        raise ValueError(f"normalized_shape must not have negative sizes, got {shape}")
    return shape


def check_layer_input(x, shape, weight, bias):
    """PyTorch's rule: x must end with normalized_shape (ValueError with its message)."""
    k = len(shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(str(d) for d in shape)}], but got input of size{list(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != shape:
            raise ValueError(f"Expected {name} to be of same shape as normalized_shape {shape}, got {p.shape}")


class LayerSaved(NamedTuple):
    x2: object  # x as rows [R, L] (a view of x or its contiguous copy); None for an empty x
    shape: tuple
    dtype: np.dtype
    mean: np.ndarray
    rstd: np.ndarray
    weight: object  # weight as x's dtype, flattened, or None


def layer_norm_forward(x, shape, weight, bias, eps):
    """y and what backward needs, for x (*, *normalized_shape). Changes nothing."""
    L = math.prod(shape)
    R = math.prod(x.shape[: x.ndim - len(shape)])
    if x.size == 0:
        return np.empty_like(x), LayerSaved(None, x.shape, x.dtype, None, None, None)
    x2 = np.ascontiguousarray(x).reshape(R, L)
    w = _row_weight(weight, bias is not None, L, x.dtype)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=x.dtype).reshape(L)
    y2, stats = rows_forward(x2, w, b, eps, get_num_threads())
    return y2.reshape(x.shape), LayerSaved(x2, x.shape, x.dtype, stats[0], stats[1], w)


def _row_weight(weight, has_bias, L, dtype):
    """The weight as the kernels take it: None without affine parameters, else a flat copy in x's
    dtype (ones for a bias alone); a copy also of an x-dtype weight, so that the backward uses
    the weight of its forward."""
    if weight is None and not has_bias:
        return None
    return np.ones(L, dtype) if weight is None else np.array(weight, dtype=dtype, order="C").reshape(L)


def layer_norm_resume(x, shape, weight, has_bias, mean, rstd):
    """The LayerSaved of a forward of x (non-empty) over `shape`, rebuilt from its statistics
    and parameters (as grouped.resume for the channel norms)."""
    L = math.prod(shape)
    x2 = np.ascontiguousarray(x).reshape(-1, L)
    return LayerSaved(x2, x.shape, x.dtype, mean, rstd, _row_weight(weight, has_bias, L, x.dtype))


def layer_norm_backward(dy, saved):
    """(dx, dweight, dbias) with dweight, dbias float64 of length L."""
    if saved.x2 is None:
        return np.zeros(saved.shape, dy.dtype), None, None
    x2 = saved.x2
    dy2 = np.ascontiguousarray(dy, dtype=x2.dtype).reshape(x2.shape)
    dx2, grads = rows_backward(x2, dy2, saved.mean, saved.rstd, saved.weight, get_num_threads())
    return dx2.reshape(saved.shape), grads[0], grads[1]


_LAYER_NORM_DOC = """Layer Normalization over the trailing dims of the input, as ``torch.nn.LayerNorm``.

    Every row, the values of the last ``len(normalized_shape)`` dims of one index of the
    leading dims, is normalized with its own mean and biased variance, then scaled and shifted
    element-wise by ``weight`` and ``bias``, arrays of shape ``normalized_shape``::

        y[i] = (x[i] - mean[i]) / sqrt(var[i] + eps) * weight + bias

    where ``x[i]`` has shape ``normalized_shape``. The statistics are the input's in training
    and in eval alike: there are no running statistics and no buffers. A constant row
    normalizes to exactly ``bias``.

    Parameters
    ----------
    normalized_shape : int or sequence of ints
        The shape of the trailing dims to normalize over: an int d for the last dim (of size
        d), or a tuple, list, torch.Size or 1-D integer array for several (a set, dict or
        str raises TypeError: its order is not that of dims).
{eps}
    elementwise_affine : bool, default True
        Give the layer learnable ``weight`` (ones) and ``bias`` (zeros) of shape
        ``normalized_shape``.
    bias : bool, default True
        With ``elementwise_affine=True``, False gives a ``weight`` but no ``bias``
        (``bias`` is None). No effect without ``elementwise_affine``.
{device_dtype}

    Attributes
    ----------
    normalized_shape : tuple of ints
        The trailing shape, as a tuple.
    weight, bias : ndarray of shape normalized_shape, or None
        The learnable parameters: None without ``elementwise_affine`` (``bias`` also with
        ``bias=False``).
{training_grads}

    Shape
    -----
    - Input: (*, *normalized_shape), any leading dims (none included)
    - Output: the input's shape (and dtype)

    Raises
    ------
    ValueError
        At construction, an empty or negative ``normalized_shape``. At forward: input whose
        trailing dims are not ``normalized_shape`` ("Given normalized_shape=[...], expected
        input with shape [*, ...]").
{type_error}

{layer_notes}

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> m = nc.LayerNorm(8)                # over the last dim; weight and bias (8,)
    >>> y = m(x)
    >>> y.shape, y.dtype, m.weight.dtype   # the output has the input's dtype
    ((2, 5, 8), dtype('float64'), dtype('float32'))
    >>> bool(np.allclose(y.mean(axis=-1), 0.0) and np.allclose(y.var(axis=-1), 1.0, atol=1e-3))
    True
    >>> dx = m.backward(np.ones_like(y))   # dx for the last forward; fills m.grads
    >>> sorted(m.grads), m.grads["weight"].shape
    (['bias', 'weight'], (8,))
    >>> m2 = nc.LayerNorm((5, 8), elementwise_affine=False)   # over the last two dims
    >>> m2(x).shape, m2.weight is None, m2.state_dict()
    ((2, 5, 8), True, {{}})
    """


@register_norm("layer_norm")
class LayerNorm(Module):
    __doc__ = docstrings.fill(_LAYER_NORM_DOC)

    _parameter_names = ("weight", "bias")

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = normalize_shape(normalized_shape)
        self.eps = check_eps(eps)
        self.elementwise_affine = check_bool(elementwise_affine, "elementwise_affine")
        has_bias = check_bool(bias, "bias")
        check_device_arg(device)
        self.dtype = check_dtype_arg(dtype)
        shape = self.normalized_shape
        self.weight = np.ones(shape, self.dtype) if self.elementwise_affine else None
        self.bias = np.zeros(shape, self.dtype) if self.elementwise_affine and has_bias else None
        self._saved = None

    def reset_parameters(self):
        """Set ``weight`` back to ones and ``bias`` to zeros."""
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None})")

    def forward(self, x):
        """y for x of shape (*, *normalized_shape), each row normalized (see the class docstring)."""
        x = as_float_array(x)
        check_layer_input(x, self.normalized_shape, self.weight, self.bias)
        y, saved = layer_norm_forward(x, self.normalized_shape, self.weight, self.bias, self.eps)
        self._saved = saved
        return y

    def backward(self, dy):
        """dx for the last forward; sets grads['weight'] (and grads['bias']) when affine."""
        saved = self._require_forward()
        dy = check_grad_output(dy, saved.shape, saved.dtype)
        dx, dweight, dbias = layer_norm_backward(dy, saved)
        self.grads = {}
        shape = self.normalized_shape
        for name, grad in (("weight", dweight), ("bias", dbias)):
            if getattr(self, name) is not None:
                self.grads[name] = (np.zeros(shape, self.dtype) if grad is None
                                    else grad.reshape(shape).astype(self.dtype))
        return dx
