"""Whole PyTorch training steps with torch's norm layers against normcore.torch's (converted
with ``normcore.torch.convert``), side by side in one process at the same thread count.

    python benchmarks/torch_models.py            # 1 and 2 threads, every model; a table of ms and ratios
    python benchmarks/torch_models.py --threads 2 --models dwsep --repeats 30
    python benchmarks/torch_models.py --per-call  # the bridge's cost per layer call

The models are defined here (no torchvision): a ResNet-18-style CNN, a depthwise-separable
(BatchNorm-heavy) CNN, a GroupNorm UNet block as in diffusion models and a transformer encoder
layer. A step is forward, backward and an SGD update; the two variants start from the same
weights and take turns in short runs of steps, so that the machine's drift hits both alike
(the first step of each run is not counted: see ``compare``). The reported figure is the
median over repeats of each variant's step time; the ratio is torch's / normcore's.
"""
import argparse
import statistics
import time

import torch
from torch import nn

import normcore as nc
import normcore.torch as nct


# -- the models --------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (2-2-2-2 basic blocks, 64-128-256-512 channels, BatchNorm after every
    convolution) for small images."""

    def __init__(self, classes=10, width=64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def depthwise_separable(classes=10):
    """A MobileNet-style CNN: depthwise 3x3 + pointwise 1x1 convolutions, each followed by
    BatchNorm and ReLU; the norms are a large share of the step."""
    layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()], 32
    for cout, stride in ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
        layers += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                   nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class UNetBlock(nn.Module):
    """A diffusion UNet's residual block: GroupNorm(32) + SiLU + conv, twice, with a residual."""

    def __init__(self, channels=128, groups=32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        return x + self.conv2(nn.functional.silu(self.norm2(h)))


def transformer_layer(d_model=256, heads=4):
    return nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)


# name -> (model factory, input shape, target shape). The sizes keep a step in the tens of ms.
MODELS = {
    "resnet18": (lambda: ResNet18(width=32), (16, 3, 32, 32), (16, 10)),
    "dwsep": (depthwise_separable, (16, 3, 48, 48), (16, 10)),
    "unet_gn": (UNetBlock, (4, 128, 32, 32), (4, 128, 32, 32)),
    "transformer": (transformer_layer, (16, 128, 256), (16, 128, 256)),
}
SMALL = {  # for the CI run of the benchmark bodies
    "resnet18": (lambda: ResNet18(width=8), (2, 3, 16, 16), (2, 10)),
    "dwsep": (depthwise_separable, (2, 3, 16, 16), (2, 10)),
    "unet_gn": (lambda: UNetBlock(32, 8), (2, 32, 8, 8), (2, 32, 8, 8)),
    "transformer": (lambda: transformer_layer(32, 2), (2, 8, 32), (2, 8, 32)),
}


def pair(name, sizes=MODELS):
    """(torch model, its normcore conversion, x, target, a step function per model)."""
    factory, x_shape, t_shape = sizes[name]
    torch.manual_seed(0)
    model = factory()
    converted = nct.convert(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=g)
    target = torch.randn(t_shape, generator=g)
    return model, converted, x, target


def make_step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
    return step


def compare(name, repeats, warmup=3, sizes=MODELS, run=4):
    """(median ms of torch's step, of normcore's, ratio).

    The variants take turns in runs of `run` consecutive steps, and the first step of each
    run is not counted: a step right after the other model's runs into the memory that model
    handed back to the OS (glibc trims and unmaps freed memory), and pays thousands of page
    faults (measured: ~3,300 per dwsep step, for either variant, against none for normcore's
    steps in a row), which a process training one model does not. Taking turns still lets
    the machine's drift hit both alike."""
    model, converted, x, target = pair(name, sizes)
    steps = {"torch": make_step(model, x, target), "normcore": make_step(converted, x, target)}
    for _ in range(warmup):
        for s in steps.values():
            s()
    times = {k: [] for k in steps}
    for _ in range(max(1, -(-repeats // (run - 1)))):
        for k, s in steps.items():
            s()  # after the other model: not counted
            for _ in range(run - 1):
                t0 = time.perf_counter()
                s()
                times[k].append(time.perf_counter() - t0)
    t, n = statistics.median(times["torch"]) * 1e3, statistics.median(times["normcore"]) * 1e3
    return t, n, t / n


# -- per-call cost ---------------------------------------------------------------------------------
def per_call(repeats=5, n=2000):
    """us per call on a (2, 3, 4, 4) float32 input, one thread: torch's layer, normcore.torch's,
    and the NumPy layer it runs; forward alone (no grad) and forward + backward. The bridge's
    cost is normcore.torch's time less the NumPy layer's."""
    def best(fn):
        for _ in range(200):
            fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t0) / n * 1e6)
        return min(out)

    x = torch.randn(2, 3, 4, 4)
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    xn, dyn = x.numpy(), dy.numpy()
    rows = []
    for name, args in (("BatchNorm2d", (3,)), ("InstanceNorm2d", (3,)), ("GroupNorm", (1, 3)), ("LayerNorm", (4,)),
                       ("LocalResponseNorm", (2,))):
        ref, ours, plain = getattr(nn, name)(*args), getattr(nct, name)(*args), getattr(nc, name)(*args)

        def train(m):
            def run():
                m(xg).backward(dy)
            return run

        def plain_train():
            plain(xn)
            plain.backward(dyn)

        with torch.no_grad():
            fwd = (best(lambda: ref(x)), best(lambda: ours(x)))
        fb = (best(train(ref)), best(train(ours)), best(plain_train))
        rows.append((name, *fwd, best(lambda: plain(xn)), *fb))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--per-call", action="store_true")
    args = parser.parse_args()
    if args.per_call:
        torch.set_num_threads(1)
        nc.set_num_threads(1)
        print("us per call, (2, 3, 4, 4) float32, 1 thread")
        print(f"{'layer':18s} {'fwd torch':>9s} {'ours':>6s} {'numpy':>6s} {'bridge':>6s} | "
              f"{'f+b torch':>9s} {'ours':>6s} {'numpy':>6s} {'bridge':>6s}")
        for name, ft, fo, fn, bt, bo, bn in per_call():
            print(f"{name:18s} {ft:9.1f} {fo:6.1f} {fn:6.1f} {fo - fn:6.1f} | {bt:9.1f} {bo:6.1f} {bn:6.1f} "
                  f"{bo - bn:6.1f}")
        return
    print(f"{'model':12s} {'threads':>7s} {'torch ms':>9s} {'normcore ms':>11s} {'ratio':>6s}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        nc.set_num_threads(threads)
        for name in args.models:
            t, n, r = compare(name, args.repeats)
            print(f"{name:12s} {threads:7d} {t:9.2f} {n:11.2f} {r:6.2f}", flush=True)


if __name__ == "__main__":
    main()
