"""Memory a call allocates, finite output from extreme finite input, and the thread count taken
from the environment."""
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import normcore as nc

SHAPE = (8, 16, 48, 48)  # 1.2 MB in float32: large against the O(N*C) statistics

LAYERS = {
    "bn_train": lambda: nc.BatchNorm2d(16),
    "bn_eval": lambda: nc.BatchNorm2d(16).eval(),
    "in": lambda: nc.InstanceNorm2d(16, affine=True, track_running_stats=True),
    "gn": lambda: nc.GroupNorm(4, 16),
    "ln": lambda: nc.LayerNorm((48, 48)),
    "ln_one_row_per_sample": lambda: nc.LayerNorm((16, 48, 48)),
}


def peak_allocated(f):
    """Peak bytes NumPy (and Python) allocate while f runs, beyond what was held before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = f()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.mark.parametrize("name", LAYERS)
def test_forward_allocates_only_the_output_and_statistics(name):
    m = LAYERS[name]()
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    dy = np.ones_like(x)
    m(x)
    m.backward(dy)  # warm up: first calls may import or cache
    small = 64 * 1024  # O(N*C) statistics and coefficients, O(L) for LayerNorm's weight
    # and the copies of the parameters a forward keeps for its backward (its parameters' bytes).
    small += sum(p.nbytes for p in m.parameters().values())
    peak, y = peak_allocated(lambda: m(x))
    assert peak <= y.nbytes + small, f"forward peak {peak} B for an output of {y.nbytes} B"
    peak, dx = peak_allocated(lambda: m.backward(dy))
    # Beyond dx: the parameter gradients (summed in float64, then cast: 3x their bytes), and for
    # LayerNorm the per-chunk column sums (at most 1/16 of x's bytes).
    grads = sum(g.nbytes for g in m.grads.values())
    bound = dx.nbytes + 3 * grads + (x.nbytes // 16 if name.startswith("ln") else 0) + small
    assert peak <= bound, f"backward peak {peak} B for dx of {dx.nbytes} B and grads of {grads} B"


def test_forward_keeps_no_copy_of_contiguous_input():
    m = nc.GroupNorm(4, 16)
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    m(x)
    assert np.shares_memory(m._saved.inner.x2, x)  # backward recomputes from x itself


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e3, 1e18])  # var up to 1e36: fits float32 buffers
@pytest.mark.parametrize("name", LAYERS)
def test_finite_input_gives_finite_output(name, scale):
    m = LAYERS[name]()
    rng = np.random.default_rng(2)
    x = (scale * rng.normal(size=(4, 16, 6, 6))).astype(np.float32)
    x[:, 3] = np.float32(scale)  # a constant channel too
    if name.startswith("ln"):
        m = nc.LayerNorm((6, 6)) if name == "ln" else nc.LayerNorm((16, 6, 6))
    y = m(x)
    dx = m.backward(rng.normal(size=x.shape).astype(np.float32))
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in m.grads.values())
    for buf in ("running_mean", "running_var"):
        if getattr(m, buf, None) is not None:
            assert np.isfinite(getattr(m, buf)).all()


def test_omp_num_threads_is_respected():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", "import normcore as nc; print(nc.get_num_threads())"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    env["OMP_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", "import normcore as nc; print(nc.get_num_threads())"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == ("3" if nc.openmp_enabled() else "1")
