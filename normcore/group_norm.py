"""GroupNorm: statistics per (sample, group of C/G channels), gamma and beta per channel."""
import math

import numpy as np

from normcore import docstrings, grouped
from normcore.channel_norm import ForwardRecord, backward_saved
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
    check_positive_int,
)

__all__ = ["GroupNorm", "group_norm_forward"]


def check_group_input(x, num_groups, weight):
    """PyTorch's rules for group_norm's input, as ValueError."""
    if x.ndim < 2:
        raise ValueError(f"Expected at least 2 dimensions for input tensor but received {x.ndim}")
    C = x.shape[1]
    if C % num_groups != 0:
        raise ValueError(
            "Expected number of channels in input to be divisible by num_groups, but got input of "
            f"shape {list(x.shape)} and num_groups={num_groups}")
    size = [x.shape[0] * C // num_groups, num_groups, *x.shape[2:]]
    if math.prod(size[:1] + size[2:]) == 1:  # torch's _verify_batch_size on the grouped shape
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if weight is not None and weight.shape != (C,):
        raise ValueError(
            "Expected weight to be a vector of size equal to the number of channels in input, but got "
            f"weight of shape {list(weight.shape)} and input of shape {list(x.shape)}")


def group_norm_forward(x, num_groups, weight, bias, eps):
    """Normalise x (N, C, *) over groups of C/G channels. Returns (y, record)."""
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    if x.size == 0:
        return np.empty_like(x), ForwardRecord(None, x.shape, x.dtype, C)
    g = grouped.group_grouping(N, C, L, num_groups)
    y, saved, _ = grouped.forward(x, g, weight, bias, eps, get_num_threads())
    return y, ForwardRecord(saved, x.shape, x.dtype, C)


_GROUP_NORM_DOC = """Group Normalization over (N, C, *) input, as ``torch.nn.GroupNorm``.

    The C channels are split into ``num_groups`` groups of C / num_groups consecutive channels;
    every group of every sample is normalized with the mean and biased variance of its values
    (its channels and all their positions), then every channel is scaled and shifted by its
    ``weight`` and ``bias`` when ``affine``::

        y[n, c] = (x[n, c] - mean[n, g(c)]) / sqrt(var[n, g(c)] + eps) * weight[c] + bias[c]

    The statistics are the input's in training and in eval alike: there are no running
    statistics and no buffers. ``num_groups=1`` normalizes each sample over all its values
    (as LayerNorm over (C, *) with per-channel parameters); ``num_groups=C`` each channel of
    each sample (as InstanceNorm). A constant group normalizes to exactly ``bias``.

    Parameters
    ----------
    num_groups : int
        The number of groups; it must divide ``num_channels``.
    num_channels : int
        C, the number of channels (dim 1 of the input).
{eps}
    affine : bool, default True
        Give the layer learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
{channel_options}

    Attributes
    ----------
{affine_attributes}
{training_grads}

    Shape
    -----
    - Input: (N, C, *), with C = num_channels and * any number of dims (zero included)
    - Output: (N, C, *), the input's shape (and dtype)

    Raises
    ------
    ValueError
        At construction, ``num_channels`` not divisible by ``num_groups``. At forward: input
        of fewer than 2 dims, or whose channel count is not divisible by ``num_groups``
        ("Expected number of channels in input to be divisible by num_groups") or, with
        ``affine``, differs from ``num_channels``; a batch of one sample whose groups hold
        one value each (torch's "Expected more than 1 value per channel when training").
{type_error}

{layer_notes}

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((2, 6, 4, 4)).astype(np.float32)
    >>> m = nc.GroupNorm(3, 6)             # 3 groups of 2 channels
    >>> y = m(x)
    >>> y.shape, y.dtype
    ((2, 6, 4, 4), dtype('float32'))
    >>> groups = y.reshape(2, 3, -1)       # (N, num_groups, values of a group)
    >>> bool(np.allclose(groups.mean(axis=-1), 0.0, atol=1e-5))
    True
    >>> dx = m.backward(np.ones_like(y))   # dx for the last forward; fills m.grads
    >>> sorted(m.grads), m.grads["weight"].shape
    (['bias', 'weight'], (6,))
    >>> nc.GroupNorm(4, 6)
    Traceback (most recent call last):
        ...
    ValueError: num_channels (6) must be divisible by num_groups (4)
    """


@register_norm("group_norm")
class GroupNorm(Module):
    __doc__ = docstrings.fill(_GROUP_NORM_DOC)

    _parameter_names = ("weight", "bias")

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        self.num_groups = check_positive_int(num_groups, "num_groups")
        self.num_channels = check_positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups != 0:
            raise ValueError(
                f"num_channels ({self.num_channels}) must be divisible by num_groups ({self.num_groups})")
        self.eps = check_eps(eps)
        self.affine = check_bool(affine, "affine")
        has_bias = check_bool(bias, "bias")
        check_device_arg(device)
        self.dtype = check_dtype_arg(dtype)
        self.weight = np.ones(self.num_channels, self.dtype) if self.affine else None
        self.bias = np.zeros(self.num_channels, self.dtype) if self.affine and has_bias else None
        self._saved = None

    def reset_parameters(self):
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def __repr__(self):
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine})"

    def forward(self, x):
        """y for x of shape (N, C, *), normalized per sample and group (see the class docstring)."""
        x = as_float_array(x)
        check_group_input(x, self.num_groups, self.weight)
        y, record = group_norm_forward(x, self.num_groups, self.weight, self.bias, self.eps)
        self._saved = record
        return y

    def backward(self, dy):
        """dx for the last forward; sets grads['weight'] and grads['bias'] when affine."""
        record = self._require_forward()
        dy = check_grad_output(dy, record.out_shape, record.dtype)
        dx, dweight, dbias = backward_saved(dy, record)
        self._store_grads({"weight": dweight, "bias": dbias})
        return dx
