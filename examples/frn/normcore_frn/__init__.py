"""FilterResponseNorm + TLU (Singh & Krishnan, 2019) on normcore's public toolkit.

For x (N, C, *): nu2 = mean(x^2) over the spatial dims of each (n, c);
y = max(weight * x / sqrt(nu2 + eps) + bias, tau), with weight, bias and tau per channel.
The statistics come from one toolkit pass (row_moments: mean(x^2) = m2 / L + mean^2), the
affine map from one apply pass; backward uses row_grad_sums and apply_rows_backward.
"""
import math

import numpy as np

import normcore as nc
from normcore import toolkit

__all__ = ["FilterResponseNorm"]


class FilterResponseNorm(nc.Module):
    """FilterResponseNorm(num_features, eps=1e-6): parameters weight, bias, tau (per channel)."""

    _parameter_names = ("weight", "bias", "tau")

    def __init__(self, num_features, eps=1e-6, dtype=np.float32):
        super().__init__()
        self.num_features = toolkit.check_positive_int(num_features, "num_features")
        self.eps = toolkit.check_eps(eps)
        dtype = toolkit.check_dtype_arg(dtype)
        self.weight = np.ones(num_features, dtype)
        self.bias = np.zeros(num_features, dtype)
        self.tau = np.zeros(num_features, dtype)
        self._saved = None

    def __repr__(self):
        return f"FilterResponseNorm({self.num_features}, eps={self.eps})"

    @staticmethod
    def _pre_activation(x, rstd, weight, bias):
        return toolkit.apply_rows(x, 0.0, rstd * weight, bias)

    def forward(self, x):
        x = toolkit.as_float_array(x)
        if x.ndim < 3 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, *) with at least 3 dims, got {x.shape}")
        L = math.prod(x.shape[2:])
        mean, m2 = toolkit.row_moments(x)
        rstd = 1.0 / np.sqrt(m2 / L + mean * mean + self.eps)
        # Copies of the parameters (astype copies): backward differentiates this forward.
        params = (self.weight.astype(np.float64), self.bias.astype(np.float64),
                  self.tau.astype(x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2)))
        y = np.maximum(self._pre_activation(x, rstd, *params[:2]), params[2])
        self._saved = (x, rstd, L, params)
        return y

    def backward(self, dy):
        if self._saved is None:
            raise RuntimeError("FilterResponseNorm.backward called before any forward")
        x, rstd, L, (gamma, beta, tau) = self._saved
        dy = toolkit.check_grad_output(dy, x.shape, x.dtype)
        passed = self._pre_activation(x, rstd, gamma, beta) >= tau
        dyp = np.where(passed, dy, 0)                     # gradient reaching the affine output
        s_dy, s_dyx = toolkit.row_grad_sums(x, dyp, 0.0)  # sum(dyp), sum(dyp * x) per row
        dx = toolkit.apply_rows_backward(dyp, x, gamma * rstd, 0.0, -gamma * rstd ** 3 * s_dyx / L, 0.0)
        axes = (0,) + tuple(range(2, x.ndim))
        self.grads = {
            "weight": (rstd * s_dyx).sum(axis=0).astype(self.weight.dtype),
            "bias": s_dy.sum(axis=0).astype(self.bias.dtype),
            "tau": np.where(passed, 0, dy).sum(axis=axes).astype(self.tau.dtype),
        }
        return dx
