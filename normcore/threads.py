"""The number of threads the kernels use, worked out once per call in Python.

By default it is what the OpenMP runtime reports for the calling thread
(``omp_get_max_threads``): all cores, or ``OMP_NUM_THREADS``, or a limit set with
threadpoolctl (``threadpool_limits(n, user_api="openmp")``). ``set_num_threads(n)`` fixes it
explicitly; ``set_num_threads(None)`` returns to the default.

Results never depend on it: the kernels cut work into pieces of fixed size and merge them in
a fixed order, so every output is bitwise identical for any thread count.
"""
import numbers

from normcore._kernels import openmp_info

__all__ = ["set_num_threads", "get_num_threads", "openmp_enabled"]

_requested = None


def set_num_threads(n):
    """Use `n` threads in the kernels (`None`: follow OpenMP's default again)."""
    global _requested
    if n is None:
        _requested = None
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads expects a positive int or None, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads expects a positive number of threads, got {n}")
    _requested = int(n)


def get_num_threads():
    """The number of threads the next kernel call will use."""
    if _requested is not None:
        return _requested
    return max(1, openmp_info.max_threads())


def openmp_enabled():
    """True when the kernels were built with OpenMP (otherwise they always run serially)."""
    return openmp_info.openmp_enabled()
