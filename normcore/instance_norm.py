"""InstanceNorm1d / 2d / 3d: statistics per (sample, channel) over the spatial dims."""
import math

import numpy as np

from normcore import docstrings, grouped
from normcore.channel_norm import ChannelNorm, ForwardRecord, updated_running
from normcore.module import write_arrays
from normcore.registry import register_norm
from normcore.threads import get_num_threads
from normcore.validation import as_float_array, warn_user

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "instance_norm_forward"]


def check_spatial_size(x):
    """PyTorch's rule: instance statistics need more than one spatial element."""
    if x.ndim >= 2 and math.prod(x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {x.shape}")


def instance_norm_forward(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    """Normalise x (N, C, *) per (n, c); changes nothing.

    use_input_stats: per-instance statistics of x (True) or the per-channel running ones.
    Returns (y, record, new (running_mean, running_var) or None). As PyTorch, the new running
    statistics are (1 - m) * running + m * (the mean over N of the instance statistics, with
    the unbiased variance).
    """
    N, C = x.shape[:2]
    L = math.prod(x.shape[2:])
    if x.size == 0:
        return np.empty_like(x), ForwardRecord(None, x.shape, x.dtype, C), None
    n_threads = get_num_threads()
    if not use_input_stats:
        g = grouped.channel_grouping(N, C, L)
        y, saved, _ = grouped.forward(x, g, weight, bias, eps, n_threads, stats=(running_mean, running_var))
        return y, ForwardRecord(saved, x.shape, x.dtype, C), None
    g = grouped.instance_grouping(N, C, L)
    y, saved, stats = grouped.forward(x, g, weight, bias, eps, n_threads)
    if eps == 0.0:
        _constant_instances_to_bias(y, saved, stats, bias)
    new = None
    if running_mean is not None:
        mean = stats[0].reshape(N, C).mean(axis=0)
        var = (stats[1] / (L - 1)).reshape(N, C).mean(axis=0)
        new = (updated_running(running_mean, mean, momentum), updated_running(running_var, var, momentum))
    return y, ForwardRecord(saved, x.shape, x.dtype, C), new


def _constant_instances_to_bias(y, saved, stats, bias):
    """eps = 0: an instance of variance 0 gets rstd = 0, so y = bias and zero gradients, as PyTorch
    (its instance norm runs batch norm's training kernel, whose 1 / sqrt(var + eps) is 0 where
    var + eps is 0) rather than 0 * inf = NaN. Writes y and the saved rstd in place."""
    constant = stats[1] == 0.0
    if not constant.any():
        return
    saved.rstd[constant] = 0.0
    N, C = y.shape[:2]
    n, c = np.nonzero(constant.reshape(N, C))
    y[n, c] = 0.0 if bias is None else np.asarray(bias, y.dtype)[c].reshape((-1,) + (1,) * (y.ndim - 2))


class _InstanceNorm(ChannelNorm):
    """InstanceNorm over (N, C, *) or unbatched (C, *) input."""

    _no_batch_dim = 0

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, x):
        """y for x of shape (N, C, *) or (C, *); with track_running_stats, training updates
        the running stats and eval uses them."""
        x = as_float_array(x)
        nb = self._no_batch_dim
        if x.ndim not in (nb, nb + 1):
            raise ValueError(f"expected {nb}D or {nb + 1}D input (got {x.ndim}D input)")
        feature_dim = x.ndim - nb
        C = x.shape[feature_dim]
        if C != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features "
                    f"({self.num_features}), but got: {C}.")
            if self.track_running_stats:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features "
                    f"({self.num_features}) of the running statistics, but got: {C}.")
            warn_user(
                f"input's size at dim={feature_dim} does not match num_features. You can silence this "
                "warning by not passing in num_features, which is not used because affine=False")
        xb = x[np.newaxis] if x.ndim == nb else x
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats:
            check_spatial_size(xb)
        # PyTorch passes momentum None on as 0.0, and never counts batches for InstanceNorm.
        momentum = 0.0 if self.momentum is None else self.momentum
        y, record, new = instance_norm_forward(
            xb, self.running_mean, self.running_var, self.weight, self.bias, use_input_stats, momentum, self.eps)
        if new is not None:
            write_arrays([("running_mean", self.running_mean, new[0]), ("running_var", self.running_var, new[1])])
        record.out_shape = x.shape
        self._saved = record
        return y.reshape(x.shape)


# The docstrings of InstanceNorm1d / 2d / 3d: one template.
_INSTANCE_NORM_DOC = """Instance Normalization over {dims} input, as ``torch.nn.{name}``.

    Every instance, the {inner} values of one channel of one sample, is normalized with its
    own mean and biased variance, then scaled and shifted by the per-channel ``weight`` and
    ``bias`` when ``affine``::

        y[n, c] = (x[n, c] - mean[n, c]) / sqrt(var[n, c] + eps) * weight[c] + bias[c]

    Unbatched input {unbatched} is normalized as a batch of one. With
    ``track_running_stats`` the layer keeps per-channel running statistics, which eval uses
    instead (see Notes). The defaults differ from BatchNorm's: no affine parameters and no
    running statistics.

    Parameters
    ----------
    num_features : int
        C, the number of channels of an input {shape} or {unbatched}.
{eps}
    momentum : float or None, default 0.1
        With ``track_running_stats``, the weight of the batch in the running statistics:
        ``running = (1 - momentum) * running + momentum * batch``. None is taken as 0, as
        torch does: the running statistics then keep their initial values.
    affine : bool, default False
        Give the layer learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default False
        Keep the buffers ``running_mean`` and ``running_var``, updated in training and used in
        eval (and ``num_batches_tracked``, for torch's state-dict keys: InstanceNorm never
        counts).
{channel_options}

    Attributes
    ----------
{affine_attributes}
    running_mean, running_var : ndarray of shape (C,), or None
        The running estimates (zeros and ones at construction); None without
        ``track_running_stats``.
    num_batches_tracked : ndarray of shape () and dtype int64, or None
        Always 0; None without ``track_running_stats``.
{training_grads}

    Shape
    -----
    - Input: {shape} or {unbatched}
    - Output: the input's shape (and dtype)

    Raises
    ------
    ValueError
        At forward: input that is neither {dims} nor {unbatched_dims}; a channel count other
        than ``num_features`` when ``affine`` or ``track_running_stats`` (otherwise a
        UserWarning, as torch); with instance statistics, a single value per instance
        ("Expected more than 1 spatial element when training").
{type_error}

    Notes
    -----
    The modes, as torch's:

    - training, and any mode with ``track_running_stats=False``: instance statistics. In
      training with ``track_running_stats``, the running statistics are updated with the
      mean over the batch of the instance means and of the instances' unbiased variances.
    - eval with ``track_running_stats=True``: the per-channel running statistics normalize
      every instance; nothing is updated.

    With ``eps=0``, an instance of variance 0 gives ``bias`` (0 without ``affine``) and zero
    gradients, as torch (its 1 / sqrt(var + eps) is 0 there), not NaN. A constant instance
    normalizes to exactly ``bias`` for any ``eps``.

{layer_rules}

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal({example_shape}).astype(np.float32)
    >>> m = nc.{name}(3)                 # no parameters, no running statistics
    >>> y = m(x)
    >>> y.shape, y.dtype
    ({example_shape}, dtype('float32'))
    >>> bool(np.allclose(y.mean(axis={axes}), 0.0, atol=1e-5))  # per (sample, channel)
    True
    >>> m(x[0]).shape                            # unbatched
    {unbatched_example}
    >>> m = nc.{name}(3, affine=True, track_running_stats=True)
    >>> dx = m.backward(np.ones_like(m(x)))      # dx for the last forward; fills m.grads
    >>> sorted(m.grads), sorted(m.state_dict())
    (['bias', 'weight'], ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'])
    >>> y_eval = m.eval()(x)                     # eval: the running statistics
    """


@register_norm("instance_norm1d")
class InstanceNorm1d(_InstanceNorm):
    __doc__ = docstrings.fill(
        _INSTANCE_NORM_DOC, name="InstanceNorm1d", dims="3D", unbatched_dims="2D", shape="(N, C, L)",
        unbatched="(C, L)", inner="L", example_shape="(4, 3, 5)", axes="2", unbatched_example="(3, 5)")

    _no_batch_dim = 2


@register_norm("instance_norm2d")
class InstanceNorm2d(_InstanceNorm):
    __doc__ = docstrings.fill(
        _INSTANCE_NORM_DOC, name="InstanceNorm2d", dims="4D", unbatched_dims="3D", shape="(N, C, H, W)",
        unbatched="(C, H, W)", inner="H * W", example_shape="(4, 3, 5, 5)", axes="(2, 3)",
        unbatched_example="(3, 5, 5)")

    _no_batch_dim = 3


@register_norm("instance_norm3d")
class InstanceNorm3d(_InstanceNorm):
    __doc__ = docstrings.fill(
        _INSTANCE_NORM_DOC, name="InstanceNorm3d", dims="5D", unbatched_dims="4D", shape="(N, C, D, H, W)",
        unbatched="(C, D, H, W)", inner="D * H * W", example_shape="(2, 3, 2, 3, 3)", axes="(2, 3, 4)",
        unbatched_example="(3, 2, 3, 3)")

    _no_batch_dim = 4
