"""Plain float64 NumPy reference implementations of the normalization layers.

Written for clarity, not speed.  Independent of normcore (NumPy only).
All computations happen in float64; inputs are never mutated.

Conventions (same as torch.nn):
    xhat = (x - mean) / sqrt(var + eps)      (biased variance)
    y    = xhat * weight + bias
For the backward functions, with g = dy * weight (broadcast) and the
normalisation statistics taken over `axes` (the reduction axes):
    dx      = rstd * (g - mean(g, axes) - xhat * mean(g * xhat, axes))
    dweight = sum(dy * xhat) over all non-parameter axes
    dbias   = sum(dy)        over all non-parameter axes
When the statistics are constants (eval mode) the mean terms vanish:
    dx = g * rstd.
dweight/dbias are always returned (computed as if weight were ones when
weight is None); callers ignore them when the layer has no affine params.
"""
import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _channel_shape(x):
    """Shape that broadcasts a per-channel (C,) vector against x of shape (N, C, *)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _channel_reduce_axes(x):
    """Axes (0, 2, 3, ...) of x of shape (N, C, *): everything except the channel."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    """Per-channel vector (C,) reshaped to broadcast against x; None -> None."""
    return None if v is None else v.reshape(_channel_shape(x))


def _affine(xhat, weight, bias):
    y = xhat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _normalized_backward(g, xhat, rstd, axes):
    """dx of xhat = (x - mean(x, axes)) * rstd, given g = dL/dxhat (stats from x)."""
    g_mean = np.mean(g, axis=axes, keepdims=True)
    gx_mean = np.mean(g * xhat, axis=axes, keepdims=True)
    return rstd * (g - g_mean - xhat * gx_mean)


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------

def batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                       momentum, eps, num_batches_tracked=None):
    x = _f64(x)
    weight, bias = _f64(weight), _f64(bias)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    axes = _channel_reduce_axes(x)
    new_rm = None if running_mean is None else running_mean.copy()
    new_rv = None if running_var is None else running_var.copy()

    if training:
        mean = np.mean(x, axis=axes)
        var = np.var(x, axis=axes)  # biased, used for normalisation
        n = x.size // x.shape[1]
        if running_mean is not None:
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
            else:
                factor = float(momentum)
            unbiased_var = var * n / (n - 1)
            new_rm = (1.0 - factor) * running_mean + factor * mean
            new_rv = (1.0 - factor) * running_var + factor * unbiased_var
    else:
        mean = running_mean
        var = running_var

    xhat = (x - _per_channel(mean, x)) / np.sqrt(_per_channel(var, x) + eps)
    y = _affine(xhat, _per_channel(weight, x), _per_channel(bias, x))
    return y, new_rm, new_rv


def batch_norm_backward(x, dy, weight, mean, var, eps):
    """Gradient when batch statistics (biased var) were used."""
    x, dy = _f64(x), _f64(dy)
    C = x.shape[1]
    weight = np.ones(C) if weight is None else _f64(weight)
    mean, var = _f64(mean), _f64(var)
    axes = _channel_reduce_axes(x)

    rstd = 1.0 / np.sqrt(_per_channel(var, x) + eps)
    xhat = (x - _per_channel(mean, x)) * rstd
    g = dy * _per_channel(weight, x)
    dx = _normalized_backward(g, xhat, rstd, axes)
    dweight = np.sum(dy * xhat, axis=axes)
    dbias = np.sum(dy, axis=axes)
    return dx, dweight, dbias


def batch_norm_backward_eval(x, dy, weight, running_mean, running_var, eps):
    """Gradient when running statistics (constants) were used."""
    x, dy = _f64(x), _f64(dy)
    C = x.shape[1]
    weight = np.ones(C) if weight is None else _f64(weight)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    axes = _channel_reduce_axes(x)

    rstd = 1.0 / np.sqrt(_per_channel(running_var, x) + eps)
    xhat = (x - _per_channel(running_mean, x)) * rstd
    dx = dy * _per_channel(weight, x) * rstd
    dweight = np.sum(dy * xhat, axis=axes)
    dbias = np.sum(dy, axis=axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# InstanceNorm
# ---------------------------------------------------------------------------

def instance_norm_forward(x, weight, bias, running_mean, running_var,
                          use_input_stats, momentum, eps):
    x = _f64(x)
    weight, bias = _f64(weight), _f64(bias)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    if momentum is None:
        momentum = 0.0  # torch's InstanceNorm passes 0.0 for momentum=None
    new_rm = None if running_mean is None else running_mean.copy()
    new_rv = None if running_var is None else running_var.copy()

    if use_input_stats:
        axes = tuple(range(2, x.ndim))
        mean = np.mean(x, axis=axes, keepdims=True)  # (N, C, 1, ...)
        var = np.var(x, axis=axes, keepdims=True)    # biased
        if running_mean is not None:
            L = x.size // (x.shape[0] * x.shape[1])
            inst_mean = mean.reshape(x.shape[0], x.shape[1])
            inst_unbiased_var = var.reshape(x.shape[0], x.shape[1]) * L / (L - 1)
            new_rm = (1.0 - momentum) * running_mean + momentum * np.mean(inst_mean, axis=0)
            new_rv = (1.0 - momentum) * running_var + momentum * np.mean(inst_unbiased_var, axis=0)
    else:
        mean = _per_channel(running_mean, x)
        var = _per_channel(running_var, x)

    xhat = (x - mean) / np.sqrt(var + eps)
    y = _affine(xhat, _per_channel(weight, x), _per_channel(bias, x))
    return y, new_rm, new_rv


def instance_norm_backward(x, dy, weight, eps):
    """Gradient when per-instance input statistics were used."""
    x, dy = _f64(x), _f64(dy)
    C = x.shape[1]
    weight = np.ones(C) if weight is None else _f64(weight)
    stat_axes = tuple(range(2, x.ndim))

    mean = np.mean(x, axis=stat_axes, keepdims=True)
    var = np.var(x, axis=stat_axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    g = dy * _per_channel(weight, x)
    dx = _normalized_backward(g, xhat, rstd, stat_axes)
    param_axes = _channel_reduce_axes(x)
    dweight = np.sum(dy * xhat, axis=param_axes)
    dbias = np.sum(dy, axis=param_axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------

def _layer_norm_axes(x, normalized_shape):
    if isinstance(normalized_shape, (int, np.integer)):
        normalized_shape = (int(normalized_shape),)
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    assert x.shape[x.ndim - k:] == normalized_shape, (x.shape, normalized_shape)
    stat_axes = tuple(range(x.ndim - k, x.ndim))
    param_axes = tuple(range(0, x.ndim - k))
    return stat_axes, param_axes


def layer_norm_forward(x, normalized_shape, weight, bias, eps):
    x = _f64(x)
    weight, bias = _f64(weight), _f64(bias)
    stat_axes, _ = _layer_norm_axes(x, normalized_shape)
    mean = np.mean(x, axis=stat_axes, keepdims=True)
    var = np.var(x, axis=stat_axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    return _affine(xhat, weight, bias)  # weight/bias broadcast over the trailing dims


def layer_norm_backward(x, dy, normalized_shape, weight, eps):
    x, dy = _f64(x), _f64(dy)
    stat_axes, param_axes = _layer_norm_axes(x, normalized_shape)
    param_shape = x.shape[x.ndim - len(stat_axes):]
    weight = np.ones(param_shape) if weight is None else _f64(weight)

    mean = np.mean(x, axis=stat_axes, keepdims=True)
    var = np.var(x, axis=stat_axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    g = dy * weight
    dx = _normalized_backward(g, xhat, rstd, stat_axes)
    dweight = np.sum(dy * xhat, axis=param_axes)
    dbias = np.sum(dy, axis=param_axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------

def _grouped(a, num_groups):
    """(N, C, *) -> (N, G, C // G * prod(*)); statistics are over axis 2."""
    N, C = a.shape[0], a.shape[1]
    assert C % num_groups == 0
    return a.reshape(N, num_groups, -1)


def group_norm_forward(x, num_groups, weight, bias, eps):
    x = _f64(x)
    weight, bias = _f64(weight), _f64(bias)
    xg = _grouped(x, num_groups)
    mean = np.mean(xg, axis=2, keepdims=True)
    var = np.var(xg, axis=2, keepdims=True)
    xhat = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return _affine(xhat, _per_channel(weight, x), _per_channel(bias, x))


def group_norm_backward(x, dy, num_groups, weight, eps):
    x, dy = _f64(x), _f64(dy)
    C = x.shape[1]
    weight = np.ones(C) if weight is None else _f64(weight)

    xg = _grouped(x, num_groups)
    mean = np.mean(xg, axis=2, keepdims=True)
    var = np.var(xg, axis=2, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat_g = (xg - mean) * rstd
    g = _grouped(dy * _per_channel(weight, x), num_groups)
    dx = _normalized_backward(g, xhat_g, rstd, axes=(2,)).reshape(x.shape)

    xhat = xhat_g.reshape(x.shape)
    param_axes = _channel_reduce_axes(x)
    dweight = np.sum(dy * xhat, axis=param_axes)
    dbias = np.sum(dy, axis=param_axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# LocalResponseNorm
# ---------------------------------------------------------------------------

def _lrn_scale(x, size, alpha, k):
    """s_c = k + alpha/size * sum of x^2 over channels [c - size//2, c + (size-1)//2] (zero padded)."""
    C = x.shape[1]
    sq = x * x
    S = np.zeros_like(x)
    for c in range(C):
        first, last = max(0, c - size // 2), min(C - 1, c + (size - 1) // 2)
        S[:, c] = sq[:, first:last + 1].sum(axis=1)
    return k + alpha / size * S


def local_response_norm_forward(x, size, alpha, beta, k):
    x = _f64(x)
    return x * _lrn_scale(x, size, alpha, k) ** (-beta)


def local_response_norm_backward(x, dy, size, alpha, beta, k):
    """dx_c = dy_c s_c^-beta - 2 alpha beta / size * x_c * sum over the channels c' whose window
    holds c (c' in [c - (size-1)//2, c + size//2]) of dy_c' x_c' s_c'^(-beta-1)."""
    x, dy = _f64(x), _f64(dy)
    C = x.shape[1]
    s = _lrn_scale(x, size, alpha, k)
    dx = dy * s ** (-beta)
    u = dy * x * s ** (-beta - 1)
    for c in range(C):
        first, last = max(0, c - (size - 1) // 2), min(C - 1, c + size // 2)
        dx[:, c] -= 2 * alpha * beta / size * x[:, c] * u[:, first:last + 1].sum(axis=1)
    return dx


# ---------------------------------------------------------------------------
# SwitchableNorm (Luo et al., 2018: the algorithm of the paper's released code)
# ---------------------------------------------------------------------------
#
# x (N, C) [SwitchableNorm1d] or (N, C, *) [2d / 3d]. Sources of statistics, mixed by
# softmax(mean_weight) and softmax(var_weight) in this order:
#   2d / 3d: IN  mean_in, var_in  over the L = prod(*) values of a row (n, c)
#            LN  mean_ln = mean_c(mean_in), var_ln = mean_c(var_in + mean_in^2) - mean_ln^2
#            BN  mean_bn = mean_n(mean_in), var_bn = mean_n(var_in + mean_in^2) - mean_bn^2
#   1d:      LN  mean and variance of each sample over its C values
#            BN  mean and variance of each channel over the N samples
# Variances are unbiased (ddof 1) unless population_variance (ddof 0). BN is left out without
# using_bn, and comes from the running buffers in eval. y = (x - mean) / sqrt(var + eps) * weight
# + bias. The running buffers after a training step: momentum * running + (1 - momentum) *
# batch with using_moving_average, else running_mean + mean_bn and running_var + mean_bn^2 +
# var_bn. The gradients go through every statistic taken from x (BN's too: not detached).


def _softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


def switchable_norm_stats(x, mean_weight, var_weight, running_mean, running_var, training,
                          using_bn=True, population_variance=False):
    """The statistics of SwitchableNorm for x, in float64: a dict with
    sources: [(name, mean, var)] (each broadcasting against (N, C)); mw, vw: the softmax
    weights; mean, var: the mixed statistics, shape (N, C)."""
    x = _f64(x)
    N, C = x.shape[:2]
    ddof = 0 if population_variance else 1
    if x.ndim == 2:
        sources = [("ln", x.mean(axis=1, keepdims=True), x.var(axis=1, ddof=ddof, keepdims=True))]
        if using_bn and training:
            sources.append(("bn", x.mean(axis=0, keepdims=True), x.var(axis=0, ddof=ddof, keepdims=True)))
    else:
        xr = x.reshape(N, C, -1)
        mean_in = xr.mean(axis=2)
        var_in = xr.var(axis=2, ddof=ddof)
        # mean(var_in + mean_in^2) - mean^2, written without its cancellation
        mean_ln = mean_in.mean(axis=1, keepdims=True)
        var_ln = (var_in + (mean_in - mean_ln) ** 2).mean(axis=1, keepdims=True)
        mean_bn = mean_in.mean(axis=0, keepdims=True)
        var_bn = (var_in + (mean_in - mean_bn) ** 2).mean(axis=0, keepdims=True)
        sources = [("in", mean_in, var_in), ("ln", mean_ln, var_ln)]
        if using_bn and training:
            sources.append(("bn", mean_bn, var_bn))
    if using_bn and not training:
        sources.append(("bn", _f64(running_mean)[None, :], _f64(running_var)[None, :]))
    mw = _softmax(_f64(mean_weight))
    vw = _softmax(_f64(var_weight))
    assert len(mw) == len(vw) == len(sources)
    mean = sum(w * np.broadcast_to(m, (N, C)) for w, (_, m, _) in zip(mw, sources))
    var = sum(w * np.broadcast_to(v, (N, C)) for w, (_, _, v) in zip(vw, sources))
    return dict(sources=sources, mw=mw, vw=vw, mean=mean, var=var)


def switchable_norm_forward(x, weight, bias, mean_weight, var_weight, running_mean, running_var, training,
                            using_bn=True, using_moving_average=True, momentum=0.9, eps=1e-5,
                            population_variance=False):
    """(y, new running_mean, new running_var); the new buffers are copies of the given ones
    unless a training step with BN updates them (None without BN)."""
    x = _f64(x)
    N, C = x.shape[:2]
    st = switchable_norm_stats(x, mean_weight, var_weight, running_mean, running_var, training,
                               using_bn, population_variance)
    shape = (N, C) + (1,) * (x.ndim - 2)
    xhat = (x - st["mean"].reshape(shape)) / np.sqrt(st["var"].reshape(shape) + eps)
    y = xhat * _f64(weight).reshape((1, C) + (1,) * (x.ndim - 2)) + _f64(bias).reshape((1, C) + (1,) * (x.ndim - 2))
    if not using_bn:
        return y, None, None
    new_rm, new_rv = _f64(running_mean).copy(), _f64(running_var).copy()
    if training:
        _, mean_bn, var_bn = st["sources"][-1]
        mean_bn, var_bn = mean_bn.reshape(C), var_bn.reshape(C)
        if using_moving_average:
            new_rm = momentum * new_rm + (1.0 - momentum) * mean_bn
            new_rv = momentum * new_rv + (1.0 - momentum) * var_bn
        else:
            new_rm = new_rm + mean_bn
            new_rv = new_rv + mean_bn ** 2 + var_bn
    return y, new_rm, new_rv


def _moments_backward(x, mean, d_mean, d_var, axis, ddof):
    """dx of mean = mean(x, axis) and var = sum((x - mean)^2, axis) / (n - ddof), given the
    gradients d_mean and d_var (keepdims shapes)."""
    n = x.shape[axis]
    xc = x - mean
    d_mean = d_mean + d_var * (-2.0) * xc.sum(axis=axis, keepdims=True) / (n - ddof)
    return d_var * 2.0 * xc / (n - ddof) + d_mean / n


def switchable_norm_backward(x, dy, weight, mean_weight, var_weight, running_mean, running_var, training,
                             using_bn=True, eps=1e-5, population_variance=False):
    """(dx, grads) with grads a dict of weight, bias, mean_weight, var_weight; reverse mode
    through the forward above, step by step (the running buffers of eval are constants)."""
    x, dy = _f64(x), _f64(dy)
    N, C = x.shape[:2]
    ddof = 0 if population_variance else 1
    st = switchable_norm_stats(x, mean_weight, var_weight, running_mean, running_var, training,
                               using_bn, population_variance)
    xr = x.reshape(N, C, -1)
    dyr = dy.reshape(N, C, -1)
    w = _f64(weight)
    rstd = 1.0 / np.sqrt(st["var"] + eps)                       # (N, C)
    xc = xr - st["mean"][:, :, None]
    xhat = xc * rstd[:, :, None]
    grads = {"weight": (dyr * xhat).sum(axis=(0, 2)), "bias": dyr.sum(axis=(0, 2))}
    g = dyr * w[None, :, None]                                  # dL/dxhat
    dxr = g * rstd[:, :, None]
    d_mean = -(g * rstd[:, :, None]).sum(axis=2)                 # dL/d(mixed mean), (N, C)
    d_var = (g * xc).sum(axis=2) * (-0.5) * rstd ** 3           # dL/d(mixed var), (N, C)

    def softmax_grad(p, grad_p):
        return p * (grad_p - np.dot(p, grad_p))

    mw, vw = st["mw"], st["vw"]
    grads["mean_weight"] = softmax_grad(mw, np.array([np.sum(d_mean * m) for _, m, _ in st["sources"]]))
    grads["var_weight"] = softmax_grad(vw, np.array([np.sum(d_var * v) for _, _, v in st["sources"]]))

    if x.ndim == 2:
        x2 = xr[:, :, 0]
        dx = dxr[:, :, 0]
        for k, (name, m, v) in enumerate(st["sources"]):
            if name == "bn" and not training:
                continue  # running statistics: constants
            axis = 1 if name == "ln" else 0
            dm = mw[k] * d_mean.sum(axis=axis, keepdims=True)
            dv = vw[k] * d_var.sum(axis=axis, keepdims=True)
            dx = dx + _moments_backward(x2, m, dm, dv, axis, ddof)
        return dx.reshape(x.shape), grads

    # 2d / 3d: first down to the per-row (IN) moments, then to x.
    mean_in = st["sources"][0][1]
    d_mean_in = mw[0] * d_mean
    d_var_in = vw[0] * d_var
    for k, (name, m, v) in enumerate(st["sources"][1:], start=1):
        if name == "bn" and not training:
            continue
        axis, n = (1, C) if name == "ln" else (0, N)
        dm = mw[k] * d_mean.sum(axis=axis, keepdims=True)
        dv = vw[k] * d_var.sum(axis=axis, keepdims=True)
        # v = mean_axis(var_in) + mean_axis((mean_in - m)^2), m = mean_axis(mean_in)
        d_var_in = d_var_in + dv / n
        d_mean_in = d_mean_in + dv * 2.0 * (mean_in - m) / n
        dm = dm + dv * (-2.0) * (mean_in - m).mean(axis=axis, keepdims=True)
        d_mean_in = d_mean_in + dm / n
    dxr = dxr + _moments_backward(xr, mean_in[:, :, None], d_mean_in[:, :, None], d_var_in[:, :, None], 2, ddof)
    return dxr.reshape(x.shape), grads


# ---------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------

def numeric_gradient(loss, a, h=1e-6):
    """Central finite-difference gradient of scalar loss() w.r.t. array a (perturbed in place)."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        lp = loss()
        a[i] = old - h
        lm = loss()
        a[i] = old
        grad[i] = (lp - lm) / (2 * h)
    return grad
