"""LocalResponseNorm: each value divided by a power of the sum of squares of its neighbours
across channels (a sliding window; see pyx/lrn.pxi for the one-pass kernel)."""
from typing import NamedTuple

import numpy as np

from normcore import docstrings
from normcore._kernels.engine import window_backward, window_forward
from normcore.module import Module
from normcore.registry import register_norm
from normcore.threads import get_num_threads
from normcore.validation import as_float_array, check_finite_real, check_grad_output, check_positive_int

__all__ = ["LocalResponseNorm", "local_response_norm_forward", "check_lrn_input"]


def check_lrn_args(size, alpha, beta, k):
    """(size, alpha, beta, k) checked: size a positive int, the others finite reals."""
    return (check_positive_int(size, "size"), check_finite_real(alpha, "alpha"), check_finite_real(beta, "beta"),
            check_finite_real(k, "k"))


def check_lrn_input(x):
    """PyTorch's rule: the input has 3 or more dims (N, C, *)."""
    if x.ndim < 3:
        raise ValueError(f"Expected 3D or higher dimensionality input (got {x.ndim} dimensions)")


class LRNSaved(NamedTuple):
    x3: np.ndarray  # x as [N, C, P] (a view of x, or its contiguous copy)
    shape: tuple
    dtype: np.dtype


def kernel_window(size, alpha, C):
    """(window, alpha) for the kernels, which divide alpha by their window.

    A window of 2*C + 1 channels or more covers every channel from every channel, so a larger
    `size` (any Python int) changes only the divisor: the kernels get the window 2*C + 1 and an
    alpha scaled to keep alpha / size. The kernels' scratch is O(C + window), whatever `size` is.
    """
    if size <= 2 * C + 1:
        return size, alpha
    window = 2 * C + 1
    return window, alpha * (window / size)


def local_response_norm_forward(x, size, alpha, beta, k):
    """y for x (N, C, *) and what backward needs; allocates only y."""
    N, C = x.shape[:2]
    if x.size == 0:
        return np.empty_like(x), LRNSaved(None, x.shape, x.dtype)
    saved = lrn_resume(x)
    window, alpha = kernel_window(size, alpha, C)
    y3 = window_forward(saved.x3, window, alpha, beta, k, get_num_threads())
    return y3.reshape(x.shape), saved


def lrn_resume(x):
    """What backward needs of a forward of x (N, C, *), non-empty: x as [N, C, P]. The forward
    keeps nothing else, so this is also how a caller that saved only x rebuilds it."""
    return LRNSaved(np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1), x.shape, x.dtype)


def local_response_norm_backward(dy, saved, size, alpha, beta, k):
    if saved.x3 is None:
        return np.zeros(saved.shape, saved.dtype)
    dy3 = np.ascontiguousarray(dy, dtype=saved.x3.dtype).reshape(saved.x3.shape)
    window, alpha = kernel_window(size, alpha, saved.x3.shape[1])
    dx3 = window_backward(dy3, saved.x3, window, alpha, beta, k, get_num_threads())
    return dx3.reshape(saved.shape)


_LOCAL_RESPONSE_NORM_DOC = """Local Response Normalization across channels, as ``torch.nn.LocalResponseNorm``.

    Every value is divided by a power of the sum of squares of its neighbours across channels
    (at the same sample and position), a window of ``size`` channels::

        y[n, c] = x[n, c] * (k + alpha / size * sum(x[n, c'] ** 2 for c' in window(c))) ** -beta

    where ``window(c)`` is the channels ``c - size // 2`` to ``c + (size - 1) // 2``, with
    zeros beyond the first and the last channel, and the divisor is always ``size`` (as torch).
    The layer has no parameters or buffers (``state_dict()`` is empty) and behaves the same
    in training and in eval.

    Parameters
    ----------
    size : int
        The number of channels in the window (>= 1). Any size works: a window of 2 * C + 1
        channels already covers every channel, so a larger one only changes the divisor.
    alpha : float, default 1e-4
        The multiplicative factor of the window's mean square (finite).
    beta : float, default 0.75
        The exponent (finite).
    k : float, default 1.0
        The additive constant (finite).

    Attributes
    ----------
    size, alpha, beta, k : int, float, float, float
        The arguments.
{training_grads}

    Shape
    -----
    - Input: (N, C, *), with at least one dim after C
    - Output: the input's shape (and dtype)

    Raises
    ------
    ValueError
        At construction, ``size < 1`` or an infinite or NaN ``alpha``, ``beta`` or ``k``. At
        forward, input of fewer than 3 dims ("Expected 3D or higher dimensionality input").
{type_error}

{layer_notes}

    The window sums accumulate in float64; with float32 input the power ``s ** -beta`` is
    evaluated in float32 (within 3e-7 relative of a float64 computation). ``backward``
    leaves ``grads`` empty (there are no parameters).

    Examples
    --------
    >>> x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)   # (N, C, L): channels 1, 2, 3
    >>> m = nc.LocalResponseNorm(2, alpha=1.0, beta=1.0, k=1.0)
    >>> y = m(x)                       # window (c - 1, c): y = x / (1 + (x[c-1]**2 + x[c]**2) / 2)
    >>> y.ravel().round(4).tolist()
    [0.6667, 0.5714, 0.4]
    >>> dx = m.backward(np.ones_like(y))
    >>> dx.shape, m.grads, m.state_dict()
    ((1, 3, 1), {{}}, {{}})
    """


@register_norm("local_response_norm")
class LocalResponseNorm(Module):
    __doc__ = docstrings.fill(_LOCAL_RESPONSE_NORM_DOC)

    def __init__(self, size, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = check_lrn_args(size, alpha, beta, k)
        self._saved = None

    def __repr__(self):
        return f"LocalResponseNorm({self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k})"

    def forward(self, x):
        """y for x of shape (N, C, *) (see the class docstring)."""
        x = as_float_array(x)
        check_lrn_input(x)
        y, saved = local_response_norm_forward(x, self.size, self.alpha, self.beta, self.k)
        self._saved = saved
        return y

    def backward(self, dy):
        """dx for the last forward (recomputed from x; nothing the size of x was kept)."""
        saved = self._require_forward()
        dy = check_grad_output(dy, saved.shape, saved.dtype)
        self.grads = {}
        return local_response_norm_backward(dy, saved, self.size, self.alpha, self.beta, self.k)
