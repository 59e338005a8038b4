"""`python -m normcore demo`: a walk through the seed document's BatchNorm2d example."""
import numpy as np

import normcore as nc
from normcore import seed_example as seed


def _show(title, arr):
    print(title)
    print(np.array2string(np.asarray(arr), precision=4, suppress_small=True, floatmode="fixed"))


def run():
    np.set_printoptions(linewidth=100)
    a = seed.INPUT
    print("normcore demo: the seed document's example, a = randn(2, 3, 4, 4), m = BatchNorm2d(3)\n")
    m = nc.BatchNorm2d(3)
    m.weight[...] = seed.WEIGHT
    print(f"m = {m!r}")
    _show("m.weight (as printed in the document):", m.weight)

    # 1. A training step: batch statistics, running statistics updated.
    y = m(a)
    _show("\n1. training step, out[0, 0] = m(a)[0, 0]:", y[0, 0])
    _show("   printed in the document:", seed.OUTPUT[0, 0])
    worst = float(np.abs(y - seed.OUTPUT).max())
    print(f"   largest difference over all 96 values: {worst:.1e} "
          "(the document printed its input rounded to 4 decimals)")

    # 2. Channel 0 by hand: mean over (N, H, W), biased variance.
    c0 = a[:, 0].astype(np.float64)
    mean0, var0 = c0.mean(), c0.var()
    by_hand = (c0[0] - mean0) / np.sqrt(var0 + m.eps) * seed.WEIGHT[0] + 0.0
    print(f"\n2. channel 0 by hand: mean = {mean0:.4f} (printed {seed.CHANNEL0_MEAN}), "
          f"biased var = {var0:.4f} (printed {seed.CHANNEL0_VAR})")
    print(f"   (a[0, 0] - mean) / sqrt(var + eps) * weight[0] agrees with the layer to "
          f"{float(np.abs(by_hand - y[0, 0]).max()):.1e}")

    # 3. Running statistics after one step: (1 - 0.1) * init + 0.1 * batch (unbiased variance).
    n = a.shape[0] * a.shape[2] * a.shape[3]
    _show("\n3. running_mean = 0.9 * 0 + 0.1 * batch mean:", m.running_mean)
    _show("   running_var  = 0.9 * 1 + 0.1 * batch var * n/(n-1):", m.running_var)
    print(f"   (channel 0 by hand: {0.1 * mean0:.4f} and {0.9 + 0.1 * var0 * n / (n - 1):.4f}); "
          f"num_batches_tracked = {int(m.num_batches_tracked)}")

    # 4. Eval: the running statistics are used and left as they are.
    m.eval()
    before = m.running_mean.copy()
    y_eval = m(a)
    expected = (c0[0] - m.running_mean[0]) / np.sqrt(m.running_var[0] + m.eps) * seed.WEIGHT[0]
    _show("\n4. eval, out[0, 0] with the running statistics:", y_eval[0, 0])
    print(f"   by hand from running_mean[0], running_var[0]: agrees to "
          f"{float(np.abs(expected - y_eval[0, 0]).max()):.1e}; running stats unchanged: "
          f"{bool(np.array_equal(before, m.running_mean))}")

    # 5. Backward of the training step.
    m.train()
    m(a)
    dx = m.backward(np.ones_like(a))
    print("\n5. backward of sum(out): dx is ~0 (the mean is subtracted) "
          f"max |dx| = {float(np.abs(dx).max()):.1e};")
    _show("   grads['bias'] = number of values per channel:", m.grads["bias"])
    print(f"\nthreads: {nc.get_num_threads()} (OpenMP {'on' if nc.openmp_enabled() else 'off'})")
    return 0
