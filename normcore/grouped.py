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

from normcore._kernels.engine import Plan


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


class Saved:
    """What backward needs from forward: x as the engine read it (x itself when C-contiguous,
    its [N, L, C] view when channels-last, else its contiguous copy) and which layout that is,
    x's shape, the grouping, the group means and rstd, a float64 copy of gamma, and whether
    the statistics were computed from x (they then depend on x) or given (running statistics,
    constants). A class with slots rather than a NamedTuple: one is made on every forward, at
    a third of the cost."""

    __slots__ = ("x2", "channels_last", "shape", "grouping", "mean", "rstd", "weight", "batch_stats")

    def __init__(self, x2, channels_last, shape, grouping, mean, rstd, weight, batch_stats):
        self.x2, self.channels_last, self.shape, self.grouping = x2, channels_last, shape, grouping
        self.mean, self.rstd, self.weight, self.batch_stats = mean, rstd, weight, batch_stats


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
    """(x as the engine reads it, whether channels-last): x itself when C-contiguous (its
    memory is the rows [N*C, L]), an [N, L, C] view when its memory is channels-last, else the
    C-contiguous [N*C, L] copy. The one layout rule of forward and backward."""
    if x.flags.c_contiguous:
        return x, False
    x3 = channels_last_rows(x, grouping.N, grouping.C)
    if x3 is not None:
        return x3, True
    return as_rows(x, grouping.N, grouping.C), False


def resume(x, grouping, mean, rstd, weight, batch_stats):
    """The Saved of a forward of x (non-empty) over `grouping`, rebuilt from what it returned:
    its group means and rstd, the weight it used, and whether the statistics were x's own.

    For callers that keep statistics rather than a Saved (normcore.torch saves tensors for
    autograd): backward(dy, resume(...)) is the backward of that forward, bit for bit."""
    return Saved(*rows_of(x, grouping), x.shape, grouping, np.ascontiguousarray(mean, dtype=np.float64),
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


def forward(x, grouping, weight, bias, eps, n_threads, stats=None):
    """Normalise x (N, C, *) over the groups of `grouping`, in x's layout (NCHW rows, or
    channels-last memory read in place: y is channels-last too).

    stats: None to use the statistics of x, or per-channel (mean, var) to use given ones
    (running statistics; `grouping` must then be per channel).
    Returns (y, saved, moments): moments None with given statistics, else x's, float64
    (2, G): the group means, then the group M2 (sums of squared deviations).
    """
    g = grouping
    x2, cl = rows_of(x, g)
    plan = plan_of(g, n_threads, cl)
    if stats is None:
        y2, st, w = plan.forward(x2, weight, bias, eps)
    else:
        y2, st, w = plan.forward(x2, weight, bias, eps, *stats)
    saved = Saved(x2, cl, x.shape, g, st[0], st[2], w, stats is None)
    y = channels_last_like(y2, x.shape) if cl else y2.reshape(x.shape)
    return y, saved, st[:2] if stats is None else None


_plans = {}


def plan_of(grouping, n_threads, channels_last=False):
    """The engine's Plan for a grouping, layout and thread count (kept: one per key)."""
    key = (grouping, n_threads, channels_last)
    plan = _plans.get(key)
    if plan is None:
        g = grouping
        if len(_plans) >= 256:  # many shapes in one process: start again rather than grow
            _plans.clear()
        plan = _plans[key] = Plan(g.N, g.C, g.L, g.outer, g.k, g.inner, n_threads, channels_last)
    return plan


def moments(x, grouping, n_threads):
    """Per-channel (mean, M2) of x (N, C, *), non-empty, over a per-channel `grouping`:
    float64 (2, C), the reduce and combine of forward() without the apply."""
    x2, cl = rows_of(x, grouping)
    return plan_of(grouping, n_threads, cl).moments(x2)


def _dy_rows(dy, saved):
    """dy as the engine reads it for the backward of `saved`: in the layout of its x (a copy
    only if dy is not)."""
    if saved.channels_last:
        return np.ascontiguousarray(np.moveaxis(dy, 1, -1)).reshape(saved.x2.shape)
    return np.ascontiguousarray(dy)


def grad_sums(dy, saved, n_threads):
    """Per channel sum(dy) and sum(dy * (x - mean)) for the forward that produced `saved` (a
    per-channel grouping): float64 (2, C), the reduce of backward()."""
    plan = plan_of(saved.grouping, n_threads, saved.channels_last)
    return plan.grad_sums(saved.x2, _dy_rows(dy, saved), saved.mean)


def backward(dy, saved, n_threads, sums=None, count=0.0):
    """dx, dweight, dbias (float64 per channel) for the forward that produced `saved`: one call
    of the engine (gradient sums, combine and apply), in the layout of that forward's x.

    sums, count: the gradient sums (grad_sums' (2, C)) and number of values of a batch of
    which x is a slice, for its combine and apply on this slice (SyncBatchNorm); dweight and
    dbias are then that batch's."""
    plan = plan_of(saved.grouping, n_threads, saved.channels_last)
    dx2, grads = plan.backward(saved.x2, _dy_rows(dy, saved), saved.mean, saved.rstd, saved.weight,
                               saved.batch_stats, sums, count)
    dx = channels_last_like(dx2, saved.shape) if saved.channels_last else dx2.reshape(saved.shape)
    return dx, grads[0], grads[1]
