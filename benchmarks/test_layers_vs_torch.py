"""Every layer, mode and shape of the benchmark matrix (benchmarks.harness.cases) with every
implementation (benchmarks.harness.peers: normcore, torch, onnxruntime, numpy) at 1 thread and at
all cores, the same input for all. Read as a comparison with

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

An implementation that is not installed is skipped with the reason (CI installs them all);
modes an implementation does not have (ONNX Runtime has no training) are not generated. CI runs the suite with --benchmark-disable, which runs
each body once so that the harness is tested (about a minute on 2 cores, the whole matrix).
`python -m benchmarks.harness` times the same matrix with its own runner and reports GB/s.
"""
import numpy as np
import pytest

from benchmarks.harness import cases, peers

# Only the (case, implementation) pairs that exist: ONNX Runtime has no training, so its
# training cells are not generated rather than skipped.
PAIRS = [(c, impl) for c in cases.all_cases() for impl in peers.IMPLS if peers.supports(impl, c.layer, c.mode)]


@pytest.mark.parametrize(("case", "impl"), PAIRS,
                         ids=[f"{c.layer}-{c.mode}-{'x'.join(map(str, c.shape))}-{impl}" for c, impl in PAIRS])
def test_layer(benchmark, threads, case, impl):
    reason = peers.unavailable_reason(impl)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = f"{case.layer} {case.mode} {case.shape} threads={threads}"
    benchmark.extra_info["traffic_bytes"] = case.traffic_bytes()
    fn = peers.make(impl, case.layer, case.mode, case.shape, np.float32, np.random.default_rng(0))
    benchmark(fn)
