"""SwitchableNorm2d forward + backward: normcore's plugin next to a PyTorch implementation of
the released algorithm (autograd for the backward), same thread count, (24, 96, 40, 40) float32."""
import numpy as np
import pytest

from normcore.plugins.switchable import SwitchableNorm2d

torch = pytest.importorskip("torch")

SHAPE = (24, 96, 40, 40)


class TorchSwitchNorm2d(torch.nn.Module):
    """The released SwitchNorm2d algorithm (training mode), as its authors wrote it in PyTorch."""

    def __init__(self, C, eps=1e-5, momentum=0.9):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = torch.nn.Parameter(torch.ones(1, C, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(1, C, 1, 1))
        self.mean_weight = torch.nn.Parameter(torch.ones(3))
        self.var_weight = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, C, 1))
        self.register_buffer("running_var", torch.zeros(1, C, 1))

    def forward(self, x):
        N, C, H, W = x.size()
        x = x.view(N, C, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in ** 2
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
        with torch.no_grad():
            self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
        mw = torch.softmax(self.mean_weight, 0)
        vw = torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(N, C, H, W) * self.weight + self.bias


@pytest.mark.parametrize("impl", ["normcore", "torch"])
def test_switchable_norm2d_forward_backward(benchmark, threads, impl):
    benchmark.group = f"forward+backward switchable_norm2d {SHAPE} threads={threads}"
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    dy = np.ones_like(x)
    if impl == "normcore":
        m = SwitchableNorm2d(SHAPE[1])

        def step():
            m(x)
            m.backward(dy)
    else:
        m = TorchSwitchNorm2d(SHAPE[1])
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def step():
            xt.grad = None
            m.zero_grad(set_to_none=True)
            m(xt).backward(dyt)

    benchmark(step)
