"""BatchNorm, InstanceNorm and GroupNorm as one computation: statistics over groups of rows.

View x of shape (N, C, *) as rows [N*C, L]: row r = (n, c) is contiguous. The rows are
grouped as [outer, k, inner] and merged over k:

    BatchNorm      outer=1,   k=N,   inner=C   group of row r: its channel r % C
    InstanceNorm   outer=N*C, k=1,   inner=1   group of row r: the row itself
    GroupNorm      outer=N*G, k=C/G, inner=1   group of row r: r // (C/G)

Forward: reduce (per-row moments) -> combine (group mean and variance) -> apply
(y = (x - mean) * rstd * gamma + beta). Backward: reduce (per-row sums of dy and
dy * (x - mean)) -> combine (group sums, weighted by gamma) -> apply
(dx = a * dy + b * (x - mean) + c). Nothing the size of x is kept or allocated besides the
output: the backward recomputes from x and the saved O(N*C) statistics.
"""
import functools
from typing import NamedTuple

import numpy as np

from normcore._kernels.apply_rows import apply_rows_backward
from normcore._kernels.channels_last import cl_apply, cl_apply_backward, cl_grad_sums, cl_group_forward, cl_moments
from normcore._kernels.combine import merge_moments, sum_groups
from normcore._kernels.engine import Plan
from normcore._kernels.grad_sums import row_grad_sums


class Grouping(NamedTuple):
    """How rows [N*C, L] are merged: as [outer, k, inner] over k."""

    N: int
    C: int
    L: int
    outer: int
    k: int
    inner: int

    @property
    def per_channel(self):
        """True when the group of row r is its channel r % C (BatchNorm; running statistics)."""
        return self.outer == 1 and self.inner == self.C

    @property
    def period(self):
        """Coefficient arrays given to the kernels are indexed by r % period."""
        return self.C if self.per_channel else self.N * self.C

    def group_to_rows(self, a):
        """Per-group values -> one per row (r % period)."""
        if self.per_channel or self.k == 1:
            return a
        return np.repeat(a, self.k)

    def channel_to_rows(self, a):
        """Per-channel values -> one per row (r % period)."""
        if self.per_channel or self.N == 1:
            return a
        return np.tile(a, self.N)


# The groupings are immutable and hashed on every call (the engine's plans are kept by
# grouping): one object per shape, built once.
@functools.lru_cache(maxsize=256)
def channel_grouping(N, C, L):
    """BatchNorm: each channel's rows over the batch form one group."""
    return Grouping(N, C, L, 1, N, C)


@functools.lru_cache(maxsize=256)
def instance_grouping(N, C, L):
    """InstanceNorm: every row is its own group."""
    return Grouping(N, C, L, N * C, 1, 1)


@functools.lru_cache(maxsize=256)
def group_grouping(N, C, L, G):
    """GroupNorm: C/G consecutive rows of one sample form a group."""
    return Grouping(N, C, L, N * G, C // G, 1)


class Saved(NamedTuple):
    """What backward needs from forward: x as rows (a view of x, or its contiguous copy), the
    grouping, the group means and rstd, a float64 copy of gamma, and whether the statistics
    were computed from x (they then depend on x) or given (running statistics, constants)."""

    x2: np.ndarray
    shape: tuple
    grouping: Grouping
    mean: np.ndarray
    rstd: np.ndarray
    weight: np.ndarray
    batch_stats: bool


class BatchStats(NamedTuple):
    """Per-row and per-group moments of x, for the running statistics."""

    row_mean: np.ndarray
    row_m2: np.ndarray
    mean: np.ndarray
    m2: np.ndarray


def as_rows(x, N, C):
    """x (N, C, *) as a C-contiguous [N*C, L] array (a view when x is C-contiguous)."""
    return np.ascontiguousarray(x).reshape(N * C, -1) if N * C else x.reshape(0, 0)


def channels_last_rows(x, N, C):
    """x (N, C, *spatial) whose memory is channels-last, (N, *spatial, C) C-contiguous, as an
    [N, L, C] view; None for any other layout (a C-contiguous x takes the NCHW path)."""
    if x.ndim < 3 or x.flags.c_contiguous or N * C == 0:
        return None
    v = np.moveaxis(x, 1, -1)
    if not v.flags.c_contiguous:
        return None
    return v.reshape(N, -1, C)


def rows_of(x, grouping):
    """x (N, C, *) as the kernels read it: an [N, L, C] view when its memory is channels-last,
    else [N*C, L] rows (a view when x is C-contiguous). The one layout rule of forward and
    backward."""
    if x.flags.c_contiguous:
        return x.reshape(grouping.N * grouping.C, grouping.L)
    x3 = channels_last_rows(x, grouping.N, grouping.C)
    return x3 if x3 is not None else as_rows(x, grouping.N, grouping.C)


def resume(x, grouping, mean, rstd, weight, batch_stats):
    """The Saved of a forward of x (non-empty) over `grouping`, rebuilt from what it returned:
    its group means and rstd, the weight it used, and whether the statistics were x's own.

    For callers that keep statistics rather than a Saved (normcore.torch saves tensors for
    autograd): backward(dy, resume(...)) is the backward of that forward, bit for bit."""
    return Saved(rows_of(x, grouping), x.shape, grouping, np.ascontiguousarray(mean, dtype=np.float64),
                 np.ascontiguousarray(rstd, dtype=np.float64), _f64(weight, grouping.C, 1.0), batch_stats)


def channels_last_like(a3, shape):
    """[N, L, C] -> (N, C, *spatial) view, channels-last in memory."""
    return np.moveaxis(a3.reshape((shape[0], *shape[2:], shape[1])), -1, 1)


def _f64(v, C, fill):
    """A per-channel parameter as a float64 copy, C-contiguous for the kernels: a copy also when
    v is float64 already, so the backward differentiates the forward with the parameters as
    they were then, even if they are changed in place in between (and any 1-D view works)."""
    if v is None:
        return np.full(C, fill)
    return np.array(v, dtype=np.float64, order="C")


def _given_stats(mean, var, eps):
    """Given (running) mean and var + eps as float64 copies (saved for backward), for the
    kernels to use with eps 0: rstd = 1 / sqrt(var + eps) as in PyTorch, also for a negative
    var (the kernels clamp a variance at 0, a guard meant for batch statistics), and NaN where
    var + eps < 0 rather than a finite scale. For var >= 0 the bits are those of eps given."""
    mean = np.array(mean, dtype=np.float64)
    var_eps = np.array(var, dtype=np.float64) + eps
    var_eps[var_eps < 0] = np.nan
    return mean, var_eps


def forward(x, grouping, weight, bias, eps, n_threads, stats=None):
    """Normalise x (N, C, *) over the groups of `grouping`.

    stats: None to use the statistics of x, or per-channel (mean, var) to use given ones
    (running statistics; `grouping` must then be per channel).
    Returns (y, saved, batch_stats or None).
    """
    g = grouping
    w = _f64(weight, g.C, 1.0)
    x2 = rows_of(x, g)
    if x2.ndim == 3:
        if stats is not None:
            stats, eps = _given_stats(*stats, eps), 0.0
        return _forward_channels_last(x, x2, g, w, _f64(bias, g.C, 0.0), eps, n_threads, stats)
    plan = plan_of(g, n_threads)
    if stats is None:
        y2, st = plan.forward(x2, w, bias, eps)
        rows = (st[0], st[1]) if g.k == 1 else (None, None)
        batch = BatchStats(*rows, st[0], st[1])
    else:
        y2, st = plan.forward(x2, w, bias, eps, *stats)
        batch = None
    saved = Saved(x2, x.shape, g, st[0], st[2], w, stats is None)
    return y2.reshape(x.shape), saved, batch


_plans = {}


def plan_of(grouping, n_threads):
    """The engine's Plan for an NCHW grouping at n_threads (kept: one per grouping and count)."""
    key = (grouping, n_threads)
    plan = _plans.get(key)
    if plan is None:
        g = grouping
        if len(_plans) >= 256:  # many shapes in one process: start again rather than grow
            _plans.clear()
        plan = _plans[key] = Plan(g.N, g.C, g.L, g.outer, g.k, g.inner, n_threads)
    return plan


def _forward_channels_last(x, x3, g, w, bias, eps, n_threads, stats):
    """forward() on channels-last memory, without a transposing copy: reduce per (n, c) over
    the positions, the same combine as NCHW, apply per (n, c); y is channels-last too."""
    y3 = np.empty_like(x3)
    batch = None
    if stats is None and g.inner == 1 and g.N >= n_threads:
        # InstanceNorm, GroupNorm: one sample per task while it is in cache (the same bits as
        # the steps below).
        G = g.outer // g.N
        row_mean, row_m2 = np.empty(g.N * g.C), np.empty(g.N * g.C)
        mean, m2, rstd = np.empty(g.outer), np.empty(g.outer), np.empty(g.outer)
        cl_group_forward(x3, y3, G, w, bias, eps, row_mean, row_m2, mean, m2, rstd, n_threads)
        saved = Saved(x3, x.shape, g, mean, rstd, w, True)
        return channels_last_like(y3, x.shape), saved, BatchStats(row_mean, row_m2, mean, m2)
    if stats is None:
        row_mean, row_m2 = np.empty(g.N * g.C), np.empty(g.N * g.C)
        cl_moments(x3, row_mean, row_m2, n_threads)
        if g.k == 1:
            mean, m2 = row_mean, row_m2
        else:
            mean, m2 = np.empty(g.outer * g.inner), np.empty(g.outer * g.inner)
            merge_moments(row_mean, row_m2, g.L, g.outer, g.k, g.inner, mean, m2)
        batch = BatchStats(row_mean, row_m2, mean, m2)
        var = m2 / (g.k * g.L)
    else:
        mean, var = stats
    rstd = 1.0 / np.sqrt(np.maximum(var, 0.0) + eps)
    center = g.group_to_rows(mean)
    scale = g.group_to_rows(rstd) * g.channel_to_rows(w)
    cl_apply(x3, y3, center, scale, g.channel_to_rows(bias), g.period, n_threads)
    saved = Saved(x3, x.shape, g, mean, rstd, w, stats is None)
    return channels_last_like(y3, x.shape), saved, batch


def backward(dy, saved, n_threads):
    """dx, dweight, dbias (float64 per channel) for the forward that produced `saved`."""
    g = saved.grouping
    x2 = saved.x2
    R = g.N * g.C
    layout_cl = x2.ndim == 3
    if layout_cl:
        # Channels-last forward: dy in the same layout (a copy only if dy is not).
        dy2 = np.ascontiguousarray(np.moveaxis(dy, 1, -1)).reshape(x2.shape)
        grad_sums, apply_backward = cl_grad_sums, cl_apply_backward
    else:
        dy2 = as_rows(dy, g.N, g.C)
        grad_sums, apply_backward = row_grad_sums, apply_rows_backward
    if not layout_cl and (g.per_channel or saved.batch_stats and g.inner == 1):
        # NCHW: sums, combine and apply in one call of the engine
        dx2, grads = plan_of(g, n_threads).backward(x2, dy2, saved.mean, saved.rstd, saved.weight, saved.batch_stats)
        return dx2.reshape(saved.shape), grads[0], grads[1]
    dx2 = np.empty_like(x2)
    center = g.group_to_rows(saved.mean)
    rstd_rows = g.group_to_rows(saved.rstd)
    w_rows = g.channel_to_rows(saved.weight)
    sdy = np.empty(R)
    sdyxc = np.empty(R)
    grad_sums(x2, dy2, center, g.period, sdy, sdyxc, n_threads)

    # Parameter gradients: sums over the rows of each channel, in batch order.
    dbias = _channel_sums(sdy, g)
    if g.per_channel:
        sxc = _channel_sums(sdyxc, g)
        dweight = sxc * saved.rstd
    else:
        dweight = _channel_sums(sdyxc * rstd_rows, g)

    a = rstd_rows * w_rows
    if saved.batch_stats:
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = gamma * dy and the means
        # over the group: a = gamma * rstd, b = -rstd^3 * sum(g * (x - mean)) / M,
        # c = -rstd * sum(g) / M.
        if g.per_channel:
            s1 = saved.weight * dbias
            s2 = saved.weight * sxc
        else:
            s1 = _group_sums(w_rows * sdy, g)
            s2 = _group_sums(w_rows * sdyxc, g)
        M = g.k * g.L
        r = saved.rstd
        b = g.group_to_rows(-(r * r * r) * s2 / M)
        c = g.group_to_rows(-r * s1 / M)
        apply_backward(dy2, x2, dx2, center, a, b, c, g.period, n_threads)
    else:
        # Given (running) statistics are constants: dx = gamma * rstd * dy exactly, reading
        # neither x nor the mean (a NaN there must not reach dx; an infinite dy stays infinite):
        # b = c = 0 make the kernels compute a * dy alone; they get dy in place of x.
        zeros = np.zeros(g.period)
        apply_backward(dy2, dy2, dx2, zeros, a, zeros, zeros, g.period, n_threads)
    if layout_cl:
        return channels_last_like(dx2, saved.shape), dweight, dbias
    return dx2.reshape(saved.shape), dweight, dbias


def _group_sums(v, g):
    """Per-row values summed over each group's rows, in row order."""
    out = np.empty(g.outer * g.inner)
    sum_groups(v, g.outer, g.k, g.inner, out)
    return out


def _channel_sums(v, g):
    """Per-row values summed over the batch for each channel, in batch order."""
    out = np.empty(g.C)
    sum_groups(v, 1, g.N, g.C, out)
    return out
