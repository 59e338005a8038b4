"""normcore's layers as ``torch.nn`` modules: subclasses of torch's own norm layers that keep
everything of them (constructor signature, parameters, buffers, ``state_dict`` keys, ``repr``,
``train`` / ``eval``, ``reset_parameters``, torch's input checks and warnings) and replace
only the computation with normcore's kernels (``normcore.torch.functional``).

Being subclasses, they are what torch code expects of a norm layer (``isinstance(m,
torch.nn.BatchNorm2d)`` holds), and ``convert`` turns a torch layer into its twin, and
``revert`` back, by changing the object's class: the parameters stay the same objects.
"""
import inspect

from torch import nn

from normcore.torch import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "LayerNorm", "GroupNorm", "LocalResponseNorm", "NormcoreLayer", "TWINS"]


class NormcoreLayer:
    """What normcore's torch layers share: the torch class each one stands for
    (``torch_class``), its signature, and CPU-only construction."""

    torch_class = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.torch_class is not None:
            cls.__signature__ = inspect.signature(cls.torch_class)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_cpu(self)


def check_cpu(module):
    """ValueError unless every parameter and buffer of `module` is on the CPU."""
    for name, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
        if t.device.type != "cpu":
            raise ValueError(
                f"normcore.torch.{type(module).__name__} runs on the CPU, got {name} on {t.device}; keep "
                f"torch.nn.{type(module).__name__} for {t.device.type}")


def _doc(name, what):
    return (f"``torch.nn.{name}`` computed by normcore's kernels: {what}\n\n"
            f"    The same constructor, parameters, buffers, state_dict keys and modes as ``torch.nn.{name}``\n"
            f"    (a subclass of it); CPU tensors of float32 or float64. See ``normcore.{name}`` for the\n"
            f"    computation and its guarantees.\n")


# -- BatchNorm ------------------------------------------------------------------------------------
class BatchNormForward(NormcoreLayer):
    def forward(self, input):
        """torch's _BatchNorm.forward on normcore's batch_norm; the batch is counted
        (``num_batches_tracked``) after it succeeded, so a refused input changes no state.
        Also SyncBatchNorm's step outside a process group (and in eval)."""
        self._check_input_dim(input)
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if counting and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        y = F.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        if counting:
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(BatchNormForward, nn.BatchNorm1d):
    __doc__ = _doc("BatchNorm1d", "statistics per channel over (N, L) of (N, C) or (N, C, L) input.")
    torch_class = nn.BatchNorm1d


class BatchNorm2d(BatchNormForward, nn.BatchNorm2d):
    __doc__ = _doc("BatchNorm2d", "statistics per channel over (N, H, W) of (N, C, H, W) input.")
    torch_class = nn.BatchNorm2d


class BatchNorm3d(BatchNormForward, nn.BatchNorm3d):
    __doc__ = _doc("BatchNorm3d", "statistics per channel over (N, D, H, W) of (N, C, D, H, W) input.")
    torch_class = nn.BatchNorm3d


# -- InstanceNorm: torch's forward (checks, warning, unbatched input) around normcore's op -------
class _InstanceNorm(NormcoreLayer):
    def _apply_instance_norm(self, input):
        return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats,
                               self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _doc("InstanceNorm1d", "statistics per (sample, channel) of (N, C, L) or (C, L) input.")
    torch_class = nn.InstanceNorm1d


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _doc("InstanceNorm2d", "statistics per (sample, channel) of (N, C, H, W) or (C, H, W) input.")
    torch_class = nn.InstanceNorm2d


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _doc("InstanceNorm3d", "statistics per (sample, channel) of (N, C, D, H, W) or (C, D, H, W) input.")
    torch_class = nn.InstanceNorm3d


# -- LayerNorm, GroupNorm, LocalResponseNorm ---------------------------------------------------
class LayerNorm(NormcoreLayer, nn.LayerNorm):
    __doc__ = _doc("LayerNorm", "statistics per row over the trailing normalized_shape dims.")
    torch_class = nn.LayerNorm

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(NormcoreLayer, nn.GroupNorm):
    __doc__ = _doc("GroupNorm", "statistics per (sample, group of C / num_groups channels).")
    torch_class = nn.GroupNorm

    def forward(self, input):
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LocalResponseNorm(NormcoreLayer, nn.LocalResponseNorm):
    __doc__ = _doc("LocalResponseNorm", "each value divided by a power of its neighbours' squares across channels.")
    torch_class = nn.LocalResponseNorm

    def forward(self, input):
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)


# torch class -> its normcore twin, for convert (and revert, the other way).
TWINS = {cls.torch_class: cls for cls in (BatchNorm1d, BatchNorm2d, BatchNorm3d, InstanceNorm1d, InstanceNorm2d,
                                           InstanceNorm3d, LayerNorm, GroupNorm, LocalResponseNorm)}
