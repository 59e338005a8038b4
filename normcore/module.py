"""nc.Module: the base class of every layer, built-in or plugin.

A subclass implements ``forward(x)`` and ``backward(dy)``; ``m(x)`` calls ``forward``. It lists
the names of its parameters and buffers in ``_parameter_names`` and ``_buffer_names`` (an
attribute may be None: the layer then has no such entry), and the base class gives it
``train`` / ``eval``, ``parameters()``, ``state_dict()`` and ``load_state_dict()`` with
PyTorch's keys and shapes.

Threads: every call that reads or writes a layer's state (``forward``, ``backward``, ``train``,
``load_state_dict``, ``state_dict``, the ``reset_*`` methods, in subclasses too) holds the
layer's re-entrant lock, ``m.lock``, so one layer used from several threads at once runs its
calls one after the other, each whole: running statistics and counters are never torn. The
kernels release the GIL, so different layers in different threads run in parallel. ``backward``
refers to the layer's last forward, from whichever thread; to pair a forward with its backward
while other threads use the same layer, hold ``m.lock`` around both (``with m.lock: ...``).
"""
import functools
import threading
import types
from typing import NamedTuple

import numpy as np

__all__ = ["Module", "IncompatibleKeys", "check_writeable", "write_arrays"]

# The methods that touch a layer's state; each runs holding the layer's lock.
_LOCKED_METHODS = ("forward", "backward", "train", "load_state_dict", "state_dict",
                   "reset_parameters", "reset_running_stats")
_lock_creation = threading.Lock()


def _name_inherited_init(cls):
    """A public class that inherits __init__ from a private base (BatchNorm2d from _BatchNorm)
    gets a copy of it named after itself, so that Python's own argument errors name the class
    the user called: "BatchNorm2d.__init__() got an unexpected keyword argument", not
    "_BatchNorm.__init__() ...". The copy shares the code (and super()'s class) of the original."""
    if cls.__name__.startswith("_") or "__init__" in cls.__dict__:
        return
    inherited = cls.__init__
    if not isinstance(inherited, types.FunctionType):  # object.__init__ and the like
        return
    init = types.FunctionType(inherited.__code__, inherited.__globals__, "__init__", inherited.__defaults__,
                              inherited.__closure__)
    init.__kwdefaults__ = inherited.__kwdefaults__
    init.__doc__ = inherited.__doc__
    init.__module__ = cls.__module__
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict`` returns, as torch's ``_IncompatibleKeys``."""

    missing_keys: list
    unexpected_keys: list


def check_writeable(name, array):
    """ValueError unless `array` (the state called `name`) can be written in place."""
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only and cannot be updated in place "
                         f"(make it writeable with {name}.setflags(write=True))")


def write_arrays(updates):
    """Write each ``(name, destination, value)`` into its destination array, all or none.

    Every destination is checked (writeable, the value broadcastable to its shape) and every
    value is cast to the destination's dtype before the first write: a refusal, or a warning
    turned into an error (a cast that overflows under ``warnings.simplefilter("error")``), leaves
    every destination as it was. The built-in layers commit a training step's running
    statistics and counters with it.

    Parameters
    ----------
    updates : iterable of (str, ndarray, array_like)
        The name (for the error messages), the destination array and its new value.

    Raises
    ------
    ValueError
        A destination is read-only, or a value cannot be broadcast to its shape.

    Examples
    --------
    >>> mean, count = np.zeros(2), np.zeros((), np.int64)
    >>> nc.toolkit.write_arrays([("running_mean", mean, [0.5, 1.5]), ("count", count, 3)])
    >>> mean.tolist(), int(count)
    ([0.5, 1.5], 3)
    >>> frozen = np.zeros(2)
    >>> frozen.setflags(write=False)
    >>> try:
    ...     nc.toolkit.write_arrays([("running_mean", mean, 0.0), ("running_var", frozen, 1.0)])
    ... except ValueError:
    ...     print(mean.tolist())                 # refused: nothing written, not even the first
    [0.5, 1.5]
    """
    staged = []
    for name, destination, value in updates:
        if not destination.flags.writeable:
            check_writeable(name, destination)  # raises
        if type(value) is not np.ndarray:  # (a training step's values are arrays already)
            value = np.asarray(value)
        if value.shape != destination.shape:  # (broadcast_to costs more than the rest together)
            try:
                value = np.broadcast_to(value, destination.shape)
            except ValueError:
                raise ValueError(f"{name} has shape {destination.shape}, which a value of shape "
                                 f"{value.shape} cannot be written into") from None
        staged.append((destination, value.astype(destination.dtype)))
    for destination, value in staged:
        destination[...] = value


def _holding_lock(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        try:
            lock = self._lock
        except AttributeError:  # first call (or a subclass that skipped Module.__init__)
            lock = self.lock
        with lock:
            return method(self, *args, **kwargs)
    locked.holds_module_lock = True
    return locked


class Module:
    """Base class of every normcore layer, built-in or plugin: normcore's ``torch.nn.Module``.

    A layer subclasses Module and implements ``forward(x)`` (``m(x)`` calls it) and
    ``backward(dy)``. It names its learnable parameters in the class attribute
    ``_parameter_names`` and its buffers (running statistics, counters) in ``_buffer_names``:
    attributes that hold NumPy arrays, or None where this layer has no such entry. From
    those the base class gives ``parameters()``, ``state_dict()`` and ``load_state_dict()``,
    with PyTorch's keys and shapes, and ``train()`` / ``eval()`` switch ``training``.
    ``Module()`` takes no arguments; a subclass's ``__init__`` calls ``super().__init__()``.
    The built-in layers keep what backward needs in ``_saved`` (None before any forward) and
    get the standard error from ``self._require_forward()``.

    Attributes
    ----------
    training : bool
        True (training mode) after construction and ``train()``, False after ``eval()``.
    grads : dict
        Parameter name -> its gradient, set by each ``backward`` (empty at first).
    lock : threading.RLock
        The layer's re-entrant lock, held by every call that touches its state.

    Notes
    -----
    Threads: ``forward``, ``backward``, ``train``, ``state_dict``, ``load_state_dict`` and
    the ``reset_*`` methods, the base class's and any subclass's, hold ``m.lock``, so one
    layer used from several threads runs its calls one after the other, each whole. The
    kernels release the GIL, so different layers run in parallel. ``backward`` refers to the
    layer's last forward, from whichever thread: hold the lock around both to pair them
    (``with m.lock: y = m(x); dx = m.backward(dy)``), or give each thread its own copy.

    Copies: pickling or ``copy.deepcopy`` gives a layer with the same parameters, buffers and
    mode and a lock of its own, but not the last forward (``_saved`` is None): its
    ``backward`` raises RuntimeError until it has run a forward.

    Where normcore differs from torch: there is no autograd, ``backward(dy)`` computes the
    gradient of the last forward explicitly; ``parameters()`` is a dict of the arrays
    themselves, not an iterator; ``state_dict()`` returns copies and ``load_state_dict()``
    writes into the existing arrays.

    Examples
    --------
    A layer with one parameter, ``y = weight[c] * x``:

    >>> class Scale(nc.Module):
    ...     _parameter_names = ("weight",)
    ...     def __init__(self, num_features):
    ...         super().__init__()
    ...         self.weight = np.ones(num_features)
    ...         self._saved = None
    ...     def forward(self, x):
    ...         self._saved = x = nc.toolkit.as_float_array(x)
    ...         return x * self.weight[:, None]
    ...     def backward(self, dy):
    ...         x = self._require_forward()
    ...         self.grads = {"weight": (dy * x).sum(axis=(0, 2))}
    ...         return dy * self.weight[:, None]
    >>> m = Scale(3)
    >>> m.parameters()["weight"] is m.weight, sorted(m.state_dict())
    (True, ['weight'])
    >>> y = m(np.full((2, 3, 4), 2.0))
    >>> m.backward(np.ones_like(y)).shape, m.grads["weight"].tolist()
    ((2, 3, 4), [16.0, 16.0, 16.0])
    >>> m.eval().training
    False
    """

    _parameter_names = ()
    _buffer_names = ()

    def __init_subclass__(cls, **kwargs):
        """Wrap the state-touching methods a subclass defines so that they hold ``self.lock``;
        give a public class that inherits its ``__init__`` one named after itself."""
        super().__init_subclass__(**kwargs)
        _name_inherited_init(cls)
        for name in _LOCKED_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "holds_module_lock", False):
                setattr(cls, name, _holding_lock(method))

    def __init__(self):
        self.training = True
        # name -> gradient of that parameter, set by each backward.
        self.grads = {}

    @property
    def lock(self):
        """The layer's re-entrant lock, held by every call that touches its state."""
        lock = self.__dict__.get("_lock")
        if lock is None:
            with _lock_creation:
                lock = self.__dict__.setdefault("_lock", threading.RLock())
        return lock

    def __getstate__(self):
        # A lock can be neither pickled nor deep-copied: a copy gets a lock of its own. The last
        # forward (a view of its input, as large as the batch) is not part of the layer's state:
        # a copy starts with none, as after construction.
        state = self.__dict__.copy()
        state.pop("_lock", None)
        if "_saved" in state:
            state["_saved"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # -- the interface a layer implements ---------------------------------------------------
    def forward(self, x):
        """Compute the layer's output for `x`; ``m(x)`` calls it.

        Every layer implements it (the base class raises NotImplementedError); what it
        computes and the shapes it takes are in the layer's docstring. In training, a layer
        with running statistics updates them.

        Parameters
        ----------
        x : array_like
            The input: float32 or float64, of a shape the layer takes.

        Returns
        -------
        ndarray
            y; for the built-in layers of x's shape and dtype.

        Examples
        --------
        >>> m = nc.LayerNorm(4)
        >>> m.forward(np.arange(8.0).reshape(2, 4)).round(3).tolist()
        [[-1.342, -0.447, 0.447, 1.342], [-1.342, -0.447, 0.447, 1.342]]
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(x)")

    def backward(self, dy):
        """dx for the last forward, given `dy`, the gradient with respect to its output.

        Also sets ``grads``: parameter name -> gradient (the parameter's shape and dtype;
        empty for a layer without parameters). It differentiates the forward that ran, with
        its input and the parameters as they were at that forward, and may be called more
        than once for one forward. It recomputes from that input, which must not have been
        modified in place in between. The base class raises NotImplementedError.

        Parameters
        ----------
        dy : array_like
            float32 or float64, of the shape of the last forward's output (cast to its dtype).

        Returns
        -------
        ndarray
            dx, of the shape and dtype of the last forward's input.

        Raises
        ------
        RuntimeError
            No forward has run yet (``"... backward called before any forward"``), also on a
            pickled or copied layer.
        ValueError
            `dy` does not have the last forward's shape.

        Examples
        --------
        >>> m = nc.GroupNorm(2, 4)
        >>> y = m(np.random.default_rng(0).standard_normal((2, 4, 3)))
        >>> dx = m.backward(np.ones_like(y))
        >>> dx.shape, sorted(m.grads), m.grads["bias"].tolist()
        ((2, 4, 3), ['bias', 'weight'], [6.0, 6.0, 6.0, 6.0])
        >>> nc.GroupNorm(2, 4).backward(np.ones((2, 4, 3)))
        Traceback (most recent call last):
            ...
        RuntimeError: GroupNorm.backward called before any forward
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement backward(dy)")

    def __call__(self, x):
        """``m(x)`` is ``m.forward(x)``."""
        return self.forward(x)

    # -- mode ----------------------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (True) or evaluation mode (False); returns self.

        In training, BatchNorm and InstanceNorm (with running statistics) normalize with the
        batch's statistics and update the running ones; in eval they use the running ones.
        GroupNorm, LayerNorm and LocalResponseNorm are the same in both modes.

        Parameters
        ----------
        mode : bool, default True
            The new value of ``training``.

        Returns
        -------
        Module
            self.

        Raises
        ------
        ValueError
            `mode` is not a bool (as torch).

        Examples
        --------
        >>> m = nc.BatchNorm1d(3)
        >>> m.train(False).training, m.train().training
        (False, True)
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be boolean, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode, as ``train(False)``; returns self.

        Returns
        -------
        Module
            self.

        Examples
        --------
        >>> m = nc.BatchNorm1d(3).eval()     # the running statistics from now on
        >>> m.training
        False
        """
        return self.train(False)

    # -- parameters and state ------------------------------------------------------------------
    def parameters(self):
        """The learnable parameters: name -> the array itself (not a copy).

        Update the arrays in place to train (``p -= lr * m.grads[name]``): the layer uses them
        at its next forward. A parameter that the layer does not have (None) is left out.

        Returns
        -------
        dict
            Parameter name -> ndarray (for the built-ins, torch's names and order).

        Examples
        --------
        >>> m = nc.BatchNorm1d(3)
        >>> params = m.parameters()
        >>> sorted(params), params["weight"] is m.weight
        (['bias', 'weight'], True)
        >>> nc.BatchNorm1d(3, affine=False).parameters()
        {}
        """
        return {n: getattr(self, n) for n in self._parameter_names if getattr(self, n) is not None}

    def _state_names(self):
        return [n for n in (*self._parameter_names, *self._buffer_names) if getattr(self, n, None) is not None]

    def state_dict(self):
        """A copy of every parameter and buffer, with PyTorch's keys and shapes.

        Parameters and buffers that the layer does not have (None) are left out, as in torch:
        a BatchNorm has ``num_batches_tracked`` (a 0-d int64 array) only with
        ``track_running_stats``.

        Returns
        -------
        dict
            Name -> a new ndarray, a copy (changing it does not change the layer).

        Examples
        --------
        >>> m = nc.BatchNorm1d(3)
        >>> state = m.state_dict()
        >>> sorted(state)
        ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
        >>> state["weight"] is m.weight, state["num_batches_tracked"].dtype
        (False, dtype('int64'))
        """
        return {n: np.array(getattr(self, n), copy=True) for n in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters and buffers from `state_dict` into the layer's existing arrays.

        Takes what ``state_dict()`` returns, normcore's or PyTorch's (NumPy arrays or torch
        tensors, with PyTorch's keys and shapes). The values are cast to the arrays' dtypes
        and written in place, so the arrays ``parameters()`` returned stay the layer's.
        Every entry is checked (shape, dtype, writable destination) before any is written: a
        refused load changes nothing.

        Parameters
        ----------
        state_dict : mapping
            Name -> array.
        strict : bool, default True
            True: the keys must be exactly those of ``state_dict()``, or KeyError names the
            missing and the unexpected ones. False: the entries whose key matches are
            loaded, and the others are reported in the result.

        Returns
        -------
        IncompatibleKeys
            A named tuple ``(missing_keys, unexpected_keys)``, two lists of names, as torch's
            (both empty after a strict load).

        Raises
        ------
        KeyError
            With ``strict=True``, missing or unexpected keys.
        ValueError
            A value's shape differs from the layer's, or a destination array is read-only.
        TypeError
            `state_dict` is not a mapping, a value is not an array of real numbers (of
            integers for ``num_batches_tracked``), or `strict` is not a bool.

        Examples
        --------
        >>> src = nc.BatchNorm1d(3)
        >>> src.running_mean[:] = [1.0, 2.0, 3.0]
        >>> dst = nc.BatchNorm1d(3)
        >>> _ = dst.load_state_dict(src.state_dict())
        >>> dst.running_mean.tolist()
        [1.0, 2.0, 3.0]
        >>> partial = src.state_dict()
        >>> del partial["running_var"]
        >>> try:
        ...     dst.load_state_dict(partial)
        ... except KeyError as error:
        ...     print("missing key(s) ['running_var']" in str(error))
        True
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        if not isinstance(strict, (bool, np.bool_)):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        expected = self._state_names()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict.keys() if k not in expected]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing}")
            if unexpected:
                parts.append(f"unexpected key(s) {unexpected}")
            raise KeyError(
                f"Error loading state_dict into {type(self).__name__}: {'; '.join(parts)} "
                f"(expected exactly {expected})"
            )
        updates = []
        for name in expected:
            if name not in state_dict:
                continue
            current = getattr(self, name)
            value = state_dict[name]
            if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
                value = value.detach().cpu().numpy()
            try:
                value = np.asarray(value)
            except Exception as exc:  # noqa: BLE001 - report any failed conversion as a type error
                raise TypeError(f"state_dict[{name!r}] is not an array: {exc}") from exc
            kinds = "iu" if current.dtype.kind in "iu" else "fiu"
            if value.dtype.kind not in kinds:
                raise TypeError(
                    f"state_dict[{name!r}] must hold {'integers' if kinds == 'iu' else 'real numbers'}, "
                    f"got dtype {value.dtype}"
                )
            if value.shape != current.shape:
                raise ValueError(
                    f"size mismatch for {name}: got shape {value.shape} from the state dict, "
                    f"the module has shape {current.shape}"
                )
            updates.append((name, current, value))
        write_arrays(updates)
        return IncompatibleKeys(missing, unexpected)

    # -- helpers for subclasses ----------------------------------------------------------------
    def _store_grads(self, grads):
        """self.grads = the given gradients of the parameters this layer has (a parameter that is
        None, e.g. bias=False, gets none), in the parameters' dtype."""
        self.grads = {name: np.asarray(g).astype(getattr(self, name).dtype)
                      for name, g in grads.items() if getattr(self, name, None) is not None}

    def _require_forward(self):
        saved = getattr(self, "_saved", None)
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before any forward")
        return saved


for _name in _LOCKED_METHODS:
    if _name in Module.__dict__:
        setattr(Module, _name, _holding_lock(Module.__dict__[_name]))
del _name
