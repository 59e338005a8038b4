"""normcore inside PyTorch models: torch.nn layers, ops and SyncBatchNorm on normcore's kernels.

    import normcore.torch as nct
    model = nct.convert(model)        # every torch norm layer -> its normcore twin
    model = nct.revert(model)         # and back (for export, or another device)

The layers are subclasses of torch's (the same constructor, parameters, buffers, state_dict
keys, modes and repr); their forward and backward run normcore's kernels on the tensors'
memory, through the ``torch.ops.normcore`` custom ops that ``torch.compile`` traces
(``normcore.torch._ops``). ``wrap`` makes any norm of the registry a torch module;
``SyncBatchNorm`` / ``convert_sync_batchnorm`` synchronise BatchNorm over torch.distributed on
the CPU. Needs torch (the "torch" extra); ``import normcore`` alone never imports it.
"""
try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('normcore.torch needs PyTorch: pip install torch (the "torch" extra of normcore-nn)') from exc

from normcore.torch import functional
from normcore.torch.convert import convert, revert
from normcore.torch.distributed import SyncBatchNorm, convert_sync_batchnorm
from normcore.torch.layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LocalResponseNorm,
)
from normcore.torch.wrap import NormLayer, wrap

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "LayerNorm", "GroupNorm", "LocalResponseNorm", "SyncBatchNorm", "NormLayer", "convert", "revert",
           "convert_sync_batchnorm", "wrap", "functional"]
