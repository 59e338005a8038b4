"""The number of threads the kernels use, worked out once per call in Python.

By default it is what the OpenMP runtime reports for the calling thread
(``omp_get_max_threads``): all cores, or ``OMP_NUM_THREADS``, or a limit set with
threadpoolctl (``threadpool_limits(n, user_api="openmp")``). ``set_num_threads(n)`` fixes it
explicitly; ``set_num_threads(None)`` returns to the default.

Results never depend on it: the kernels cut work into pieces of fixed size and merge them in
a fixed order, so every output is bitwise identical for any thread count.

At most ``MAX_THREADS`` (1024) threads are used: ``set_num_threads`` refuses more with
ValueError (an OpenMP team of 10**5 threads exhausts the process's resources and crashes it),
and a larger OpenMP default (``OMP_NUM_THREADS=100000``) is clamped to it with a warning.

The instruction set the kernels run (``instruction_set()``) is chosen once, when they load: the
best the CPU has, capped by the environment variable ``NORMCORE_ISA`` (``baseline``, ``avx2``
or ``avx512``). It changes the speed, never a bit of a result.
"""
import numbers
import os

from normcore._kernels import openmp_info
from normcore.validation import warn_user

__all__ = ["set_num_threads", "get_num_threads", "openmp_enabled", "instruction_set", "MAX_THREADS"]

# More threads than any machine's cores today, few enough for an OpenMP team to start anywhere.
MAX_THREADS = 1024

_requested = None
_warned_clamp = False


def set_num_threads(n):
    """Use `n` threads in the kernels (``None``: follow OpenMP's default again).

    Parameters
    ----------
    n : int or None
        A number of threads from 1 to ``MAX_THREADS`` (1024), or None.

    Raises
    ------
    TypeError
        `n` is neither an int nor None.
    ValueError
        `n` is below 1 or above ``MAX_THREADS``.

    Examples
    --------
    >>> import normcore as nc
    >>> nc.set_num_threads(2)
    >>> nc.get_num_threads()
    2
    >>> nc.set_num_threads(None)
    """
    global _requested
    if n is None:
        _requested = None
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads expects a positive int or None, got {type(n).__name__}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads expects a number of threads from 1 to {MAX_THREADS}, got {n}")
    _requested = int(n)


def get_num_threads():
    """The number of threads the next kernel call will use: the ``set_num_threads`` value, or
    OpenMP's default for the calling thread (at most ``MAX_THREADS``).

    Returns
    -------
    int
        From 1 to ``MAX_THREADS`` (kernels built without OpenMP run serially whatever it
        is: see ``openmp_enabled``).

    Warns
    -----
    RuntimeWarning
        Once, when OpenMP's default is above ``MAX_THREADS`` and is clamped to it.

    Examples
    --------
    >>> import normcore as nc
    >>> n = nc.get_num_threads()     # set_num_threads's value, or OpenMP's default
    >>> 1 <= n <= nc.threads.MAX_THREADS
    True
    """
    global _warned_clamp
    if _requested is not None:
        return _requested
    n = max(1, openmp_info.max_threads())
    if n > MAX_THREADS:
        if not _warned_clamp:
            _warned_clamp = True
            warn_user(f"OpenMP asks for {n} threads (OMP_NUM_THREADS?); normcore uses at most {MAX_THREADS}",
                      RuntimeWarning)
        n = MAX_THREADS
    return n


def openmp_enabled():
    """True when the kernels were built with OpenMP (otherwise they always run serially).

    Returns
    -------
    bool

    Examples
    --------
    >>> import normcore as nc
    >>> isinstance(nc.openmp_enabled(), bool)
    True
    """
    return openmp_info.openmp_enabled()


def instruction_set():
    """The instruction set of the kernels' variant that runs: ``"baseline"``, ``"avx2"`` or
    ``"avx512"`` (the best the CPU has, capped by ``NORMCORE_ISA``; every variant gives the
    same bits).

    Returns
    -------
    str

    Examples
    --------
    >>> import normcore as nc
    >>> nc.instruction_set() in ("baseline", "avx2", "avx512")
    True
    """
    return openmp_info.instruction_set()


def _check_isa_cap():
    """Warn when NORMCORE_ISA names no instruction set: the kernels then ignore it."""
    cap = os.environ.get("NORMCORE_ISA")
    if cap and cap not in openmp_info.ISA_NAMES:
        warn_user(
            f"NORMCORE_ISA={cap!r} is not an instruction set normcore has; expected one of "
            f"{', '.join(repr(n) for n in openmp_info.ISA_NAMES)}. The kernels ignore it and run "
            f"{instruction_set()!r}, the best this CPU has.",
            RuntimeWarning,
        )


_check_isa_cap()
