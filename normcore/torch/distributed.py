"""SyncBatchNorm on the CPU over torch.distributed (gloo), which ``torch.nn.SyncBatchNorm``
refuses ("SyncBatchNorm expected input tensor to be on GPU").

The algorithm is normcore's (``sync_batch_norm.GatheredBatchNorm``): in training each rank
gathers every rank's per-channel (count, mean, M2) with one all_gather and merges them in
rank order, so every rank holds bitwise the same statistics, running statistics and parameter
gradients, whatever the batch sizes (zero included); a rank that refuses its input tells the
others through the same collective, and every rank raises instead of waiting forever. Here
the collective is ``torch.distributed.all_gather`` on the module's process group.
"""
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normcore.sync_batch_norm import GatheredBatchNorm
from normcore.torch._ops import array, dense
from normcore.torch.functional import check_tensors
from normcore.torch.layers import TWINS, BatchNormForward, check_cpu
from normcore.torch.wrap import run_layer

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _group(process_group):
    return dist.group.WORLD if process_group is None else process_group


class _GatherOverTorch(GatheredBatchNorm):
    """normcore's synchronised BatchNorm whose collective is torch.distributed's all_gather;
    it takes the torch input itself, so that even the tensor checks (device, dtype) happen
    inside the step that tells the other ranks of a refusal. The parameter gradients are this
    rank's share, as torch.nn.SyncBatchNorm's: DistributedDataParallel averages them."""

    local_parameter_grads = True

    def __init__(self, num_features, process_group):
        super().__init__(num_features)
        self.process_group = process_group

    def _checked(self, x):
        check_tensors("SyncBatchNorm", x)
        return super()._checked(array(dense(x)))

    def _gather(self, local):
        group = _group(self.process_group)
        rows = [torch.empty(local.size, dtype=torch.float64) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, torch.from_numpy(np.ascontiguousarray(local)), group=group)
        return torch.stack(rows).numpy()


class SyncBatchNorm(BatchNormForward, _BatchNorm):
    """``torch.nn.SyncBatchNorm`` on the CPU over torch.distributed, on normcore's kernels.

    The constructor, parameters, buffers, state_dict keys and modes of
    ``torch.nn.SyncBatchNorm``, with ``process_group`` the group whose ranks share the batch
    (None: the default group). Not a subclass of it, unlike normcore's other layers:
    DistributedDataParallel refuses any torch.nn.SyncBatchNorm in a CPU module ("SyncBatchNorm
    layers only work with GPU modules"); like it, a subclass of torch's ``_BatchNorm``. In
    training with more than one rank, the statistics are those of the whole batch, bitwise the
    same on every rank, and the parameter gradients this rank's share of the whole batch's (as
    torch's: DistributedDataParallel averages them); in eval, or outside a process group, a
    plain BatchNorm of the rank's slice.
    Every rank must run the same forwards and backwards. ``torch.compile`` runs the
    synchronised step eagerly (a graph break); the local one is compiled as BatchNorm.
    """

    torch_class = nn.SyncBatchNorm

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _engine(self):
        """The NumPy layer that runs the synchronised step (made on first use: a layer converted
        by changing its class has none yet), with this module's arguments."""
        engine = self.__dict__.get("_normcore_engine")
        if engine is None:
            engine = _GatherOverTorch(self.num_features, self.process_group)
            self.__dict__["_normcore_engine"] = engine
        engine.eps, engine.momentum = self.eps, self.momentum
        engine.affine, engine.track_running_stats = self.affine, self.track_running_stats
        engine.process_group = self.process_group
        return engine

    def forward(self, input):
        # torch's rule: synchronised in training inside a process group of more than one rank.
        # Then every check of the input happens inside the collective step (a refusal on one
        # rank must reach the others), so none comes before it.
        need_sync = self.training and dist.is_available() and dist.is_initialized()
        if need_sync and dist.get_world_size(_group(self.process_group)) > 1:
            return self._synchronised_forward(input)
        return super().forward(input)  # local: normcore.torch.BatchNorm2d's step

    @torch.compiler.disable
    def _synchronised_forward(self, input):
        return run_layer(self, self._engine(), input, input)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_normcore_engine", None)  # remade on first use (it holds a process group)
        return state


TWINS[nn.SyncBatchNorm] = SyncBatchNorm


def convert_sync_batchnorm(module, process_group=None):
    """Every BatchNorm of `module` (torch's BatchNorm1d/2d/3d and SyncBatchNorm, normcore's
    twins) made a normcore SyncBatchNorm over `process_group`, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does; the same parameter and buffer
    objects, in place. Returns `module` (itself converted when it is a BatchNorm)."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    found = [m for m in module.modules() if type(m) in kinds or type(m) in {TWINS[k] for k in kinds}]
    for m in found:
        check_cpu(m)
    for m in found:
        m.__class__ = SyncBatchNorm
        m.process_group = process_group
    return module
