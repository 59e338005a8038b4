"""BatchNorm1d / 2d / 3d: statistics per channel over (N, *spatial)."""
import math

import numpy as np

from normcore import docstrings, grouped
from normcore._kernels.engine import commit_running, running_values
from normcore.channel_norm import ChannelNorm, ForwardRecord
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
        new = running_values(running_mean, running_var, stats[0], stats[1], factor, N * L)
    return y, ForwardRecord(saved, x.shape, x.dtype, C), new


def commit_training_step(layer, count, new):
    """Write a training step's num_batches_tracked (count) and, unless `new` is None, its
    running statistics (float64 (2, C): mean, var) into `layer`, all or none as write_arrays
    does: every buffer is checked writeable and the statistics are cast to the buffers' dtype
    (which may warn, an error under warnings-as-errors) before the first write. The usual
    buffers (writeable float32 / float64 (C,) of one dtype, no overflow) are written in one
    compiled call (commit_running), since every training call does it; write_arrays for the
    rest, which also raises the errors and warnings."""
    nbt, rm, rv = layer.num_batches_tracked, layer.running_mean, layer.running_var
    if new is not None and commit_running(nbt, count, rm, rv, new):
        return
    updates = [("num_batches_tracked", nbt, count)]
    if new is not None:
        updates += [("running_mean", rm, new[0]), ("running_var", rv, new[1])]
    write_arrays(updates)


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
            commit_training_step(self, count, new)
        self._saved = record
        return y


# The docstrings of BatchNorm1d / 2d / 3d: one template (arguments and attributes also serve
# SyncBatchNorm's).
_BATCH_NORM_PARAMETERS = docstrings.fill("""\
    num_features : int
        C, the number of channels (dim 1 of the input).
{eps}
    momentum : float or None, default 0.1
        The weight of the batch statistics in the running ones, updated in training as
        ``running = (1 - momentum) * running + momentum * batch``. None gives a cumulative
        moving average (the plain mean of every batch so far): the weight is then
        ``1 / num_batches_tracked``, this batch counted.
    affine : bool, default True
        Give the layer learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep the buffers ``running_mean``, ``running_var`` and ``num_batches_tracked``,
        updated in training and used in eval. False: no buffers (they are None), and batch
        statistics in eval too.""")

_BATCH_NORM_ATTRIBUTES = docstrings.fill("""\
{affine_attributes}
    running_mean, running_var : ndarray of shape (C,), or None
        The running estimates of the mean and of the unbiased variance (zeros and ones at
        construction); None without ``track_running_stats``.
    num_batches_tracked : ndarray of shape () and dtype int64, or None
        The number of training forwards so far; None without ``track_running_stats``.
{training_grads}""")

_BATCH_NORM_BLOCKS = {"parameters": _BATCH_NORM_PARAMETERS, "attributes": _BATCH_NORM_ATTRIBUTES}

_BATCH_NORM_DOC = """Batch Normalization over {dims} input, as ``torch.nn.{name}``.

    Every channel c is normalized with the mean and variance of its values over {over},
    then scaled and shifted by the learnable per-channel ``weight`` (gamma) and ``bias``
    (beta)::

        y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]

    where ``var`` is the biased variance (divided by the N * L values of the channel). In
    training these are the batch's statistics; with ``track_running_stats`` the layer also
    keeps running estimates of them, which eval uses instead (see Notes).

    Parameters
    ----------
{parameters}
{channel_options}

    Attributes
    ----------
{attributes}

    Shape
    -----
    - Input: {shape}, with C = num_features
    - Output: {shape}, the input's shape (and dtype)

    Raises
    ------
    ValueError
        At forward: input that is not {dims}; a channel count other than ``num_features``
        (checked when ``affine`` or ``track_running_stats``); with batch statistics, a single
        value per channel ("Expected more than 1 value per channel when training") or
        ``eps == 0`` ("batch_norm eps must be positive during training").
{type_error}

    Notes
    -----
    The modes, as torch's:

    - training with ``track_running_stats=True``: batch statistics; the running ones are
      updated (``running_var`` with the unbiased batch variance) and ``num_batches_tracked``
      grows by one.
    - eval with ``track_running_stats=True``: the running statistics; nothing is updated.
    - ``track_running_stats=False``: batch statistics, in training and in eval.

    Batch statistics need more than one value per channel and ``eps > 0``; these checks come
    before any state is written (torch counts the batch before refusing it). A constant
    channel normalizes to exactly ``bias``.

{layer_rules}

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal({example_shape}).astype(np.float32)
    >>> m = nc.{name}(3)             # training mode, tracking running statistics
    >>> y = m(x)                          # batch statistics; the running ones are updated
    >>> y.shape, y.dtype
    ({example_shape}, dtype('float32'))
    >>> bool(np.allclose(y.mean(axis={axes}), 0.0, atol=1e-5))
    True
    >>> int(m.num_batches_tracked), m.running_mean.shape
    (1, (3,))
    >>> dx = m.backward(np.ones_like(y))  # dx for the last forward; fills m.grads
    >>> dx.shape, sorted(m.grads)
    ({example_shape}, ['bias', 'weight'])
    >>> y_eval = m.eval()(x)              # eval: the running statistics, nothing updated
    >>> int(m.num_batches_tracked)
    1
    >>> sorted(m.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    >>> nc.{name}(3, track_running_stats=False).running_mean is None
    True
    """


@register_norm("batch_norm1d")
class BatchNorm1d(_BatchNorm):
    __doc__ = docstrings.fill(
        _BATCH_NORM_DOC, name="BatchNorm1d", dims="2D or 3D", shape="(N, C) or (N, C, L)", over="N and L",
        example_shape="(4, 3, 5)", axes="(0, 2)", **_BATCH_NORM_BLOCKS)

    _dims = (2, 3)


@register_norm("batch_norm2d")
class BatchNorm2d(_BatchNorm):
    __doc__ = docstrings.fill(
        _BATCH_NORM_DOC, name="BatchNorm2d", dims="4D", shape="(N, C, H, W)", over="N, H and W",
        example_shape="(4, 3, 5, 5)", axes="(0, 2, 3)", **_BATCH_NORM_BLOCKS)

    _dims = (4,)


@register_norm("batch_norm3d")
class BatchNorm3d(_BatchNorm):
    __doc__ = docstrings.fill(
        _BATCH_NORM_DOC, name="BatchNorm3d", dims="5D", shape="(N, C, D, H, W)", over="N, D, H and W",
        example_shape="(2, 3, 2, 3, 3)", axes="(0, 2, 3, 4)", **_BATCH_NORM_BLOCKS)

    _dims = (5,)
