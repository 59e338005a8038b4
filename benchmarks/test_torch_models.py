"""Whole PyTorch training steps, torch's norm layers against normcore.torch's (the models of
benchmarks/torch_models.py), at 1 thread and all cores. Read as a comparison with

    pytest benchmarks/test_torch_models.py --benchmark-only --benchmark-group-by=group

CI runs the bodies once (--benchmark-disable) on small sizes; a timed run uses the full sizes
(NORMCORE_BENCH_FULL=1). `python benchmarks/torch_models.py` prints the same comparison as
median step times and ratios, and the per-call cost of the bridge.
"""
import os

import pytest

torch = pytest.importorskip("torch", reason="the training-step benchmarks compare torch's layers with normcore.torch")

import torch_models  # noqa: E402 - after the torch check

SIZES = torch_models.MODELS if os.environ.get("NORMCORE_BENCH_FULL") else torch_models.SMALL


@pytest.mark.parametrize("variant", ["torch", "normcore"])
@pytest.mark.parametrize("model", list(torch_models.MODELS))
def test_training_step(benchmark, threads, model, variant):
    ref, converted, x, target = torch_models.pair(model, SIZES)
    benchmark.group = f"{model} training step threads={threads}"
    step = torch_models.make_step(ref if variant == "torch" else converted, x, target)
    step()
    benchmark(step)
