"""normcore's layers as functions on torch tensors, with the signatures of
``torch.nn.functional``: differentiable (autograd) and traceable by ``torch.compile``.

``batch_norm`` and ``instance_norm`` update the running statistics they are given in place
when they use batch statistics, as torch's do. The checks and their messages are the NumPy
layers' (``normcore.functional``); on top of them the tensors must be CPU tensors, the input
float32 or float64.
"""
import torch

from normcore.layer_norm import normalize_shape
from normcore.torch import _ops

__all__ = ["batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "check_tensors"]

_DTYPES = (torch.float32, torch.float64)


def check_tensors(layer, input, *others):
    """Refuse what the kernels cannot take: `input` not a tensor, any tensor given (None
    allowed) off the CPU, an input dtype other than float32 / float64 or a sparse input
    (TypeError / RuntimeError, naming the layer and what to do)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{layer}: input must be a torch.Tensor, got {type(input).__name__}")
    for t in (input, *others):
        if t is not None and not t.is_cpu:
            raise RuntimeError(
                f"{layer}: normcore's kernels run on the CPU, got a tensor on {t.device}; keep torch.nn's own "
                f"layer for {t.device.type} tensors (normcore.torch.revert(model) gives a model its torch layers back)")
    if input.dtype not in _DTYPES:
        raise TypeError(
            f"{layer}: normcore's kernels take float32 and float64 input, got {input.dtype}; keep torch.nn's own "
            f"layer for {input.dtype} (or run the model in float32)")
    if input.layout != torch.strided:
        raise TypeError(f"{layer}: input must be a dense (strided) tensor, got layout {input.layout}")


def _commit(running_mean, running_var, new_mean, new_var):
    """The op path's new running statistics (empty: none) copied into the buffers."""
    if new_mean.numel():
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch normalization, as ``torch.nn.functional.batch_norm`` (``normcore::batch_norm``)."""
    check_tensors("batch_norm", input, weight, bias, running_mean, running_var)
    x = _ops.dense(input)
    if not torch.compiler.is_compiling():
        return _ops.eager_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    y, _, _, new_mean, new_var = _ops.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    _commit(running_mean, running_var, new_mean, new_var)
    return y


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """Instance normalization, as ``torch.nn.functional.instance_norm`` (``normcore::instance_norm``)."""
    check_tensors("instance_norm", input, weight, bias, running_mean, running_var)
    x = _ops.dense(input)
    if not torch.compiler.is_compiling():
        return _ops.eager_instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps)
    y, _, _, new_mean, new_var = _ops.instance_norm(x, weight, bias, running_mean, running_var, use_input_stats,
                                                    momentum, eps)
    _commit(running_mean, running_var, new_mean, new_var)
    return y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalization, as ``torch.nn.functional.group_norm`` (``normcore::group_norm``)."""
    check_tensors("group_norm", input, weight, bias)
    x = _ops.dense(input)
    if not torch.compiler.is_compiling():
        return _ops.eager_group_norm(x, num_groups, weight, bias, eps)
    return _ops.group_norm(x, num_groups, weight, bias, eps)[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization, as ``torch.nn.functional.layer_norm`` (``normcore::layer_norm``)."""
    check_tensors("layer_norm", input, weight, bias)
    shape = list(normalize_shape(normalized_shape))
    x = input.contiguous()
    if not torch.compiler.is_compiling():
        return _ops.eager_layer_norm(x, shape, weight, bias, eps)
    return _ops.layer_norm(x, shape, weight, bias, eps)[0]


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """Local response normalization, as ``torch.nn.functional.local_response_norm``
    (``normcore::local_response_norm``)."""
    check_tensors("local_response_norm", input)
    x = input.contiguous()
    if not torch.compiler.is_compiling():
        y = _ops.eager_local_response_norm(x, size, alpha, beta, k)
    else:
        y = _ops.local_response_norm(x, size, alpha, beta, k)
    # torch's (composite) local_response_norm keeps a channels-last input's memory format; the
    # kernel runs on (N, C, *) rows, so a channels-last input costs a copy each way.
    fmt = _channels_last_format(input)
    return y if fmt is None else y.contiguous(memory_format=fmt)


def _channels_last_format(x):
    """torch.channels_last(_3d) for a 4-d (5-d) input in that format (and not also contiguous)."""
    if x.is_contiguous():
        return None
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt if fmt is not None and x.is_contiguous(memory_format=fmt) else None
