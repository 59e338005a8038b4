"""normcore: fast, exact CPU normalization layers for NumPy arrays, with PyTorch's semantics.

    import numpy as np, normcore as nc
    bn = nc.BatchNorm2d(3)
    y = bn(x)                  # x: (N, 3, H, W) float32 or float64
    dx = bn.backward(dy)       # bn.grads["weight"], bn.grads["bias"]
"""
try:
    from normcore._kernels import openmp_info as _openmp_info  # noqa: F401 - checks the build
except ImportError as _exc:  # pragma: no cover - depends on how normcore was installed
    raise ImportError(
        "normcore's compiled kernels (normcore._kernels) cannot be imported. Inside a source "
        "checkout, build them in place with `pip install -e .` (a plain `pip install .` installs "
        "a built copy elsewhere, which this source folder shadows when Python runs from it)."
    ) from _exc

from normcore import functional, toolkit
from normcore.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normcore.group_norm import GroupNorm
from normcore.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normcore.layer_norm import LayerNorm
from normcore.local_response_norm import LocalResponseNorm
from normcore.module import Module
from normcore.sync_batch_norm import SyncBatchNorm
from normcore.registry import (
    DuplicateNormError,
    PluginLoadError,
    RegistryError,
    UnknownNormError,
    create_norm,
    get_norm,
    list_norms,
    register_norm,
)
from normcore.threads import get_num_threads, instruction_set, openmp_enabled, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "Module",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "GroupNorm",
    "LocalResponseNorm",
    "SyncBatchNorm",
    "functional",
    "toolkit",
    "register_norm",
    "get_norm",
    "create_norm",
    "list_norms",
    "RegistryError",
    "UnknownNormError",
    "DuplicateNormError",
    "PluginLoadError",
    "set_num_threads",
    "get_num_threads",
    "instruction_set",
    "openmp_enabled",
]


def __getattr__(name):
    # normcore.plugins is imported on first use: its plugins import normcore themselves.
    if name == "plugins":
        import importlib

        return importlib.import_module("normcore.plugins")
    raise AttributeError(f"module 'normcore' has no attribute {name!r}")
