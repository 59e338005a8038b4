"""The benchmark matrix: which layer runs in which mode on which shape, and how many bytes of
memory traffic that takes at the least.

Layers (the names the command and the suite use):

    batch_norm           BatchNorm2d (BatchNorm1d for a 2-D shape)
    instance_norm        InstanceNorm2d(C, affine=True)
    group_norm           GroupNorm(G, C), G the largest of 32, 16, 8, 4, 2, 1 that divides C
    layer_norm           LayerNorm over (C, H, W) for a 4-D shape, over the last dim for rows
    local_response_norm  LocalResponseNorm(5)
    switchable_norm      create_norm("switchable_norm2d", C) (the plugin; Luo et al.'s algorithm)

Modes:

    train     training forward (batch statistics; running statistics updated)
    eval      eval forward with the running statistics: only for the layers that have them
              (batch_norm, switchable_norm); for the others eval is the same computation
    forward   the forward of a layer without running statistics (train == eval)
    fwd+bwd   training forward, then backward with a fixed dy (dx and the parameter gradients)

Useful memory traffic, the yardstick for GB/s. With B = x.nbytes (parameters and statistics,
O(C) or O(N*C) values, are ignored), the least traffic any implementation needs is

    forward that can compute its statistics and apply them while the data is still in cache
    (instance_norm, group_norm, layer_norm, local_response_norm forward; batch_norm and
    switchable_norm eval):                              read x + write y          = 2 B
    batch_norm and switchable_norm training forward (their statistics span the whole batch,
    so x is read once for them and once to apply):      2 reads of x + write y    = 3 B
    backward of the fused layers:                       read x, read dy, write dx = 3 B
    backward of batch_norm and switchable_norm (the gradient sums span the batch, so x and
    dy are read once for the sums and once to apply):   2 * 2 reads + write dx    = 5 B
    fwd+bwd = its training forward + its backward:      2 B + 3 B = 5 B, or 3 B + 5 B = 8 B

so `traffic_bytes(...) / time` is the throughput of useful traffic, comparable with a copy's
(which moves 2 bytes, one read and one write, per byte copied).
"""
from dataclasses import dataclass
from math import prod

__all__ = [
    "LAYERS",
    "MODES",
    "SHAPES",
    "ROW_SHAPES",
    "QUICK_SHAPES",
    "Case",
    "modes_for",
    "shapes_for",
    "group_count",
    "traffic_factor",
    "traffic_bytes",
    "all_cases",
]

LAYERS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "switchable_norm")
MODES = ("train", "eval", "forward", "fwd+bwd")

# Named 4-D shapes (N, C, H, W): the stages of a ResNet-50 at batch 32, a small batch, the seed
# example of the project notes.
SHAPES = {
    "early": (32, 64, 56, 56),
    "middle": (32, 256, 14, 14),
    "late": (32, 512, 7, 7),
    "small_batch": (2, 64, 56, 56),
    "seed": (2, 3, 4, 4),
}
# Transformer rows (tokens, features): layer_norm only, normalised over the last dim.
ROW_SHAPES = {
    "rows_768": (8192, 768),
    "rows_4096": (4096, 4096),
}
# The --quick subset (names from SHAPES and ROW_SHAPES).
QUICK_SHAPES = ("early", "late", "seed", "rows_768")

_RUNNING_STATS = ("batch_norm", "switchable_norm")  # layers whose eval forward differs
_BATCH_WIDE = ("batch_norm", "switchable_norm")     # statistics over the batch: no fused training pass


def modes_for(layer):
    """The modes benchmarked for `layer`."""
    _check_layer(layer)
    if layer in _RUNNING_STATS:
        return ("train", "eval", "fwd+bwd")
    return ("forward", "fwd+bwd")


def shapes_for(layer, quick=False):
    """The shapes benchmarked for `layer`, as a tuple of (name, shape)."""
    _check_layer(layer)
    named = dict(SHAPES)
    if layer == "layer_norm":
        named.update(ROW_SHAPES)
    if quick:
        return tuple((name, named[name]) for name in QUICK_SHAPES if name in named)
    return tuple(named.items())


def group_count(C):
    """GroupNorm's number of groups for C channels: the largest of 32, 16, 8, 4, 2, 1 dividing C."""
    for g in (32, 16, 8, 4, 2, 1):
        if C % g == 0:
            return g
    raise AssertionError("unreachable")  # pragma: no cover - 1 divides everything


def traffic_factor(layer, mode):
    """Useful traffic in units of x.nbytes (see the module docstring)."""
    _check_layer(layer)
    if mode not in modes_for(layer):
        raise ValueError(f"{layer} is not benchmarked in mode {mode!r}; its modes: {', '.join(modes_for(layer))}")
    batch_wide = layer in _BATCH_WIDE
    if mode == "eval" or mode == "forward":
        return 2
    training_forward = 3 if batch_wide else 2
    if mode == "train":
        return training_forward
    return training_forward + (5 if batch_wide else 3)  # fwd+bwd


def traffic_bytes(layer, mode, shape, itemsize=4):
    """Least memory traffic in bytes of one call of `layer` in `mode` on x of `shape`."""
    return traffic_factor(layer, mode) * prod(shape) * itemsize


@dataclass(frozen=True)
class Case:
    """One cell of the matrix."""

    layer: str
    mode: str
    shape: tuple
    shape_name: str = ""

    @property
    def numel(self):
        return prod(self.shape)

    def nbytes(self, itemsize=4):
        """Size of x in bytes."""
        return self.numel * itemsize

    def traffic_bytes(self, itemsize=4):
        return traffic_bytes(self.layer, self.mode, self.shape, itemsize)

    @property
    def shape_str(self):
        return "(" + ",".join(str(d) for d in self.shape) + ")"

    def __str__(self):
        return f"{self.layer} {self.mode} {self.shape_str}"


def all_cases(quick=False, layers=None):
    """Every (layer, mode, shape) of the matrix (or of the --quick subset), grouped by layer,
    then shape, then mode."""
    layers = LAYERS if layers is None else tuple(layers)
    for layer in layers:
        _check_layer(layer)
    return [Case(layer, mode, shape, name)
            for layer in layers
            for name, shape in shapes_for(layer, quick)
            for mode in modes_for(layer)]


def _check_layer(layer):
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; the layers are: {', '.join(LAYERS)}")
