"""Text shared by the layers' docstrings (numpydoc), written once and formatted into each.

A layer's docstring is a template in its own module, with ``{eps}``, ``{device_dtype}``, ...
standing for the blocks below and other fields for what is the layer's own:

    class GroupNorm(Module):
        __doc__ = docstrings.fill(_GROUP_NORM_DOC)

The blocks are indented for a class's or a top-level function's docstring (four spaces).
"""

BLOCKS = {
    "eps": """\
    eps : float, default 1e-5
        Added to the variance under the square root, for numerical stability. Finite and
        >= 0.""",

    "device_dtype": """\
    device : None, "cpu" or torch.device("cpu"), default None
        Where the parameters and buffers live. normcore runs on the CPU: any other device
        raises ValueError (keep torch's own layer for it).
    dtype : None, np.float32, np.float64, torch.float32 or torch.float64, default None
        The dtype of the parameters, buffers and gradients; None means float32, as torch.
        torch's dtypes are read by name (normcore does not import torch); any other dtype
        raises TypeError. It does not restrict the input's dtype.""",

    "channel_bias": """\
    bias : bool, default True, keyword-only
        With ``affine=True``, False gives a ``weight`` but no ``bias`` parameter (``bias`` is
        None), as torch 2.x. No effect without ``affine``.""",

    "affine_attributes": """\
    weight, bias : ndarray of shape (C,), or None
        The learnable parameters: None without ``affine`` (``bias`` also with ``bias=False``).""",

    "training_grads": """\
    training : bool
        The mode: True after construction and ``train()``, False after ``eval()``.
    grads : dict
        Parameter name -> its gradient (the parameter's shape and dtype), set by each
        ``backward``; empty for a layer without parameters.""",

    "type_error": """\
    TypeError
        Input of another dtype than float32 or float64, or a constructor argument of the
        wrong type.""",

    "layer_rules": """\
    Input is float32 or float64 (a Python sequence is converted; any other dtype raises
    TypeError); the output has the input's dtype, whatever ``dtype`` the parameters have.
    ``backward(dy)`` returns dx for the last forward and fills ``grads``; it differentiates
    the forward that ran, with its input and the parameters as they were at that forward,
    and may be called more than once. That input must not be modified in place before the
    backward. A call that raises changes no state, and the shape errors that torch raises
    as RuntimeError are ValueError here. A pickled or copied layer does not carry its last
    forward: its ``backward`` raises RuntimeError until it has run a forward itself.""",
}

# The constructor arguments that end BatchNorm's, InstanceNorm's and GroupNorm's signatures.
BLOCKS["channel_options"] = BLOCKS["device_dtype"] + "\n" + BLOCKS["channel_bias"]

# Notes of a layer that has no mode rules to state first.
BLOCKS["layer_notes"] = "    Notes\n    -----\n" + BLOCKS["layer_rules"]


def fill(template, **fields):
    """`template` with the shared ``BLOCKS`` and the given `fields` formatted in (None, a
    docstring that ``python -OO`` removed, stays None)."""
    if template is None:
        return None
    return template.format(**BLOCKS, **fields)
