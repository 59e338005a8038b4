"""SyncBatchNorm: BatchNorm whose training statistics are those of the whole batch, held in
slices by the processes of an MPI communicator (data-parallel training).

Forward, in training: each rank computes per-channel (count, mean, M2) of its slice (one pass
of the row-moments kernel, then Chan's merge over its rows); one collective gathers them, and
every rank merges the ranks' statistics in rank order with Chan's formula, so every rank holds
bitwise the same global mean and variance; then the usual apply. Backward: per-channel
(sum dy, sum dy * (x - mean)) of each slice, gathered and summed in rank order the same way;
the parameter gradients are the global sums, identical on every rank.

The collective is an Allgather of each rank's 2*C + 2 numbers (a flag, the count, C means, C M2s;
backward a flag and 2*C sums), not an Allreduce: the rank-order merge is then done by each rank
itself, so the result is the same on every rank and for every MPI implementation and reduction
tree. The flag lets a rank whose input is refused tell the others: every rank then raises
(the refusing one its own error, the others RuntimeError) instead of waiting in a collective
forever, and no rank changes any state. Any exception counts as a refusal (a TypeError for the
dtype, a ValueError for the shape, the RuntimeError a torch tensor that requires grad raises when
viewed as an array, a MemoryError, ...): whatever a rank raises before the collective, it still
takes part in it.

Eval, and training without running statistics outside training mode, are local (as PyTorch).
Every rank must call forward and backward the same number of times, in the same mode.
mpi4py is imported only when a SyncBatchNorm is made: `import normcore` does not need it.
"""
import math

import numpy as np

from normcore import docstrings, toolkit
from normcore.batch_norm import _BATCH_NORM_ATTRIBUTES, _BATCH_NORM_PARAMETERS, _BatchNorm, check_training_eps
from normcore.channel_norm import ChannelNorm
from normcore.module import check_writeable, write_arrays
from normcore.registry import register_norm
from normcore.validation import as_float_array, check_grad_output

__all__ = ["SyncBatchNorm", "GatheredBatchNorm"]

MPI_HINT = ('SyncBatchNorm needs mpi4py and an MPI library: pip install mpi4py mpich '
            '(the "mpi" extra of normcore-nn)')


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"{MPI_HINT} ({exc})") from exc
    return MPI


def merge_in_rank_order(counts, means, m2s):
    """Chan's merge of per-rank (count, mean[C], M2[C]), rank 0 first: (count, mean, M2)."""
    n = 0.0
    mean = np.zeros(means.shape[1])
    m2 = np.zeros(means.shape[1])
    for n_b, mean_b, m2_b in zip(counts, means, m2s):
        if n_b == 0:
            continue
        total = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (n * n_b / total)
        n = total
    return n, mean, m2


def _rows_view(a):
    """(N, C) as (N, C, 1): the toolkit's (N, C, *) rows."""
    return a if a.ndim > 2 else a[:, :, None]


class SyncRecord:
    """What a synchronised training forward keeps for backward."""

    __slots__ = ("x", "shape", "dtype", "mean", "rstd", "count", "weight")

    def __init__(self, x, shape, dtype, mean, rstd, count, weight=None):
        self.x, self.shape, self.dtype = x, shape, dtype
        self.mean, self.rstd, self.count = mean, rstd, count
        self.weight = weight  # a float64 copy made at forward (backward differentiates that forward)


_SYNC_BATCH_NORM_DOC = """Batch Normalization over the batches of all MPI ranks, as ``torch.nn.SyncBatchNorm``.

    In data-parallel training every process (rank) holds a slice of the batch. In training,
    SyncBatchNorm gives every rank the output, running statistics and parameter gradients of
    one BatchNorm over the concatenated batch, bitwise the same on every rank: forward gathers
    each rank's per-channel (count, mean, M2) with one Allgather and every rank merges them in
    rank order (Chan's formula); backward gathers the per-channel sums of ``dy`` and
    ``dy * (x - mean)`` the same way, and ``grads`` are the global sums. Ranks may hold
    different batch sizes, zero included. Eval, and batch statistics outside training (with
    ``track_running_stats=False``), are local: a BatchNorm of the rank's slice. mpi4py is imported when a SyncBatchNorm is made, not by ``import normcore``.

    Parameters
    ----------
{parameters}
    comm : mpi4py.MPI.Comm or None, default None
        The communicator whose ranks share the batch (torch's ``process_group``); None means
        ``MPI.COMM_WORLD``.
{channel_options}

    Attributes
    ----------
{attributes}
    comm : mpi4py.MPI.Comm
        The communicator.

    Shape
    -----
    - Input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), N this rank's share of the
      batch (0 allowed) and C = num_features
    - Output: the input's shape (and dtype)

    Raises
    ------
    ImportError
        At construction, mpi4py cannot be imported (``pip install mpi4py mpich``, the "mpi"
        extra).
    TypeError
        At construction, ``comm`` is not an mpi4py communicator; at forward, input of another
        dtype than float32 or float64.
    ValueError
        At forward, as BatchNorm's: input of fewer than 2 or more than 5 dims, a channel count
        other than ``num_features``, ``eps == 0`` in training, or a single value per channel
        over all the ranks' batches.
    RuntimeError
        In training, another rank refused its input or ``dy``: every rank raises (the refusing
        rank its own error) instead of waiting forever in the collective, and none changes any
        state.

    Notes
    -----
    Every rank must call forward and backward the same number of times, in the same mode.
    What crosses the network per layer and step: forward one Allgather of 2 * C + 2 float64
    per rank (a flag, the count, C means, C sums of squares), backward one of 2 * C + 1.
    Merging the gathered numbers in rank order on every rank makes the result independent of
    the MPI library and its reduction tree. The mode rules and momentum are BatchNorm's (see
    ``nc.BatchNorm2d``). Convert an existing layer with ``SyncBatchNorm.from_batch_norm``.

    Examples
    --------
    Run with ``mpiexec -n 4 python train.py``; each rank normalizes its slice with the
    statistics of the four slices:

    >>> from mpi4py import MPI                                  # doctest: +SKIP
    >>> rank = MPI.COMM_WORLD.Get_rank()                        # doctest: +SKIP
    >>> x = np.random.default_rng(rank).standard_normal((8, 16, 7, 7))  # doctest: +SKIP
    >>> m = nc.SyncBatchNorm(16)                                # doctest: +SKIP
    >>> y = m(x)                                                # doctest: +SKIP
    >>> dx = m.backward(np.ones_like(y))  # m.grads: global sums  # doctest: +SKIP
    >>> m = nc.SyncBatchNorm.from_batch_norm(nc.BatchNorm2d(16))  # doctest: +SKIP
    """


class GatheredBatchNorm(_BatchNorm):
    """SyncBatchNorm's algorithm over any transport: a subclass gives ``_gather(local)``, which
    returns the row vectors `local` of every rank, rank 0 first, as a (ranks, len(local))
    float64 array (an Allgather), and every rank must call it the same number of times.

    SyncBatchNorm gathers over MPI; normcore.torch.SyncBatchNorm over torch.distributed.
    """

    _dims = (2, 3, 4, 5)
    # The parameter gradients: the global batch's (False: every rank holds the sums over all
    # slices) or this rank's slice's (True: torch.nn.SyncBatchNorm's, for DistributedDataParallel,
    # whose all-reduce then averages them over the ranks as it does every other gradient).
    local_parameter_grads = False

    def _gather(self, local):
        raise NotImplementedError(f"{type(self).__name__} does not implement _gather(local)")

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x):
        """y for this rank's slice x (N, C, *). In training, with the statistics of every rank's
        slice (a collective every rank must join) and the running statistics updated; in eval,
        local, as BatchNorm."""
        if not self.training:
            return super().forward(x)  # eval: local, as BatchNorm
        C = self.num_features
        local = np.zeros(2 + 2 * C)
        error = None
        try:  # anything this rank raises is sent as a refusal: the other ranks must not wait
            x = self._checked(x)
            local[1], local[2:2 + C], local[2 + C:] = self._local_moments(x)
            local[0] = 1.0
        except Exception as exc:  # noqa: BLE001 - re-raised after the collective
            error = exc
        gathered = self._gather(local)
        self._raise_if_refused(gathered[:, 0], error)
        count, mean, m2 = merge_in_rank_order(gathered[:, 1], gathered[:, 2:2 + C], gathered[:, 2 + C:])
        if count == 0:
            # An empty batch on every rank: as BatchNorm, an empty output, the counter counts it,
            # the running statistics stay; backward gives zeros.
            if self.track_running_stats:
                write_arrays([("num_batches_tracked", self.num_batches_tracked, int(self.num_batches_tracked) + 1)])
            self._saved = SyncRecord(x, x.shape, x.dtype, None, None, 0.0)
            return np.empty_like(x)
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} value(s) "
                             f"per channel over the {len(gathered)} ranks (input size {x.shape} here)")
        var = m2 / count
        rstd = 1.0 / np.sqrt(var + self.eps)
        weight = np.ones(C) if self.weight is None else self.weight.astype(np.float64)
        bias = 0.0 if self.bias is None else self.bias.astype(np.float64)
        y = toolkit.apply_rows(_rows_view(x), mean, rstd * weight, bias).reshape(x.shape) if x.size \
            else np.empty_like(x)
        # Every rank got the same statistics: commit the state.
        if self.track_running_stats:
            count_steps = int(self.num_batches_tracked) + 1
            factor = 1.0 / count_steps if self.momentum is None else self.momentum
            unbiased = m2 / (count - 1)
            write_arrays([
                ("num_batches_tracked", self.num_batches_tracked, count_steps),
                ("running_mean", self.running_mean, (1.0 - factor) * self.running_mean.astype(np.float64) + factor * mean),
                ("running_var", self.running_var, (1.0 - factor) * self.running_var.astype(np.float64) + factor * unbiased),
            ])
        self._saved = SyncRecord(x, x.shape, x.dtype, mean, rstd, count, weight)
        return y

    def _checked(self, x):
        """x as a float array, checked as BatchNorm checks a training input (raises otherwise)."""
        x = as_float_array(x)
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels (num_features) at dim 1, "
                             f"got {x.shape[1]} channels in input of shape {x.shape}")
        check_training_eps(self.eps)
        for name in self._buffer_names:  # checked before the collective: every rank commits, or none
            if getattr(self, name) is not None:
                check_writeable(name, getattr(self, name))
        return x

    @staticmethod
    def _local_moments(x):
        """(count, mean[C], M2[C]) of this rank's slice, rows merged with Chan's formula."""
        N, C = x.shape[:2]
        L = math.prod(x.shape[2:])
        if N * L == 0:
            return 0.0, np.zeros(C), np.zeros(C)
        row_mean, row_m2 = toolkit.row_moments(_rows_view(x))
        mean = row_mean.mean(axis=0)
        m2 = row_m2.sum(axis=0) + L * ((row_mean - mean) ** 2).sum(axis=0)
        return float(N * L), mean, m2

    def _raise_if_refused(self, flags, error):
        if error is not None:
            raise error
        refused = [rank for rank, ok in enumerate(flags) if ok != 1.0]
        if refused:
            raise RuntimeError(f"SyncBatchNorm: rank(s) {refused} refused their input; no rank changed any state")

    # -- backward ----------------------------------------------------------------------------
    def backward(self, dy):
        """dx for the last forward; after a training forward, a collective every rank must join,
        and ``grads`` are the sums over every rank's slice."""
        saved = self._require_forward()
        if not isinstance(saved, SyncRecord):
            return super().backward(dy)  # the last forward was local (eval)
        C = self.num_features
        if saved.count == 0:  # every rank's batch was empty: no collective on any rank
            check_grad_output(dy, saved.shape, saved.dtype)
            self._store_grads({"weight": np.zeros(C), "bias": np.zeros(C)})
            return np.zeros(saved.shape, saved.dtype)
        error = None
        local = np.zeros(1 + 2 * C)
        x = saved.x
        try:  # as in forward: any exception here is a refusal the other ranks hear of
            dy = check_grad_output(dy, saved.shape, saved.dtype)
            if x.size:
                s_dy, s_dyxc = toolkit.row_grad_sums(_rows_view(x), _rows_view(dy), saved.mean)
                local[1:1 + C] = s_dy.sum(axis=0)
                local[1 + C:] = s_dyxc.sum(axis=0)
            local[0] = 1.0
        except Exception as exc:  # noqa: BLE001 - re-raised after the collective
            error = exc
        gathered = self._gather(local)
        self._raise_if_refused(gathered[:, 0], error)
        sum_dy = np.zeros(C)
        sum_dyxc = np.zeros(C)
        for row in gathered:  # rank order: the same sums on every rank
            sum_dy += row[1:1 + C]
            sum_dyxc += row[1 + C:]
        rstd, M = saved.rstd, saved.count
        weight = saved.weight
        # dx = w * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)), the means over the global batch.
        a = weight * rstd
        b = -weight * rstd ** 3 * sum_dyxc / M
        c = -weight * rstd * sum_dy / M
        if x.size:
            dx = toolkit.apply_rows_backward(_rows_view(dy), _rows_view(x), a, saved.mean, b, c).reshape(saved.shape)
        else:
            dx = np.zeros(saved.shape, saved.dtype)
        if self.local_parameter_grads:  # this rank's share: (sum dy * xhat, sum dy) over its slice
            self._store_grads({"weight": local[1 + C:] * rstd, "bias": local[1:1 + C]})
        else:
            self._store_grads({"weight": sum_dyxc * rstd, "bias": sum_dy})
        return dx


@register_norm("sync_batch_norm")
class SyncBatchNorm(GatheredBatchNorm):
    __doc__ = docstrings.fill(_SYNC_BATCH_NORM_DOC, parameters=_BATCH_NORM_PARAMETERS,
                              attributes=_BATCH_NORM_ATTRIBUTES)


    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 comm=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        MPI = _mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py communicator (mpi4py.MPI.Comm), got {type(comm).__name__}")
        self.comm = comm

    @classmethod
    def from_batch_norm(cls, bn, comm=None):
        """A SyncBatchNorm with bn's arguments, mode and copies of its parameters and buffers.

        As torch's ``SyncBatchNorm.convert_sync_batchnorm`` does for each BatchNorm of a model.

        Parameters
        ----------
        bn : BatchNorm1d, BatchNorm2d or BatchNorm3d
            The layer to convert; it is left as it is.
        comm : mpi4py.MPI.Comm or None, default None
            The communicator (None: ``MPI.COMM_WORLD``).

        Returns
        -------
        SyncBatchNorm

        Raises
        ------
        TypeError
            `bn` is not a normcore BatchNorm1d, BatchNorm2d or BatchNorm3d.

        Examples
        --------
        >>> sync = nc.SyncBatchNorm.from_batch_norm(nc.BatchNorm2d(16).eval())  # doctest: +SKIP
        >>> sync.training                                                      # doctest: +SKIP
        False
        """
        if not isinstance(bn, ChannelNorm) or not isinstance(bn, _BatchNorm):
            raise TypeError(f"from_batch_norm expects a normcore BatchNorm1d/2d/3d, got {type(bn).__name__}")
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, comm=comm,
                   dtype=bn.dtype, bias=bn.bias is not None or not bn.affine)
        sync.load_state_dict(bn.state_dict())
        sync.train(bn.training)
        return sync

    def __repr__(self):
        return super().__repr__()[:-1] + f", comm size={self.comm.Get_size()})"

    def _gather(self, local):
        gathered = np.empty((self.comm.Get_size(), local.size))
        self.comm.Allgather(local, gathered)
        return gathered
