"""Forward and forward + backward of each layer: normcore next to PyTorch (CPU), same thread
count, same input. Read as a comparison with

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

(CI runs this file with --benchmark-disable, which runs each body once: the harness is tested.)
"""
import numpy as np
import pytest

import normcore as nc

torch = pytest.importorskip("torch")

LAYERS = {
    "batch_norm2d": (lambda C: nc.BatchNorm2d(C), lambda C: torch.nn.BatchNorm2d(C)),
    "instance_norm2d": (lambda C: nc.InstanceNorm2d(C, affine=True), lambda C: torch.nn.InstanceNorm2d(C, affine=True)),
    "group_norm": (lambda C: nc.GroupNorm(8 if C % 8 == 0 else 1, C), lambda C: torch.nn.GroupNorm(8 if C % 8 == 0 else 1, C)),
    "layer_norm": (lambda C: nc.LayerNorm(C), lambda C: torch.nn.LayerNorm(C)),
    "local_response_norm": (lambda C: nc.LocalResponseNorm(5), lambda C: torch.nn.LocalResponseNorm(5)),
}
SHAPES = {
    "batch_norm2d": [(2, 3, 4, 4), (32, 64, 56, 56), (32, 256, 14, 14)],
    "instance_norm2d": [(2, 3, 4, 4), (32, 64, 56, 56), (32, 256, 14, 14)],
    "group_norm": [(2, 8, 4, 4), (32, 64, 56, 56), (32, 256, 14, 14)],
    "layer_norm": [(8192, 768)],
    "local_response_norm": [(2, 3, 4, 4), (16, 96, 27, 29)],
}
CASES = [(layer, shape) for layer in LAYERS for shape in SHAPES[layer]]


def _setup(layer, shape, impl, rng):
    x = rng.standard_normal(shape, dtype=np.float32)
    C = shape[-1] if layer == "layer_norm" else shape[1]
    make_nc, make_torch = LAYERS[layer]
    if impl == "normcore":
        return make_nc(C), x
    return make_torch(C), torch.from_numpy(x)


@pytest.mark.parametrize("impl", ["normcore", "torch"])
@pytest.mark.parametrize("layer,shape", CASES, ids=[f"{l}-{'x'.join(map(str, s))}" for l, s in CASES])
def test_forward_train(benchmark, threads, rng, layer, shape, impl):
    benchmark.group = f"forward {layer} {shape} threads={threads}"
    m, x = _setup(layer, shape, impl, rng)
    if impl == "torch":
        with torch.no_grad():
            benchmark(m, x)
    else:
        benchmark(m, x)


@pytest.mark.parametrize("impl", ["normcore", "torch"])
@pytest.mark.parametrize("layer,shape", CASES, ids=[f"{l}-{'x'.join(map(str, s))}" for l, s in CASES])
def test_forward_backward(benchmark, threads, rng, layer, shape, impl):
    benchmark.group = f"forward+backward {layer} {shape} threads={threads}"
    m, x = _setup(layer, shape, impl, rng)
    if impl == "torch":
        x.requires_grad_(True)
        dy = torch.ones(shape)

        def step():
            x.grad = None
            m.zero_grad(set_to_none=True)
            m(x).backward(dy)
    else:
        dy = np.ones(shape, np.float32)

        def step():
            m(x)
            m.backward(dy)

    benchmark(step)
