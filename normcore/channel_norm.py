"""What BatchNorm and InstanceNorm share: per-channel parameters and running statistics."""
import math

import numpy as np

from normcore import grouped
from normcore.module import Module
from normcore.threads import get_num_threads
from normcore.validation import (
    check_bool,
    check_device_arg,
    check_dtype_arg,
    check_eps,
    check_grad_output,
    check_momentum,
    check_positive_int,
)


class ChannelNorm(Module):
    """Base of BatchNorm and InstanceNorm (as PyTorch's ``_NormBase``).

    Parameters ``weight`` (ones) and ``bias`` (zeros) when ``affine``; buffers
    ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked`` (0-d int64)
    when ``track_running_stats``; otherwise those attributes are None.
    """

    _parameter_names = ("weight", "bias")
    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        has_bias = check_bool(bias, "bias")
        check_device_arg(device)
        self.dtype = check_dtype_arg(dtype)
        C = self.num_features
        self.weight = np.ones(C, self.dtype) if self.affine else None
        self.bias = np.zeros(C, self.dtype) if self.affine and has_bias else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.ones(C, self.dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None

    def reset_running_stats(self):
        """Set the running statistics back to their initial values: ``running_mean`` zeros,
        ``running_var`` ones, ``num_batches_tracked`` 0 (nothing without them)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        """Reset the running statistics, and ``weight`` to ones and ``bias`` to zeros."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")

    # -- shared step -------------------------------------------------------------------------
    def backward(self, dy):
        """dx for the last forward; sets grads['weight'] and grads['bias'] when affine."""
        saved = self._require_forward()
        dy = check_grad_output(dy, saved.out_shape, saved.dtype)
        dx, dweight, dbias = backward_saved(dy, saved)
        self._store_grads({"weight": dweight, "bias": dbias})
        return dx


class ForwardRecord:
    """A forward's saved statistics plus what backward checks dy against."""

    __slots__ = ("inner", "out_shape", "dtype", "C")

    def __init__(self, inner, out_shape, dtype, C):
        self.inner = inner          # grouped.Saved, or None for an empty input
        self.out_shape = out_shape  # the shape dy must have
        self.dtype = dtype          # the dtype dx has
        self.C = C


def backward_saved(dy, record):
    """(dx, dweight, dbias) for a ForwardRecord; an empty input gives zero gradients."""
    if record.inner is None:
        return np.zeros(record.out_shape, record.dtype), np.zeros(record.C), np.zeros(record.C)
    dy_b = dy.reshape(record.inner.shape)
    dx, dweight, dbias = grouped.backward(dy_b, record.inner, get_num_threads())
    return dx.reshape(record.out_shape), dweight, dbias


def backward_from_stats(dy, x, weight, mean, rstd, groups, batch_stats):
    """(dx, dweight, dbias) of a forward of x (N, C, *) known by its statistics rather than its
    ForwardRecord: what normcore.torch saves for autograd.

    groups: 0 for statistics per channel over the batch (BatchNorm, and InstanceNorm with the
    running statistics), G for G groups of C/G channels per sample (GroupNorm; InstanceNorm's
    own statistics are G = C). mean, rstd: the forward's saved statistics (float64, one per
    group); weight: the parameter the forward used (None: ones); batch_stats: whether the
    statistics were x's own. Bitwise the backward of the layer that ran that forward.
    """
    N, C = x.shape[:2]
    if x.size == 0:
        return backward_saved(dy, ForwardRecord(None, x.shape, x.dtype, C))
    L = math.prod(x.shape[2:])
    g = grouped.channel_grouping(N, C, L) if groups == 0 else grouped.group_grouping(N, C, L, groups)
    record = ForwardRecord(grouped.resume(x, g, mean, rstd, weight, batch_stats), x.shape, x.dtype, C)
    return backward_saved(dy, record)


def updated_running(running, batch, factor):
    """(1 - factor) * running + factor * batch in float64 (not yet written anywhere)."""
    return (1.0 - factor) * running.astype(np.float64) + factor * batch
