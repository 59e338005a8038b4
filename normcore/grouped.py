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


def forward(x, grouping, weight, bias, eps, n_threads, stats=None):
    """Normalise x (N, C, *) over the groups of `grouping`, in x's layout (NCHW rows, or
    channels-last memory read in place: y is channels-last too).

    stats: None to use the statistics of x, or per-channel (mean, var) to use given ones
    (running statistics; `grouping` must then be per channel).
    Returns (y, saved, batch_stats or None).
    """
    g = grouping
    w = _f64(weight, g.C, 1.0)
    x2 = rows_of(x, g)
    plan = plan_of(g, n_threads, x2.ndim == 3)
    if stats is None:
        y2, st = plan.forward(x2, w, bias, eps)
        rows = (st[0], st[1]) if g.k == 1 else (None, None)
        batch = BatchStats(*rows, st[0], st[1])
    else:
        y2, st = plan.forward(x2, w, bias, eps, *stats)
        batch = None
    saved = Saved(x2, x.shape, g, st[0], st[2], w, stats is None)
    y = channels_last_like(y2, x.shape) if x2.ndim == 3 else y2.reshape(x.shape)
    return y, saved, batch


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


def backward(dy, saved, n_threads):
    """dx, dweight, dbias (float64 per channel) for the forward that produced `saved`: one call
    of the engine (gradient sums, combine and apply), in the layout of that forward's x."""
    g = saved.grouping
    x2 = saved.x2
    if x2.ndim == 3:
        # channels-last forward: dy in the same layout (a copy only if dy is not)
        dy2 = np.ascontiguousarray(np.moveaxis(dy, 1, -1)).reshape(x2.shape)
    else:
        dy2 = as_rows(dy, g.N, g.C)
    plan = plan_of(g, n_threads, x2.ndim == 3)
    dx2, grads = plan.backward(x2, dy2, saved.mean, saved.rstd, saved.weight, saved.batch_stats)
    dx = channels_last_like(dx2, saved.shape) if x2.ndim == 3 else dx2.reshape(saved.shape)
    return dx, grads[0], grads[1]
