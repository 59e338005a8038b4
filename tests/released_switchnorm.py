"""SwitchableNorm's released algorithm (Luo et al.) in PyTorch: the parity oracle of
tests/test_switchable.py (autograd gives every gradient) and the torch peer of the benchmark
harness (benchmarks/harness/peers.py) and of benchmarks/thread_scaling.py. The float64 NumPy
reference is tests/reference.py's; the library's SwitchableNorm is normcore.plugins.switchable.

Needs torch: import this module only where torch is installed.
"""
import torch


class ReleasedSwitchNorm(torch.nn.Module):
    """The released algorithm (2d/3d and 1d), transcribed from its description: unbiased
    variances, var_ln / var_bn as mean(var + mean^2) - mean^2, softmax weights (IN, LN, BN),
    running = momentum * running + (1 - momentum) * batch, or accumulated without the moving
    average; the BN statistics are not detached. `dims` is 1 for (N, C) input (sources LN, BN),
    2 or 3 for (N, C, *) (IN, LN, BN). Weight (ones), bias, running_mean and running_var (zeros)
    have shape (C,), the logits mean_weight and var_weight (ones) one value per source; all of
    `dtype` (default: torch's default dtype)."""

    def __init__(self, C, dims=2, eps=1e-5, momentum=0.9, moving_average=True, using_bn=True,
                 population=False, dtype=None):
        super().__init__()
        self.dims, self.eps, self.momentum = dims, eps, momentum
        self.moving_average, self.using_bn, self.population = moving_average, using_bn, population
        n = (2 if using_bn else 1) if dims == 1 else (3 if using_bn else 2)
        self.weight = torch.nn.Parameter(torch.ones(C, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(C, dtype=dtype))
        self.mean_weight = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        self.var_weight = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(C, dtype=dtype))
        self.register_buffer("running_var", torch.zeros(C, dtype=dtype))

    def _bn(self, mean_bn, var_bn):
        if self.training:
            with torch.no_grad():
                if self.moving_average:
                    self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn.reshape(-1))
                    self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn.reshape(-1))
                else:
                    self.running_mean.add_(mean_bn.reshape(-1))
                    self.running_var.add_(mean_bn.reshape(-1) ** 2 + var_bn.reshape(-1))
            return mean_bn, var_bn
        return self.running_mean.reshape(mean_bn.shape), self.running_var.reshape(var_bn.shape)

    def forward(self, x):
        unbiased = not self.population
        mw, vw = torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)
        if self.dims == 1:
            means = [x.mean(1, keepdim=True)]
            variances = [x.var(1, keepdim=True, unbiased=unbiased)]
            if self.using_bn:
                m, v = self._bn(x.mean(0, keepdim=True), x.var(0, keepdim=True, unbiased=unbiased))
                means.append(m)
                variances.append(v)
            mean = sum(w * m for w, m in zip(mw, means))
            var = sum(w * v for w, v in zip(vw, variances))
            return (x - mean) / (var + self.eps).sqrt() * self.weight + self.bias
        N, C = x.shape[:2]
        xr = x.reshape(N, C, -1)
        mean_in = xr.mean(-1, keepdim=True)
        var_in = xr.var(-1, keepdim=True, unbiased=unbiased)
        temp = var_in + mean_in ** 2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if self.using_bn:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
            m, v = self._bn(mean_bn, var_bn)
            means.append(m)
            variances.append(v)
        mean = sum(w * m for w, m in zip(mw, means))
        var = sum(w * v for w, v in zip(vw, variances))
        y = ((xr - mean) / (var + self.eps).sqrt()).reshape(x.shape)
        shape = (1, C) + (1,) * (x.ndim - 2)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)
