"""SyncBatchNorm: BatchNorm whose training statistics are those of the whole batch, held in
slices by the processes of an MPI communicator (data-parallel training).

Forward, in training: each rank computes per-channel (count, mean, M2) of its slice
(BatchNorm's reduce and combine: the engine's Plan.moments); one collective gathers them, and
every rank merges the ranks' statistics in rank order with the engine's Chan merge
(toolkit.merge_moments), so every rank holds bitwise the same global mean and variance; then
BatchNorm's apply with those statistics. Backward: per-channel (sum dy, sum dy * (x - mean)) of
each slice (Plan.grad_sums), gathered and summed in rank order the same way; then BatchNorm's
combine and apply from those global sums (Plan.backward with given sums). The parameter
gradients are the global sums, identical on every rank. No step of the layer is written here a
second time: channels-last slices are read in place, as by BatchNorm.

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

from normcore import docstrings, grouped, toolkit
from normcore._kernels.engine import running_values
from normcore.batch_norm import (_BATCH_NORM_ATTRIBUTES, _BATCH_NORM_PARAMETERS, _BatchNorm, check_training_eps,
                                 commit_training_step)
from normcore.channel_norm import ChannelNorm
from normcore.module import check_writeable, write_arrays
from normcore.registry import register_norm
from normcore.threads import get_num_threads
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


def _grouping(x):
    """The per-channel grouping of a slice x (N, C, *): BatchNorm's."""
    return grouped.channel_grouping(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


class SyncRecord:
    """What a synchronised training forward keeps for backward: the engine's record of this
    slice's forward (grouped.Saved, None for an empty slice), the shape and dtype dy must have,
    the global statistics and count, and the weight used (float64)."""

    __slots__ = ("inner", "shape", "dtype", "mean", "rstd", "count", "weight")

    def __init__(self, inner, shape, dtype, mean, rstd, count, weight=None):
        self.inner, self.shape, self.dtype = inner, shape, dtype
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
        # the ranks' statistics merged in rank order: the engine's combine
        count, mean, m2 = toolkit.merge_moments(gathered[:, 1], gathered[:, 2:2 + C], gathered[:, 2 + C:])
        if count == 0:
            # An empty batch on every rank: as BatchNorm, an empty output, the counter counts it,
            # the running statistics stay; backward gives zeros.
            if self.track_running_stats:
                write_arrays([("num_batches_tracked", self.num_batches_tracked, int(self.num_batches_tracked) + 1)])
            self._saved = SyncRecord(None, x.shape, x.dtype, None, None, 0.0)
            return np.empty_like(x)
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} value(s) "
                             f"per channel over the {len(gathered)} ranks (input size {x.shape} here)")
        var = m2 / count
        inner = None
        if x.size:
            # the apply with the global statistics, as given ones: rstd = 1 / sqrt(var + eps)
            y, inner, _ = grouped.forward(x, _grouping(x), self.weight, self.bias, self.eps, get_num_threads(),
                                          stats=(mean, var))
            inner.batch_stats = True  # the statistics are the batch's: backward differentiates them
            rstd, weight = inner.rstd, inner.weight
        else:
            y = np.empty_like(x)
            rstd = 1.0 / np.sqrt(var + self.eps)  # the bits of the engine's
            weight = np.ones(C) if self.weight is None else self.weight.astype(np.float64)
        # Every rank got the same statistics: commit the state.
        if self.track_running_stats:
            count_steps = int(self.num_batches_tracked) + 1
            factor = 1.0 / count_steps if self.momentum is None else self.momentum
            commit_training_step(self, count_steps,
                                 running_values(self.running_mean, self.running_var, mean, m2, factor, count))
        self._saved = SyncRecord(inner, x.shape, x.dtype, mean, rstd, count, weight)
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
        """(count, mean[C], M2[C]) of this rank's slice: BatchNorm's reduce and combine."""
        N, C = x.shape[:2]
        L = math.prod(x.shape[2:])
        if x.size == 0:
            return 0.0, np.zeros(C), np.zeros(C)
        mean, m2 = grouped.moments(x, _grouping(x), get_num_threads())
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
        try:  # as in forward: any exception here is a refusal the other ranks hear of
            dy = check_grad_output(dy, saved.shape, saved.dtype)
            if saved.inner is not None:
                local[1:] = grouped.grad_sums(dy, saved.inner, get_num_threads()).ravel()
            local[0] = 1.0
        except Exception as exc:  # noqa: BLE001 - re-raised after the collective
            error = exc
        gathered = self._gather(local)
        self._raise_if_refused(gathered[:, 0], error)
        sums = np.zeros(2 * C)
        for row in gathered:  # rank order: the same sums on every rank
            sums += row[1:]
        sums = sums.reshape(2, C)
        if saved.inner is not None:
            # the combine and apply of the whole batch's backward on this slice
            dx, dweight, dbias = grouped.backward(dy, saved.inner, get_num_threads(), sums, saved.count)
        else:
            dx = np.zeros(saved.shape, saved.dtype)
            dweight, dbias = sums[1] * saved.rstd, sums[0]
        if self.local_parameter_grads:  # this rank's share: (sum dy * xhat, sum dy) over its slice
            self._store_grads({"weight": local[1 + C:] * saved.rstd, "bias": local[1:1 + C]})
        else:
            self._store_grads({"weight": dweight, "bias": dbias})
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
