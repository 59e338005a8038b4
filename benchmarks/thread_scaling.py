"""Thread scaling and determinism on a many-core machine: `python -m benchmarks.thread_scaling`
(from the repository's root).

For each layer and thread count (1, 2, 4, ... up to the cores): checks that normcore's output,
dx and parameter gradients are bitwise identical to the 1-thread ones, and prints the best of
several timings of forward and forward + backward for normcore and PyTorch (when installed) at
that same thread count, with the ratio.
"""
import os
import sys
import time

import numpy as np

import normcore as nc

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None


def cases():
    from normcore.plugins.switchable import SwitchableNorm2d

    if torch is not None:  # the released algorithm, as the tests transcribe it
        from tests.released_switchnorm import ReleasedSwitchNorm

    yield "batch_norm2d", (32, 64, 56, 56), lambda: nc.BatchNorm2d(64), lambda: torch.nn.BatchNorm2d(64)
    yield "instance_norm2d", (32, 64, 56, 56), lambda: nc.InstanceNorm2d(64, affine=True), \
        lambda: torch.nn.InstanceNorm2d(64, affine=True)
    yield "group_norm", (32, 64, 56, 56), lambda: nc.GroupNorm(8, 64), lambda: torch.nn.GroupNorm(8, 64)
    yield "layer_norm", (8192, 768), lambda: nc.LayerNorm(768), lambda: torch.nn.LayerNorm(768)
    yield "local_response_norm", (16, 96, 27, 29), lambda: nc.LocalResponseNorm(5), \
        lambda: torch.nn.LocalResponseNorm(5)
    yield "switchable_norm2d", (24, 96, 40, 40), lambda: SwitchableNorm2d(96), \
        lambda: ReleasedSwitchNorm(96)


def best(f, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def run_nc(make, x, dy):
    m = make()
    y = m(x)
    dx = m.backward(dy)
    return [y.tobytes(), dx.tobytes()] + [g.tobytes() for _, g in sorted(m.grads.items())]


def main(argv):
    cores = os.cpu_count() or 1
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= cores]
    repeats = int(argv[1]) if len(argv) > 1 else 5
    rng = np.random.default_rng(0)
    print(f"cores {cores}; OpenMP {'on' if nc.openmp_enabled() else 'off'}; torch {torch.__version__ if torch else '-'}")
    print(f"{'layer':20s} {'threads':>7s} {'same bits':>9s} {'fwd ms':>8s} {'torch':>8s} {'ratio':>6s} "
          f"{'f+b ms':>8s} {'torch':>8s} {'ratio':>6s}")
    all_identical = True
    for name, shape, make_nc, make_torch in cases():
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        nc.set_num_threads(1)
        reference = run_nc(make_nc, x, dy)
        for n in counts:
            nc.set_num_threads(n)
            identical = run_nc(make_nc, x, dy) == reference
            all_identical &= identical
            m = make_nc()
            fwd = best(lambda: m(x), repeats)
            fb = best(lambda: (m(x), m.backward(dy)), repeats)
            t_fwd = t_fb = float("nan")
            if torch is not None and make_torch is not None:
                torch.set_num_threads(n)
                tm = make_torch()
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    t_fwd = best(lambda: tm(xt), repeats)
                xg = xt.clone().requires_grad_(True)
                dyt = torch.from_numpy(dy)

                def step():
                    xg.grad = None
                    tm(xg).backward(dyt)

                t_fb = best(step, repeats)
            print(f"{name:20s} {n:7d} {str(identical):>9s} {fwd * 1e3:8.2f} {t_fwd * 1e3:8.2f} {t_fwd / fwd:6.2f} "
                  f"{fb * 1e3:8.2f} {t_fb * 1e3:8.2f} {t_fb / fb:6.2f}", flush=True)
    nc.set_num_threads(None)
    print("bitwise identical across thread counts:", all_identical)
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
