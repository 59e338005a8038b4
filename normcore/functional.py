"""The layers as functions, with the signatures of ``torch.nn.functional`` (forward only).

``batch_norm`` and ``instance_norm`` update the running statistics they are given in place
when they use batch statistics, as PyTorch does.
"""
import numpy as np

from normcore import docstrings
from normcore.batch_norm import batch_norm_forward, check_training_eps, check_values_per_channel
from normcore.group_norm import check_group_input, group_norm_forward
from normcore.instance_norm import check_spatial_size, instance_norm_forward
from normcore.layer_norm import check_layer_input, layer_norm_forward, normalize_shape
from normcore.local_response_norm import check_lrn_args, check_lrn_input, local_response_norm_forward
from normcore.module import write_arrays
from normcore.validation import (
    as_float_array,
    check_eps,
    check_functional_bool,
    check_functional_float,
    check_positive_int,
    check_vector,
)

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "local_response_norm"]


def _running_buffers(running_mean, running_var, C, needed_for):
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both be None)")
    if running_mean is None:
        if needed_for:
            raise ValueError(f"running_mean and running_var must be given when {needed_for}")
        return None, None
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array (it is updated in place), got {type(buf).__name__}")
    return check_vector(running_mean, C, "running_mean"), check_vector(running_var, C, "running_var")


def _channel_input(input, min_ndim):
    x = as_float_array(input)
    if x.ndim < min_ndim:
        raise ValueError(f"expected an input of at least {min_ndim} dimensions (N, C, ...), got {x.ndim}D input")
    return x


def _commit(running_mean, running_var, new):
    if new is not None:
        write_arrays([("running_mean", running_mean, new[0]), ("running_var", running_var, new[1])])


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-05):
    """Batch normalization of `input` (N, C, *), as ``torch.nn.functional.batch_norm``.

    Each channel is normalized with the batch's mean and biased variance (``training=True``)
    or with `running_mean` and `running_var` (``training=False``), then scaled by `weight`
    and shifted by `bias`; see ``nc.BatchNorm2d``. Forward only.

    Parameters
    ----------
    input : array_like
        (N, C, *), float32 or float64.
    running_mean, running_var : ndarray of shape (C,), or None
        The running statistics (float32 or float64). With ``training=True`` they are updated
        in place, ``running = (1 - momentum) * running + momentum * batch`` (the unbiased
        batch variance for `running_var`), when given; with ``training=False`` they are
        required and used. Both or neither.
    weight, bias : array_like of shape (C,), or None, default None
        The per-channel scale and shift (None: 1 and 0).
    training : bool, default False
        Use (and update) the batch statistics rather than the running ones.
    momentum : float, default 0.1
        The weight of the batch in the running statistics.
{eps}

{returns}

    Raises
    ------
    ValueError
        Input of fewer than 2 dims; parameters or statistics of a length other than C;
        ``training=False`` without running statistics, or read-only ones with
        ``training=True``; when training, a single value per channel or ``eps == 0``.
    TypeError
        Input or parameters of another dtype than float32 or float64; running statistics
        that are not NumPy arrays; `training` not a bool or `momentum` not a real number
        (None included), with torch's words.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])            # (N=2, C=2)
    >>> mean, var = np.zeros(2), np.ones(2)
    >>> nc.functional.batch_norm(x, mean, var, training=True).round(4).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    >>> mean.round(6).tolist(), var.round(6).tolist()     # updated in place
    ([0.2, 0.4], [1.1, 1.7])
    >>> nc.functional.batch_norm(x, mean, var).shape      # eval: the running statistics
    (2, 2)
    """
    y, _, new = batch_norm_step(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _commit(running_mean, running_var, new)
    return y


def batch_norm_step(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-05):
    """``batch_norm``'s checks and computation, changing nothing: (y, ForwardRecord, new running
    (mean, var) in float64 or None). For callers that commit the state themselves (normcore.torch)."""
    x = _channel_input(input, 2)
    C = x.shape[1]
    training = check_functional_bool(training, "batch_norm", "training")
    momentum = check_functional_float(momentum, "batch_norm", "momentum")
    rm, rv = _running_buffers(running_mean, running_var, C, None if training else "training=False")
    weight = check_vector(weight, C, "weight")
    bias = check_vector(bias, C, "bias")
    eps = check_eps(eps)
    if training:
        check_values_per_channel(x)
        check_training_eps(eps)
    return batch_norm_forward(x, rm, rv, weight, bias, training, momentum, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-05):
    """Instance normalization of `input` (N, C, *), as ``torch.nn.functional.instance_norm``.

    Each (sample, channel) instance is normalized with its own mean and biased variance
    (``use_input_stats=True``) or with the per-channel `running_mean` and `running_var`,
    then scaled by `weight` and shifted by `bias`; see ``nc.InstanceNorm2d``. Forward only.

    Parameters
    ----------
    input : array_like
        (N, C, *) with at least one dim after C, float32 or float64.
    running_mean, running_var : ndarray of shape (C,), or None, default None
        Running statistics. With ``use_input_stats=True`` they are updated in place with
        the mean over N of the instances' means and unbiased variances, when given; with
        ``use_input_stats=False`` they are required and used. Both or neither.
    weight, bias : array_like of shape (C,), or None, default None
        The per-channel scale and shift (None: 1 and 0).
    use_input_stats : bool, default True
        Normalize with each instance's statistics rather than the running ones.
    momentum : float, default 0.1
        The weight of this batch in the running statistics.
{eps}

{returns}

    Raises
    ------
    ValueError
        Input of fewer than 3 dims; parameters or statistics of a length other than C;
        ``use_input_stats=False`` without running statistics; with instance statistics, a
        single value per instance.
    TypeError
        Input or parameters of another dtype than float32 or float64; running statistics
        that are not NumPy arrays; `use_input_stats` not a bool or `momentum` not a real
        number (None included), with torch's words.

    Examples
    --------
    >>> x = np.array([[[1.0, 3.0], [0.0, 4.0]]])           # (N=1, C=2, L=2)
    >>> nc.functional.instance_norm(x).round(4).tolist()
    [[[-1.0, 1.0], [-1.0, 1.0]]]
    """
    y, _, new = instance_norm_step(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    _commit(running_mean, running_var, new)
    return y


def instance_norm_step(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                       momentum=0.1, eps=1e-05):
    """``instance_norm``'s checks and computation, changing nothing: (y, ForwardRecord, new
    running (mean, var) in float64 or None)."""
    x = _channel_input(input, 3)
    C = x.shape[1]
    use_input_stats = check_functional_bool(use_input_stats, "instance_norm", "use_input_stats")
    momentum = check_functional_float(momentum, "instance_norm", "momentum")
    rm, rv = _running_buffers(running_mean, running_var, C, None if use_input_stats else "use_input_stats=False")
    weight = check_vector(weight, C, "weight")
    bias = check_vector(bias, C, "bias")
    eps = check_eps(eps)
    if use_input_stats:
        check_spatial_size(x)
    return instance_norm_forward(x, rm, rv, weight, bias, use_input_stats, momentum, eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05):
    """Layer normalization over the trailing dims, as ``torch.nn.functional.layer_norm``.

    Each row, the trailing ``normalized_shape`` values of one index of the leading dims, is
    normalized with its own mean and biased variance, then scaled and shifted element-wise by
    `weight` and `bias`; see ``nc.LayerNorm``. Forward only.

    Parameters
    ----------
    input : array_like
        (*, *normalized_shape), float32 or float64.
    normalized_shape : int or sequence of ints
        The trailing shape to normalize over: an int, or a tuple, list, torch.Size or 1-D
        integer array.
    weight, bias : array_like of shape normalized_shape, or None, default None
        The element-wise scale and shift (None: 1 and 0).
{eps}

{returns}

    Raises
    ------
    ValueError
        The input's trailing dims are not `normalized_shape`, or `weight` / `bias` are not
        of that shape; an empty or negative `normalized_shape`.
    TypeError
        Input or parameters of another dtype than float32 or float64.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    >>> nc.functional.layer_norm(x, 3).round(4).tolist()
    [[-1.2247, 0.0, 1.2247], [0.0, 0.0, 0.0]]
    >>> nc.functional.layer_norm(x, (2, 3), bias=np.full((2, 3), 0.5)).shape
    (2, 3)
    """
    return layer_norm_step(input, normalized_shape, weight, bias, eps)[0]


def layer_norm_step(input, normalized_shape, weight=None, bias=None, eps=1e-05):
    """``layer_norm``'s checks and computation: (y, LayerSaved)."""
    x = as_float_array(input)
    shape = normalize_shape(normalized_shape)
    weight = None if weight is None else as_float_array(weight, "weight")
    bias = None if bias is None else as_float_array(bias, "bias")
    check_layer_input(x, shape, weight, bias)
    return layer_norm_forward(x, shape, weight, bias, check_eps(eps))


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-05):
    """Group normalization of `input` (N, C, *), as ``torch.nn.functional.group_norm``.

    The channels are split into `num_groups` groups of consecutive channels; every group of
    every sample is normalized with its own mean and biased variance, then each channel is
    scaled by `weight` and shifted by `bias`; see ``nc.GroupNorm``. Forward only.

    Parameters
    ----------
    input : array_like
        (N, C, *), float32 or float64, C divisible by `num_groups`.
    num_groups : int
        The number of groups.
    weight, bias : array_like of shape (C,), or None, default None
        The per-channel scale and shift (None: 1 and 0).
{eps}

{returns}

    Raises
    ------
    ValueError
        Input of fewer than 2 dims, C not divisible by `num_groups`, or parameters of a
        length other than C; a batch of one sample whose groups hold one value each.
    TypeError
        Input or parameters of another dtype than float32 or float64; `num_groups` not an int.

    Examples
    --------
    >>> x = np.array([[[1.0], [3.0], [5.0], [5.0]]])        # (N=1, C=4, L=1)
    >>> nc.functional.group_norm(x, 2).ravel().round(4).tolist()
    [-1.0, 1.0, 0.0, 0.0]
    """
    return group_norm_step(input, num_groups, weight, bias, eps)[0]


def group_norm_step(input, num_groups, weight=None, bias=None, eps=1e-05):
    """``group_norm``'s checks and computation: (y, ForwardRecord)."""
    x = as_float_array(input)
    num_groups = check_positive_int(num_groups, "num_groups")
    weight = None if weight is None else as_float_array(weight, "weight")
    bias = None if bias is None else as_float_array(bias, "bias")
    check_group_input(x, num_groups, weight)
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias should contain {x.shape[1]} elements (one per channel), got shape {bias.shape}")
    return group_norm_forward(x, num_groups, weight, bias, check_eps(eps))


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """Local response normalization across channels, as torch's ``local_response_norm``.

    ``y[n, c] = x[n, c] * (k + alpha / size * (sum of x[n, c'] ** 2 over the window of size
    channels around c)) ** -beta``; see ``nc.LocalResponseNorm``. Forward only.

    Parameters
    ----------
    input : array_like
        (N, C, *) with at least one dim after C, float32 or float64.
    size : int
        The number of channels in the window (>= 1).
    alpha : float, default 1e-4
        The multiplicative factor (finite).
    beta : float, default 0.75
        The exponent (finite).
    k : float, default 1.0
        The additive constant (finite).

{returns}

    Raises
    ------
    ValueError
        Input of fewer than 3 dims, ``size < 1``, or an infinite or NaN `alpha`, `beta`
        or `k`.
    TypeError
        Input of another dtype than float32 or float64, or arguments of the wrong type.

    Examples
    --------
    >>> x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    >>> y = nc.functional.local_response_norm(x, 2, alpha=1.0, beta=1.0)
    >>> y.ravel().round(4).tolist()
    [0.6667, 0.5714, 0.4]
    """
    return local_response_norm_step(input, size, alpha, beta, k)[0]


def local_response_norm_step(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """``local_response_norm``'s checks and computation: (y, LRNSaved)."""
    x = as_float_array(input)
    size, alpha, beta, k = check_lrn_args(size, alpha, beta, k)
    check_lrn_input(x)
    return local_response_norm_forward(x, size, alpha, beta, k)


# The docstrings above share their blocks with the layers' (normcore.docstrings).
for _function in (batch_norm, instance_norm, layer_norm, group_norm, local_response_norm):
    _function.__doc__ = docstrings.fill(_function.__doc__, returns="""\
    Returns
    -------
    ndarray
        y, of the input's shape and dtype.""")
del _function
