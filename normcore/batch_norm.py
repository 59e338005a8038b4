"""BatchNorm1d / 2d / 3d: statistics per channel over (N, *spatial)."""
import math

import numpy as np

from normcore import grouped
from normcore.channel_norm import ChannelNorm, ForwardRecord, updated_running
from normcore.module import write_arrays
from normcore.registry import register_norm
from normcore.threads import get_num_threads
from normcore.validation import as_float_array

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm_forward"]


def check_values_per_channel(x):
    """PyTorch's rule: batch statistics need more than one value per channel."""
    if x.ndim >= 2 and x.shape[1] and x.size // x.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def check_training_eps(eps):
    """PyTorch's rule: batch statistics in training need eps > 0 (a constant channel would
    divide by zero)."""
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")


def batch_norm_forward(x, running_mean, running_var, weight, bias, batch_stats, factor, eps):
    """Normalise x (N, C, *) per channel; changes nothing.

    batch_stats: use the statistics of x (True) or running_mean / running_var (False).
    Returns (y, record for backward, new (running_mean, running_var) in float64 or None);
    new running statistics come only with batch statistics and given running buffers.
    """
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    if x.size == 0:
        return np.empty_like(x), ForwardRecord(None, x.shape, x.dtype, C), None
    g = grouped.channel_grouping(N, C, L)
    n_threads = get_num_threads()
    if not batch_stats:
        y, saved, _ = grouped.forward(x, g, weight, bias, eps, n_threads, stats=(running_mean, running_var))
        return y, ForwardRecord(saved, x.shape, x.dtype, C), None
    y, saved, stats = grouped.forward(x, g, weight, bias, eps, n_threads)
    new = None
    if running_mean is not None:
        unbiased = stats.m2 / (N * L - 1)
        new = (updated_running(running_mean, stats.mean, factor), updated_running(running_var, unbiased, factor))
    return y, ForwardRecord(saved, x.shape, x.dtype, C), new


class _BatchNorm(ChannelNorm):
    """BatchNorm over (N, C, *): batch statistics in training, running ones in eval (the
    four cases of training x track_running_stats follow PyTorch)."""

    _dims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _check_input_dim(self, x):
        if x.ndim not in self._dims:
            wanted = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"expected {wanted} input (got {x.ndim}D input)")

    def forward(self, x):
        """y for x of shape (N, C, *); in training (and tracking) updates the running stats."""
        x = as_float_array(x)
        self._check_input_dim(x)
        C = x.shape[1]
        if (self.affine or self.track_running_stats) and C != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (num_features) at dim 1, "
                f"got {C} channels in input of shape {x.shape}"
            )
        # PyTorch: batch statistics in training, and in eval when no running stats are kept.
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            check_values_per_channel(x)
            check_training_eps(self.eps)
        counting = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if counting:
            count = int(self.num_batches_tracked) + 1
            if self.momentum is None:
                factor = 1.0 / count
        y, record, new = batch_norm_forward(
            x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, factor, self.eps)
        # Every check has passed and the result exists: commit the state.
        if counting:
            updates = [("num_batches_tracked", self.num_batches_tracked, count)]
            if new is not None:
                updates += [("running_mean", self.running_mean, new[0]), ("running_var", self.running_var, new[1])]
            write_arrays(updates)
        self._saved = record
        return y


@register_norm("batch_norm1d")
class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) input."""

    _dims = (2, 3)


@register_norm("batch_norm2d")
class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W) input."""

    _dims = (4,)


@register_norm("batch_norm3d")
class BatchNorm3d(_BatchNorm):
    """BatchNorm over (N, C, D, H, W) input."""

    _dims = (5,)
