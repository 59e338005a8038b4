"""Checks of user input shared by the layers. Each raises an exception that says what was
wrong and what was expected; none changes any state."""
import numbers
import math
import os
import sys
import warnings

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message, category=UserWarning):
    """warnings.warn attributed to the first caller outside the normcore package (the user's
    line), however many of normcore's frames (the lock wrapper, __call__, ...) lie between."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def as_float_array(x, name="input"):
    """`x` as a float32 or float64 ndarray (no copy when it already is one).

    Python sequences are converted (to float64 when they hold ints or bools); an ndarray of any
    other dtype is refused with TypeError rather than silently converted. The check every
    built-in layer makes of its input.

    Parameters
    ----------
    x : array_like
        A float32 or float64 ndarray, or a sequence of numbers.
    name : str, default "input"
        What to call `x` in the error message.

    Returns
    -------
    ndarray
        `x` itself when it is a float32 or float64 ndarray, else its conversion.

    Raises
    ------
    TypeError
        An ndarray of another dtype, or something that is not numbers (None, a str, ...).

    Examples
    --------
    >>> x = np.zeros(3, np.float32)
    >>> nc.toolkit.as_float_array(x) is x, nc.toolkit.as_float_array([1, 2]).dtype
    (True, dtype('float64'))
    >>> nc.toolkit.as_float_array(np.zeros(3, np.int32))
    Traceback (most recent call last):
        ...
    TypeError: input must have dtype float32 or float64, got int32
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{name} must be a float32 or float64 array, got {type(x).__name__}")
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} could not be converted to a numeric array: {exc}") from exc
        if arr.dtype.kind in "biu":
            arr = arr.astype(np.float64)
        x = arr
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    return x


def check_dtype_arg(dtype):
    """The `dtype` constructor argument as a NumPy float dtype: float32 or float64.

    Parameters
    ----------
    dtype : None, np.float32, np.float64, torch.float32 or torch.float64
        What a layer's ``dtype`` argument may be: None means float32 (torch's default), and
        torch's float dtypes are read by name, so torch is not imported. Strings NumPy reads
        (``"float64"``) work too.

    Returns
    -------
    numpy.dtype
        ``np.dtype(np.float32)`` or ``np.dtype(np.float64)``.

    Raises
    ------
    TypeError
        Any other dtype.

    Examples
    --------
    >>> nc.toolkit.check_dtype_arg(np.float64)
    dtype('float64')
    >>> try:
    ...     nc.toolkit.check_dtype_arg(np.int32)
    ... except TypeError:
    ...     print("refused")
    refused
    """
    if dtype is None:
        return np.dtype(np.float32)
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        name = str(dtype).removeprefix("torch.")
        if name not in ("float32", "float64"):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        return np.dtype(name)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_device_arg(device):
    """The `device` constructor argument: None, "cpu" (or "cpu:0"), or a torch.device of type
    cpu. normcore runs on the CPU; anything else is a ValueError saying so."""
    if device is None:
        return None
    kind = device.type if type(device).__module__ == "torch" and type(device).__name__ == "device" else device
    if isinstance(kind, str) and kind in ("cpu", "cpu:0"):
        return "cpu"
    raise ValueError(f"normcore runs on the CPU only: device must be None or 'cpu', got {device!r} "
                     "(keep torch's own layer for that device)")


def check_positive_int(value, name):
    """`value` as an int >= 1: the check of ``num_features``, ``num_groups``, ``size``.

    Parameters
    ----------
    value : int
        Any integral type but bool (NumPy's ints included).
    name : str
        The argument's name, for the message.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        `value` is not an int (a float, a bool, ...).
    ValueError
        `value` < 1.

    Examples
    --------
    >>> nc.toolkit.check_positive_int(np.int64(3), "num_features")
    3
    >>> nc.toolkit.check_positive_int(0, "num_features")
    Traceback (most recent call last):
        ...
    ValueError: num_features must be a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _real_as_float(value, name, rule):
    """A real number (not a bool) as a float; an int beyond float's range is a ValueError with
    the rule's words, as inf would be, rather than float()'s OverflowError."""
    if type(value) is float:  # the usual case, without the ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {rule}, got an int of {int(value).bit_length()} bits, "
                         "beyond the float range") from None


def check_eps(eps):
    """`eps` as a float, finite and >= 0 (a layer with batch statistics also needs > 0).

    Parameters
    ----------
    eps : float
        The ``eps`` argument of a layer or function: an int, a float or a NumPy scalar.

    Returns
    -------
    float
        ``float(eps)``.

    Raises
    ------
    ValueError
        `eps` is negative, infinite or NaN, or an int beyond float's range.
    TypeError
        `eps` is not a real number (a bool, a str, None, ...).

    Examples
    --------
    >>> nc.toolkit.check_eps(1e-5)
    1e-05
    >>> nc.toolkit.check_eps(-1.0)
    Traceback (most recent call last):
        ...
    ValueError: eps must be a finite number >= 0, got -1.0
    """
    eps = _real_as_float(eps, "eps", "a finite number >= 0")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def check_finite_real(value, name):
    """A finite real number as a float: the check of ``alpha``, ``beta``, ``k``, ``momentum``.

    Parameters
    ----------
    value : float
        A real number (not a bool).
    name : str
        The argument's name, for the message.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        `value` is not a real number.
    ValueError
        `value` is infinite or NaN, or an int beyond float's range.

    Examples
    --------
    >>> nc.toolkit.check_finite_real(1, "alpha")
    1.0
    >>> nc.toolkit.check_finite_real(float("inf"), "alpha")
    Traceback (most recent call last):
        ...
    ValueError: alpha must be finite, got inf
    """
    value = _real_as_float(value, name, "finite")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_momentum(momentum):
    return None if momentum is None else check_finite_real(momentum, "momentum")


def check_functional_bool(value, function, name):
    """A bool argument of a functional form: torch's TypeError for anything else (a truthy
    string or None is not read as a mode)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{function}(): argument '{name}' must be bool, not {type(value).__name__}")
    return bool(value)


def check_functional_float(value, function, name):
    """A float argument of a functional form (an int is accepted, None is not: torch's
    TypeError), finite."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{function}(): argument '{name}' must be float, not {type(value).__name__}")
    return check_finite_real(value, name)


def check_bool(value, name):
    """`value` as a bool: a Python or NumPy bool, nothing else (no 0 / 1).

    Parameters
    ----------
    value : bool or numpy.bool_
        The flag.
    name : str
        The argument's name, for the message.

    Returns
    -------
    bool

    Raises
    ------
    TypeError
        `value` is not a bool.

    Examples
    --------
    >>> nc.toolkit.check_bool(np.True_, "affine")
    True
    >>> nc.toolkit.check_bool(1, "affine")
    Traceback (most recent call last):
        ...
    TypeError: affine must be a bool, got int
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_vector(v, length, name):
    """An optional per-channel parameter or statistic: None, or a 1-D float array of `length`."""
    if v is None:
        return None
    v = as_float_array(v, name)
    if v.shape != (length,):
        raise ValueError(f"{name} should contain {length} elements (one per channel), got shape {v.shape}")
    return v


def check_grad_output(dy, shape, dtype):
    """`dy` of backward: a float array of the forward input's shape, cast to its dtype.

    Parameters
    ----------
    dy : array_like
        The gradient with respect to the forward's output, float32 or float64.
    shape : tuple of ints
        The shape of the forward's input (and output).
    dtype : numpy.dtype
        The dtype of the forward's input: `dy` is cast to it.

    Returns
    -------
    ndarray
        `dy`, of `dtype` (a copy when it had another dtype).

    Raises
    ------
    TypeError
        `dy` is not a float32 or float64 array.
    ValueError
        `dy` does not have `shape`.

    Examples
    --------
    >>> dy = nc.toolkit.check_grad_output([[1.0, 2.0]], (1, 2), np.float32)
    >>> dy.dtype, dy.shape
    (dtype('float32'), (1, 2))
    """
    dy = as_float_array(dy, "dy")
    if dy.shape != shape:
        raise ValueError(f"dy must have the shape of the last forward's input {shape}, got {dy.shape}")
    if dy.dtype != dtype:
        dy = dy.astype(dtype)
    return dy
