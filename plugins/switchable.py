"""SwitchableNorm (Luo et al., 2018): a learned mix of InstanceNorm, LayerNorm and BatchNorm
statistics. Built only on normcore's public toolkit (``nc.toolkit``, ``nc.Module``,
``nc.register_norm``), as a third-party plugin would be.

The algorithm is that of the paper's released code, so its checkpoints give the same outputs.
For x (N, C, *) viewed as rows (n, c) of L values:

    mean_in, var_in      per row (var_in unbiased, as the released code)
    mean_ln, var_ln      over the channels of a sample:  mean_c(mean_in),
                         mean_c(var_in + mean_in^2) - mean_ln^2
    mean_bn, var_bn      over the batch for a channel:   mean_n(mean_in),
                         mean_n(var_in + mean_in^2) - mean_bn^2   (training; the running
                         buffers in eval, while IN and LN still come from the input)
    mean = sum_i softmax(mean_weight)_i mean_i,  var = sum_i softmax(var_weight)_i var_i
    y = (x - mean) / sqrt(var + eps) * weight + bias

One toolkit pass gives the per-row moments, which merge into the LN and BN ones; var_ln and
var_bn are evaluated as mean(var_in) + mean((mean_in - mean_group)^2), equal to the released
formula but without its cancellation when |mean| >> std. One toolkit pass applies. Backward:
one pass of per-row gradient sums, the chain rule through every statistic (the BN statistics are
not detached) and the softmax on (N, C) arrays, and one apply pass.

SwitchableNorm1d takes (N, C): LN over C and BN over N, unbiased variances, weights (LN, BN).
"""
import math

import numpy as np

import normcore as nc
from normcore import toolkit

__all__ = ["SwitchableNorm1d", "SwitchableNorm2d", "SwitchableNorm3d"]


def _softmax_rows(logits):
    """The softmax of each row of a 2-D float64 array (both mixing weights in one call: on
    arrays of two or three values the calls cost more than the arithmetic)."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _group_mean(a, axis):
    """a.mean(axis, keepdims=True) with the same bits (the sum, then one division), without
    numpy's Python-level wrapper, which costs more than the sum on (N, C) arrays."""
    return np.add.reduce(a, axis=axis, keepdims=True) / a.shape[axis]


def _softmax_backward(p, grad_p):
    """Gradient w.r.t. the logits of softmax outputs p, given the gradient w.r.t. p."""
    return p * (grad_p - np.dot(p, grad_p))


class _SwitchableNorm(nc.Module):
    _parameter_names = ("weight", "bias", "mean_weight", "var_weight")
    _buffer_names = ("running_mean", "running_var")
    _ndim = 4
    _default_momentum = 0.9

    def __init__(self, num_features, eps=1e-5, momentum=None, using_moving_average=True, using_bn=True,
                 last_gamma=False, population_variance=False, dtype=np.float32):
        super().__init__()
        self.num_features = toolkit.check_positive_int(num_features, "num_features")
        self.eps = toolkit.check_eps(eps)
        momentum = self._default_momentum if momentum is None else momentum
        momentum = toolkit.check_finite_real(momentum, "momentum")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum (the fraction of the running statistics kept) must be in [0, 1], "
                             f"got {momentum!r}")
        self.momentum = momentum
        self.using_moving_average = toolkit.check_bool(using_moving_average, "using_moving_average")
        self.using_bn = toolkit.check_bool(using_bn, "using_bn")
        self.last_gamma = toolkit.check_bool(last_gamma, "last_gamma")
        self.population_variance = toolkit.check_bool(population_variance, "population_variance")
        self.dtype = toolkit.check_dtype_arg(dtype)
        C = self.num_features
        self.weight = (np.zeros if self.last_gamma else np.ones)(C, self.dtype)
        self.bias = np.zeros(C, self.dtype)
        n_sources = len(self._sources())
        self.mean_weight = np.ones(n_sources, self.dtype)
        self.var_weight = np.ones(n_sources, self.dtype)
        if self.using_bn:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.zeros(C, self.dtype)
        else:
            self.running_mean = self.running_var = None
        self._saved = None

    def _sources(self):
        return ("in", "ln", "bn") if self.using_bn else ("in", "ln")

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"using_moving_average={self.using_moving_average}, using_bn={self.using_bn}, "
                f"last_gamma={self.last_gamma})")

    def load_state_dict(self, state_dict, strict=True):
        """Also accepts the released code's shapes: (1, C, 1, 1), (1, C, 1), (1, C) for C values."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        fixed = {}
        for key, value in state_dict.items():
            if hasattr(value, "detach") and hasattr(value, "numpy"):
                value = value.detach().cpu().numpy()
            current = getattr(self, key, None) if key in self._state_names() else None
            arr = value
            if current is not None:
                try:
                    arr = np.asarray(value)
                except (ValueError, TypeError) as exc:
                    raise TypeError(f"state_dict[{key!r}] is not an array: {exc}") from exc
            if current is not None and arr.shape != current.shape and arr.size == current.size \
                    and arr.ndim >= 1 and sum(d != 1 for d in arr.shape) <= 1:
                arr = arr.reshape(current.shape)
            fixed[key] = arr
        return super().load_state_dict(fixed, strict)

    # -- statistics --------------------------------------------------------------------------
    def _updated_running(self, mean_bn, var_bn):
        """New (running_mean, running_var) after a training step (not yet written)."""
        if self.using_moving_average:
            m = self.momentum
            return m * self.running_mean + (1 - m) * mean_bn, m * self.running_var + (1 - m) * var_bn
        return self.running_mean + mean_bn, self.running_var + mean_bn ** 2 + var_bn

    def _running_stats(self):
        """The BN statistics in eval: the running buffers, as (1, C) float64."""
        return self.running_mean.astype(np.float64)[None, :], self.running_var.astype(np.float64)[None, :]

    def _mix(self, means, variances, shape):
        """Softmax weights, the mixed mean and 1/sqrt(mixed var + eps) (both of `shape`), gamma."""
        mw, vw = _softmax_rows(np.array([self.mean_weight, self.var_weight], dtype=np.float64))
        mean, var = mw[0] * means[0], vw[0] * variances[0]
        for k in range(1, len(means)):
            mean = mean + mw[k] * means[k]
            var = var + vw[k] * variances[k]
        if mean.shape != shape:  # no source per row (SwitchableNorm1d without BN): (N, 1)
            mean, var = np.broadcast_to(mean, shape), np.broadcast_to(var, shape)
        return mw, vw, mean, 1.0 / np.sqrt(var + self.eps), self.weight.astype(np.float64)

    def _commit_running(self, new_running):
        if new_running is not None:
            toolkit.write_arrays([("running_mean", self.running_mean, new_running[0]),
                                  ("running_var", self.running_var, new_running[1])])

    def _saved_forward(self, dy):
        """(saved forward, x, dy checked against x) for backward."""
        s = self._saved
        if s is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before any forward")
        x = s["x"]
        return s, x, toolkit.check_grad_output(dy, x.shape, x.dtype)

    @staticmethod
    def _mixing_grads(grads, s, d_mean, d_var):
        """Gradients of mean_weight and var_weight through the softmax, into grads."""
        total = np.add.reduce  # over every element: ndarray.sum without its Python wrapper
        grads["mean_weight"] = _softmax_backward(s["mw"], np.array([total(d_mean * m, None) for m in s["means"]]))
        grads["var_weight"] = _softmax_backward(s["vw"], np.array([total(d_var * v, None) for v in s["variances"]]))

    def _var(self, m2, count):
        if self.population_variance:
            return m2 / count
        return m2 / (count - 1)

    def _check_input(self, x):
        x = toolkit.as_float_array(x)
        if x.ndim != self._ndim:
            raise ValueError(f"expected {self._ndim}D input (got {x.ndim}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels at dim 1, got {x.shape[1]} "
                             f"(input shape {x.shape})")
        return x

    def forward(self, x):
        """y for x (see the class docstring); in training with BN, the running statistics are updated."""
        x = self._check_input(x)
        N, C = x.shape[:2]
        L = math.prod(x.shape[2:])
        if not self.population_variance and L < 2:
            raise ValueError(f"Expected more than 1 spatial element per channel (unbiased variance), "
                             f"got input size {x.shape}")
        if self.training and self.using_bn and N < 1:
            raise ValueError(f"Expected at least one sample when training, got input size {x.shape}")
        mean_in, m2 = toolkit.row_moments(x)
        var_in = self._var(m2, L)
        mean_ln = _group_mean(mean_in, 1)
        var_ln = _group_mean(var_in, 1) + _group_mean((mean_in - mean_ln) ** 2, 1)
        means = [mean_in, mean_ln]
        variances = [var_in, var_ln]
        bn_from_batch = False
        new_running = None
        if self.using_bn:
            if self.training:
                bn_from_batch = True
                mean_bn = _group_mean(mean_in, 0)
                var_bn = _group_mean(var_in, 0) + _group_mean((mean_in - mean_bn) ** 2, 0)
                new_running = self._updated_running(mean_bn[0], var_bn[0])
            else:
                mean_bn, var_bn = self._running_stats()
            means.append(mean_bn)
            variances.append(var_bn)
        mw, vw, mean, rstd, gamma = self._mix(means, variances, (N, C))
        y = toolkit.apply_rows(x, mean, rstd * gamma, self.bias.astype(np.float64))
        self._commit_running(new_running)
        self._saved = dict(x=x, mean_in=mean_in, means=means, variances=variances, mean=mean, rstd=rstd,
                           mw=mw, vw=vw, gamma=gamma, L=L, bn_from_batch=bn_from_batch)
        return y

    def backward(self, dy):
        """dx for the last forward; fills grads for weight, bias, mean_weight and var_weight."""
        s, x, dy = self._saved_forward(dy)
        N, C = x.shape[:2]
        L = s["L"]
        mean_in, mean, rstd, gamma = s["mean_in"], s["mean"], s["rstd"], s["gamma"]
        s1, s2c = toolkit.row_grad_sums(x, dy, mean_in)
        s2 = s2c + (mean_in - mean) * s1                     # sum dy * (x - mean)
        d_mean = -gamma * rstd * s1                           # dL/dmean, per row
        d_var = -0.5 * gamma * rstd ** 3 * s2                 # dL/dvar, per row
        grads = {"weight": np.add.reduce(rstd * s2, 0), "bias": np.add.reduce(s1, 0)}
        mw, vw = s["mw"], s["vw"]
        self._mixing_grads(grads, s, d_mean, d_var)
        # Through the statistics to the per-row moments (mean_in, var_in).
        mean_ln = s["means"][1]
        d_mean_ln = mw[1] * np.add.reduce(d_mean, 1, keepdims=True)
        d_var_ln = vw[1] * np.add.reduce(d_var, 1, keepdims=True)
        d_mean_in = mw[0] * d_mean + d_mean_ln / C + d_var_ln * 2.0 * (mean_in - mean_ln) / C
        d_var_in = vw[0] * d_var + d_var_ln / C
        if s["bn_from_batch"]:
            mean_bn = s["means"][2]
            d_mean_bn = mw[2] * np.add.reduce(d_mean, 0, keepdims=True)
            d_var_bn = vw[2] * np.add.reduce(d_var, 0, keepdims=True)
            d_mean_in = d_mean_in + d_mean_bn / N + d_var_bn * 2.0 * (mean_in - mean_bn) / N
            d_var_in = d_var_in + d_var_bn / N
        count = L if self.population_variance else L - 1
        dx = toolkit.apply_rows_backward(dy, x, gamma * rstd, mean_in, 2.0 * d_var_in / count, d_mean_in / L)
        self.grads = {k: np.asarray(v, dtype=self.dtype) for k, v in grads.items()}
        return dx


# The docstrings of SwitchableNorm1d / 2d / 3d: one template.
_SWITCHABLE_NORM_DOC = """Switchable Normalization (Luo et al., 2018) over {dims} input.

    Every value is normalized with a learned mix of {sources} statistics, then scaled and
    shifted by the per-channel ``weight`` and ``bias``, with the algorithm of the paper's
    released code (its checkpoints give the same outputs)::

        mean = sum_k softmax(mean_weight)[k] * mean_k,  var = sum_k softmax(var_weight)[k] * var_k
        y = (x - mean) / sqrt(var + eps) * weight + bias

    with k over {sources_list}. {statistics}

    In training the BN statistics are the batch's (and the running ones are updated); in
    eval they are the running buffers, while the other statistics still come from the input.
    ``backward`` differentiates through every statistic (the BN ones are not detached) and
    the softmax, and fills ``grads`` for the four parameters.

    Parameters
    ----------
    num_features : int
        C, the number of channels (dim 1 of the input).
    eps : float, default 1e-5
        Added to the mixed variance under the square root (finite, >= 0).
    momentum : float or None, default None
        The fraction of the running statistics kept at each training step, in [0, 1]:
        ``running = momentum * running + (1 - momentum) * batch`` (note: the opposite of
        torch's BatchNorm momentum). None means {default_momentum}, the released code's default.
    using_moving_average : bool, default True
        Update the running statistics as a moving average. False: add each batch's into them
        instead, ``running_mean += mean_bn`` and ``running_var += mean_bn ** 2 + var_bn``
        (the released code's accumulation, to be divided by the number of batches after).
    using_bn : bool, default True
        Mix in BN statistics (and keep running buffers). False: {sources_without_bn} only.
    last_gamma : bool, default False
        Start ``weight`` at zeros instead of ones (for the last norm of a residual block).
    population_variance : bool, default False
        Use the biased variance (divided by the count) instead of the unbiased one for
        {variances}.
    dtype : np.float32 or np.float64, default np.float32
        The dtype of the parameters, buffers and gradients.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,)
        The per-channel scale and shift.
    mean_weight, var_weight : ndarray of shape ({n_sources},), or ({n_sources_without_bn},) without ``using_bn``
        The logits of the mixing weights of the means and of the variances, in the order
        {sources_list} (ones at construction: equal weights).
    running_mean, running_var : ndarray of shape (C,), or None
        The running BN statistics (zeros at construction, both); None without ``using_bn``.
    training : bool
        True after construction and ``train()``, False after ``eval()``.
    grads : dict
        ``weight``, ``bias``, ``mean_weight`` and ``var_weight`` -> their gradients, set by
        ``backward``.

    Shape
    -----
    - Input: {shape}, with C = num_features
    - Output: the input's shape (and dtype)

    Raises
    ------
    ValueError
        At forward: input that is not {dims}, or with another channel count than
        ``num_features``; {too_small}.
    TypeError
        Input of another dtype than float32 or float64, or a constructor argument of the
        wrong type.

    Notes
    -----
    Built only on normcore's public toolkit, as a third-party plugin would be: one pass of
    ``toolkit.row_moments`` for the statistics, one of ``toolkit.apply_rows``; backward one of
    ``toolkit.row_grad_sums`` and one of ``toolkit.apply_rows_backward``. The variances over
    groups of rows are computed as mean(var_in) + mean((mean_in - mean_group) ** 2), equal to
    the released formula without its cancellation when |mean| >> std. ``load_state_dict``
    also takes the released code's shapes ((1, C, 1, 1), (1, C, 1), (1, C)). Registered as
    ``"{registered}"``.

    Examples
    --------
    >>> from normcore.plugins.switchable import {name}
    >>> x = np.random.default_rng(0).standard_normal({example_shape}).astype(np.float32)
    >>> m = {name}(3)
    >>> y = m(x)                                   # training: BN statistics of the batch
    >>> y.shape, y.dtype, m.mean_weight.tolist()
    ({example_shape}, dtype('float32'), {logits})
    >>> dx = m.backward(np.ones_like(y))           # dx for the last forward; fills m.grads
    >>> sorted(m.grads)
    ['bias', 'mean_weight', 'var_weight', 'weight']
    >>> sorted(m.state_dict())
    ['bias', 'mean_weight', 'running_mean', 'running_var', 'var_weight', 'weight']
    >>> y_eval = m.eval()(x)                       # eval: BN statistics from the running buffers
    """

_SPATIAL_FIELDS = dict(
    sources="IN, LN and BN", sources_list="(IN, LN, BN)", sources_without_bn="IN and LN", n_sources=3,
    n_sources_without_bn=2, logits="[1.0, 1.0, 1.0]",
    variances="the IN statistics (from which the LN and BN ones\n        are derived)",
    statistics="IN: per (sample, channel), over the\n    positions; LN: per sample, over its channels "
               "and positions; BN: per channel, over the batch\n    and the positions.",
    too_small="a single spatial position, unless\n        ``population_variance`` (the unbiased "
              "variance needs two)")


@nc.register_norm("switchable_norm2d")
class SwitchableNorm2d(_SwitchableNorm):
    __doc__ = _SWITCHABLE_NORM_DOC.format(
        name="SwitchableNorm2d", dims="4D", shape="(N, C, H, W)", default_momentum=0.9,
        registered="switchable_norm2d", example_shape="(4, 3, 5, 5)", **_SPATIAL_FIELDS)

    _ndim = 4
    _default_momentum = 0.9


@nc.register_norm("switchable_norm3d")
class SwitchableNorm3d(_SwitchableNorm):
    __doc__ = _SWITCHABLE_NORM_DOC.format(
        name="SwitchableNorm3d", dims="5D", shape="(N, C, D, H, W)", default_momentum=0.997,
        registered="switchable_norm3d", example_shape="(2, 3, 2, 3, 3)", **_SPATIAL_FIELDS)

    _ndim = 5
    _default_momentum = 0.997


@nc.register_norm("switchable_norm1d")
class SwitchableNorm1d(_SwitchableNorm):
    __doc__ = _SWITCHABLE_NORM_DOC.format(
        name="SwitchableNorm1d", dims="2D", shape="(N, C)", default_momentum=0.997, registered="switchable_norm1d",
        example_shape="(4, 3)", sources="LN and BN", sources_list="(LN, BN)", sources_without_bn="LN",
        n_sources=2, n_sources_without_bn=1, logits="[1.0, 1.0]", variances="both statistics",
        statistics="LN: per sample, over its C channels; BN: per\n    channel, over the N samples; "
                   "both with the unbiased variance, as the released code.",
        too_small="fewer than 2 channels, or (training with BN)\n        fewer than 2 samples, unless "
                  "``population_variance``")

    _ndim = 2
    _default_momentum = 0.997

    def _sources(self):
        return ("ln", "bn") if self.using_bn else ("ln",)

    def forward(self, x):
        """y for x (see the class docstring); in training with BN, the running statistics are updated."""
        x = self._check_input(x)
        N, C = x.shape
        need = 1 if self.population_variance else 2
        if C < need or (self.using_bn and self.training and N < need):
            raise ValueError(f"Expected more than 1 value per sample and per channel (unbiased variance), "
                             f"got input size {x.shape}")
        # LN: the rows of x; BN: the rows of x transposed (one toolkit pass each).
        mean_ln, m2_ln = toolkit.row_moments(x[:, None, :])            # (N, 1)
        means, variances = [mean_ln], [self._var(m2_ln, C)]
        bn_from_batch = False
        new_running = None
        if self.using_bn:
            if self.training:
                bn_from_batch = True
                mean_bn, m2_bn = toolkit.row_moments(x.T[None])        # (1, C)
                var_bn = self._var(m2_bn, N)
                new_running = self._updated_running(mean_bn[0], var_bn[0])
            else:
                mean_bn, var_bn = self._running_stats()
            means.append(mean_bn)
            variances.append(var_bn)
        mw, vw, mean, rstd, gamma = self._mix(means, variances, (N, C))
        y = toolkit.apply_rows(x[:, :, None], mean, rstd * gamma, self.bias.astype(np.float64))[:, :, 0]
        self._commit_running(new_running)
        self._saved = dict(x=x, means=means, variances=variances, mean=mean, rstd=rstd, mw=mw, vw=vw,
                           gamma=gamma, bn_from_batch=bn_from_batch)
        return y

    def backward(self, dy):
        """dx for the last forward; fills grads for weight, bias, mean_weight and var_weight."""
        s, x, dy = self._saved_forward(dy)
        N, C = x.shape
        xd, g = x.astype(np.float64), dy.astype(np.float64)
        mean, rstd, gamma, mw, vw = s["mean"], s["rstd"], s["gamma"], s["mw"], s["vw"]
        centered = xd - mean
        d_mean = -gamma * rstd * g
        d_var = -0.5 * gamma * rstd ** 3 * g * centered
        grads = {"weight": (g * centered * rstd).sum(axis=0), "bias": g.sum(axis=0)}
        self._mixing_grads(grads, s, d_mean, d_var)
        n_ln = C if self.population_variance else C - 1
        mean_ln = s["means"][0]
        dx = gamma * rstd * g
        dx += mw[0] * d_mean.sum(axis=1, keepdims=True) / C
        dx += vw[0] * d_var.sum(axis=1, keepdims=True) * 2.0 * (xd - mean_ln) / n_ln
        if s["bn_from_batch"]:
            n_bn = N if self.population_variance else N - 1
            mean_bn = s["means"][1]
            dx += mw[1] * d_mean.sum(axis=0, keepdims=True) / N
            dx += vw[1] * d_var.sum(axis=0, keepdims=True) * 2.0 * (xd - mean_bn) / n_bn
        self.grads = {k: np.asarray(v, dtype=self.dtype) for k, v in grads.items()}
        return dx.astype(x.dtype)
