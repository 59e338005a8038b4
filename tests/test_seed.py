"""The seed document's worked example: BatchNorm2d(3) with its printed weight on its printed
input gives its printed output, and channel 0 by hand agrees; and the demo that walks it."""
import subprocess
import sys

import numpy as np

import normcore as nc
from normcore import seed_example as seed


def test_seed_batch_norm_output_to_four_decimals():
    m = nc.BatchNorm2d(3)
    m.weight[...] = seed.WEIGHT
    m.bias[...] = seed.BIAS
    y = m(seed.INPUT)
    # The document printed both its input and its output rounded to 4 decimals, so the layer on
    # the rounded input differs from the printed output by less than one unit of the 4th decimal.
    assert np.abs(y - seed.OUTPUT).max() < 1e-4
    assert np.mean(np.round(y, 4) == seed.OUTPUT) > 0.75


def test_seed_channel_zero_by_hand():
    a = seed.INPUT.astype(np.float64)
    c0 = a[:, 0]
    mean, var = c0.mean(), c0.var()  # torch.mean and torch.var(..., False) of the document
    assert round(mean, 4) == seed.CHANNEL0_MEAN
    assert round(var, 4) == seed.CHANNEL0_VAR
    m = nc.BatchNorm2d(3, dtype=np.float64)
    m.weight[...] = seed.WEIGHT
    y = m(a)
    # The layer divides by sqrt(var + eps); the document's hand check by sqrt(var) + eps.
    np.testing.assert_allclose(y[0, 0], (c0[0] - mean) / np.sqrt(var + m.eps) * m.weight[0], rtol=1e-12)
    np.testing.assert_allclose(y[0, 0], (c0[0] - mean) / (np.sqrt(var) + m.eps) * m.weight[0], atol=1e-5)
    n = c0.size
    np.testing.assert_allclose(m.running_mean[0], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(m.running_var[0], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-12)


def test_demo_runs():
    out = subprocess.run([sys.executable, "-m", "normcore", "demo"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "channel 0 by hand" in out.stdout and "running_mean" in out.stdout and "eval" in out.stdout
