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

__all__ = ["Module", "IncompatibleKeys", "write_arrays"]

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


def write_arrays(updates):
    """Write each ``(name, destination, value)`` into its destination array, all or none.

    Every destination is checked (writeable, the value broadcastable to its shape) and every
    value is cast to the destination's dtype before the first write: a refusal, or a warning
    turned into an error (a cast that overflows under ``warnings.simplefilter("error")``), leaves
    every destination as it was.
    """
    staged = []
    for name, destination, value in updates:
        if not destination.flags.writeable:
            raise ValueError(f"{name} is read-only and cannot be updated in place "
                             f"(make it writeable with {name}.setflags(write=True))")
        value = np.asarray(value)
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
    """Base class of normcore layers. ``Module()`` takes no arguments."""

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
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(x)")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} does not implement backward(dy)")

    def __call__(self, x):
        return self.forward(x)

    # -- mode ----------------------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (True) or evaluation mode (False); returns self."""
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be boolean, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode; returns self."""
        return self.train(False)

    # -- parameters and state ------------------------------------------------------------------
    def parameters(self):
        """name -> the parameter array itself (update it in place to train)."""
        return {n: getattr(self, n) for n in self._parameter_names if getattr(self, n) is not None}

    def _state_names(self):
        return [n for n in (*self._parameter_names, *self._buffer_names) if getattr(self, n, None) is not None]

    def state_dict(self):
        """name -> a copy of every parameter and buffer, with PyTorch's keys and shapes."""
        return {n: np.array(getattr(self, n), copy=True) for n in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters and buffers saved by ``state_dict`` (normcore's or PyTorch's, as NumPy
        arrays or tensors) into the existing arrays.

        With ``strict=True`` the keys must match exactly (KeyError naming the missing and the
        unexpected ones); with ``strict=False`` the entries whose key matches are loaded and the
        others are reported. Every entry loaded is checked before any is written: wrong shapes
        (ValueError), non-numeric values (TypeError), a read-only destination (ValueError) or a
        cast that fails leave the module untouched. Returns ``IncompatibleKeys(missing_keys,
        unexpected_keys)``, as torch.
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
