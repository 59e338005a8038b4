"""The layers as functions, with the signatures of ``torch.nn.functional`` (forward only).

``batch_norm`` and ``instance_norm`` update the running statistics they are given in place
when they use batch statistics, as PyTorch does.
"""
import numpy as np

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
    """Batch normalisation of input (N, C, *); see ``nc.BatchNorm2d``."""
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
    y, _, new = batch_norm_forward(x, rm, rv, weight, bias, training, momentum, eps)
    _commit(running_mean, running_var, new)
    return y


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-05):
    """Instance normalisation of input (N, C, *); see ``nc.InstanceNorm2d``."""
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
    y, _, new = instance_norm_forward(x, rm, rv, weight, bias, use_input_stats, momentum, eps)
    _commit(running_mean, running_var, new)
    return y


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05):
    """Layer normalisation over the trailing ``normalized_shape`` dims; see ``nc.LayerNorm``."""
    x = as_float_array(input)
    shape = normalize_shape(normalized_shape)
    weight = None if weight is None else as_float_array(weight, "weight")
    bias = None if bias is None else as_float_array(bias, "bias")
    check_layer_input(x, shape, weight, bias)
    y, _ = layer_norm_forward(x, shape, weight, bias, check_eps(eps))
    return y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-05):
    """Group normalisation of input (N, C, *); see ``nc.GroupNorm``."""
    x = as_float_array(input)
    num_groups = check_positive_int(num_groups, "num_groups")
    weight = None if weight is None else as_float_array(weight, "weight")
    bias = None if bias is None else as_float_array(bias, "bias")
    check_group_input(x, num_groups, weight)
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias should contain {x.shape[1]} elements (one per channel), got shape {bias.shape}")
    y, _ = group_norm_forward(x, num_groups, weight, bias, check_eps(eps))
    return y


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """Local response normalisation across channels of input (N, C, *); see ``nc.LocalResponseNorm``."""
    x = as_float_array(input)
    size, alpha, beta, k = check_lrn_args(size, alpha, beta, k)
    check_lrn_input(x)
    y, _ = local_response_norm_forward(x, size, alpha, beta, k)
    return y
