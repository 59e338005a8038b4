"""convert: a torch model's norm layers made normcore's twins; revert: back to torch's.

Both change the class of each layer object and nothing else: the parameters, buffers, hooks,
mode and ``requires_grad`` are the layer's own, untouched, and an optimizer built on the model
before the change keeps working (with ``inplace=True``). Only layers of exactly torch's classes
are converted (a user's subclass of torch.nn.BatchNorm2d keeps its own forward).
"""
import copy

from normcore.torch.layers import TWINS, NormcoreLayer, check_cpu

__all__ = ["convert", "revert"]


def _swap(model, inplace, pick):
    if not inplace:
        model = copy.deepcopy(model)
    found = [(m, pick(m)) for m in model.modules()]
    found = [(m, cls) for m, cls in found if cls is not None]
    for m, cls in found:
        if issubclass(cls, NormcoreLayer):
            check_cpu(m)  # every layer checked before any is changed
    for m, cls in found:
        m.__class__ = cls
    return model


def convert(model, inplace=False):
    """Replace every torch norm layer of `model` by its normcore twin.

    BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, LocalResponseNorm and
    SyncBatchNorm (which then runs on the CPU over torch.distributed) become the
    ``normcore.torch`` layers of the same names, with their state, mode and ``requires_grad``.

    Parameters
    ----------
    model : torch.nn.Module
        The model (or a single layer).
    inplace : bool, default False
        Change `model` itself (its layer objects keep their identity, so optimizers built on
        its parameters keep working); False converts a deep copy.

    Returns
    -------
    torch.nn.Module
        The converted model.

    Raises
    ------
    ValueError
        A norm layer has parameters or buffers off the CPU; nothing is converted.

    Examples
    --------
    >>> import torch, normcore.torch as nct
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> fast = nct.convert(model)
    >>> type(fast[1]).__module__, type(model[1]).__module__
    ('normcore.torch.layers', 'torch.nn.modules.batchnorm')
    >>> type(nct.revert(fast)[1]) is torch.nn.BatchNorm2d
    True
    """
    return _swap(model, inplace, lambda m: TWINS.get(type(m)))


def revert(model, inplace=False):
    """Give every normcore.torch layer of `model` its torch class back (``torch.nn.BatchNorm2d``
    for ``normcore.torch.BatchNorm2d``, ...): for export (ONNX, TorchScript) or for a device
    normcore does not run on. The inverse of ``convert``; wrapped registry norms
    (``normcore.torch.wrap``), which torch has no class for, stay as they are.

    Parameters
    ----------
    model : torch.nn.Module
    inplace : bool, default False
        Change `model` itself; False reverts a deep copy.

    Returns
    -------
    torch.nn.Module
    """
    return _swap(model, inplace, lambda m: m.torch_class if isinstance(m, NormcoreLayer) else None)
