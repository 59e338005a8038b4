"""The norm registry: every normalization method, built-in or plugin, found by name.

    @nc.register_norm("my_norm", aliases=("mynorm2",))
    class MyNorm(nc.Module): ...

    nc.get_norm("MyNorm")            # the class; case, '_' and '-' are ignored
    nc.create_norm("my-norm", 16)    # an instance
    nc.list_norms()                  # sorted names; imports no third-party plugin

Three sources, consulted in this order: the built-in layers (registered when normcore is
imported), the plugins shipped in ``normcore.plugins`` (imported when a lookup first needs
them), and third-party entry points in the group ``normcore.norms``. Entry points are indexed
lazily and a plugin's module is imported only when its name is asked for; a name that is not
found makes the index re-read, so a package installed after ``import normcore`` is found. A
plugin that fails to load raises PluginLoadError (chained to the cause) and leaves every other
lookup working. A built-in (or shipped plugin) wins a clash with an entry point, with a warning.
"""
import difflib
import importlib
import importlib.metadata
import threading
import warnings

from normcore.module import Module

__all__ = [
    "register_norm",
    "get_norm",
    "create_norm",
    "list_norms",
    "RegistryError",
    "UnknownNormError",
    "DuplicateNormError",
    "PluginLoadError",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "normcore.norms"

# The modules of normcore.plugins that register norms when imported.
_SHIPPED_PLUGINS = ("normcore.plugins.switchable",)


class RegistryError(Exception):
    """Base class of the registry's errors: catch it to catch any of them.

    Each subclass is also the built-in exception its case is usually caught as:
    UnknownNormError a KeyError, DuplicateNormError a ValueError, PluginLoadError an
    ImportError.

    Examples
    --------
    >>> try:
    ...     nc.get_norm("no_such_norm")
    ... except nc.RegistryError as error:
    ...     print(type(error).__name__)
    UnknownNormError
    """


class UnknownNormError(RegistryError, KeyError):
    """No norm is registered under that name (raised by ``get_norm`` and ``create_norm``).

    The message names the close matches and every available name. A subclass of KeyError
    (its ``str`` is the message itself, without KeyError's quotes).

    Examples
    --------
    >>> try:
    ...     nc.get_norm("batch_nrom2d")
    ... except nc.UnknownNormError as error:
    ...     print(error)
    no norm named 'batch_nrom2d'. Did you mean 'batch_norm2d'...? Available: batch_norm1d, ...
    """

    def __str__(self):  # KeyError would show the message with quotes around it
        return str(self.args[0]) if self.args else ""


class DuplicateNormError(RegistryError, ValueError):
    """The name is taken by another class (and ``override=False``); raised by ``register_norm``.

    The message names both classes; the refused registration changes nothing. A subclass of
    ValueError.

    Examples
    --------
    >>> try:
    ...     @nc.register_norm("batch_norm2d")
    ...     class MyNorm(nc.Module):
    ...         pass
    ... except nc.DuplicateNormError as error:
    ...     print(error)
    cannot register ...MyNorm as 'batch_norm2d': the name is taken by normcore.batch_norm.BatchNorm2d ...
    >>> nc.get_norm("batch_norm2d") is nc.BatchNorm2d
    True
    """


class PluginLoadError(RegistryError, ImportError):
    """A plugin's entry point could not be loaded, or does not give an nc.Module subclass.

    Raised by ``get_norm`` / ``create_norm`` for the name of an entry point (group
    ``normcore.norms``) whose module fails to import; chained to the cause (``__cause__``).
    Every other lookup keeps working. A subclass of ImportError.

    Examples
    --------
    >>> issubclass(nc.PluginLoadError, ImportError)
    True
    """


def canonical(name):
    """The key a name is looked up by: lower case, without '_' and '-'."""
    if not isinstance(name, str):
        raise TypeError(f"a norm name must be a str, got {type(name).__name__}")
    key = name.lower().replace("_", "").replace("-", "")
    if not key:
        raise ValueError(f"a norm name must contain a letter or digit, got {name!r}")
    return key


def _owner(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


class _Entry:
    __slots__ = ("name", "cls", "primary")

    def __init__(self, name, cls, primary):
        self.name = name          # the name as registered
        self.cls = cls
        self.primary = primary    # False for an alias


class _Registry:
    def __init__(self):
        self._lock = threading.RLock()
        self._entries = {}            # canonical key -> _Entry
        self._entry_points = None     # canonical key -> EntryPoint, built on first need
        self._shipped_loaded = False

    # -- registration ------------------------------------------------------------------------
    def register(self, cls, name, aliases=(), override=False):
        if not (isinstance(cls, type) and issubclass(cls, Module)):
            raise TypeError(f"only nc.Module subclasses can be registered as norms, got {cls!r}")
        if isinstance(aliases, str):
            aliases = (aliases,)
        names = [name, *aliases]
        keys = [canonical(n) for n in names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"the names {names} of {_owner(cls)} repeat one another (case, '_' and '-' ignored)")
        with self._lock:
            if not override:
                for n, key in zip(names, keys):
                    taken = self._entries.get(key)
                    if taken is not None and taken.cls is not cls:
                        raise DuplicateNormError(
                            f"cannot register {_owner(cls)} as {n!r}: the name is taken by "
                            f"{_owner(taken.cls)} (registered as {taken.name!r}); pass override=True "
                            "to replace it")
            for i, (n, key) in enumerate(zip(names, keys)):
                self._entries[key] = _Entry(n, cls, i == 0)
        return cls

    # -- sources -----------------------------------------------------------------------------
    def _load_shipped(self):
        if self._shipped_loaded:
            return
        self._shipped_loaded = True
        for module in _SHIPPED_PLUGINS:
            importlib.import_module(module)

    def _index_entry_points(self):
        """canonical name -> entry point, for the entry points that clash with nothing."""
        index = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                key = canonical(ep.name)
            except (TypeError, ValueError) as exc:  # one malformed entry point must not break the rest
                warnings.warn(
                    f"the entry point {ep.name!r} = {ep.value!r} ({_dist_name(ep)}) in group "
                    f"{ENTRY_POINT_GROUP!r} is ignored: {exc}", RuntimeWarning, stacklevel=4)
                continue
            if key in self._entries and not getattr(self._entries[key].cls, "_normcore_entry_point", None):
                warnings.warn(
                    f"the entry point {ep.name!r} = {ep.value!r} ({_dist_name(ep)}) is ignored: "
                    f"{self._entries[key].name!r} is a built-in norm ({_owner(self._entries[key].cls)})",
                    RuntimeWarning, stacklevel=4)
                continue
            index.setdefault(key, ep)
        return index

    def _entry_point_index(self, refresh=False):
        if self._entry_points is None or refresh:
            if refresh:
                importlib.invalidate_caches()
            self._entry_points = self._index_entry_points()
        return self._entry_points

    def _load_entry_point(self, key, ep):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"the norm plugin entry point {ep.name!r} = {ep.value!r} of distribution "
                f"{_dist_name(ep)} failed to load: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(obj, type) and issubclass(obj, Module)):
            raise PluginLoadError(
                f"the norm plugin entry point {ep.name!r} = {ep.value!r} of distribution {_dist_name(ep)} "
                f"gives {obj!r}, not an nc.Module subclass")
        with self._lock:
            taken = self._entries.get(key)
            if taken is None or taken.cls is not obj:
                obj._normcore_entry_point = ep.value
                self._entries[key] = _Entry(ep.name, obj, True)
        return obj

    # -- lookup ------------------------------------------------------------------------------
    def get(self, name):
        key = canonical(name)
        entry = self._entries.get(key)
        if entry is not None:
            return entry.cls
        with self._lock:
            self._load_shipped()
            entry = self._entries.get(key)
            if entry is not None:
                return entry.cls
            for refresh in (False, True):
                ep = self._entry_point_index(refresh).get(key)
                if ep is not None:
                    return self._load_entry_point(key, ep)
        raise UnknownNormError(self._unknown_message(name))

    def names(self):
        with self._lock:
            self._load_shipped()
            names = {e.name for e in self._entries.values() if e.primary}
            names.update(ep.name for k, ep in self._entry_point_index(refresh=True).items()
                         if k not in self._entries)
        return sorted(names)

    def _unknown_message(self, name):
        available = self.names()
        by_key = {canonical(n): n for n in available}
        close = difflib.get_close_matches(canonical(name), list(by_key), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(by_key[k]) for k in close)}?" if close else ""
        return f"no norm named {name!r}.{hint} Available: {', '.join(available)}"


def _dist_name(ep):
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "(unknown distribution)"


_registry = _Registry()


def register_norm(name, *, aliases=(), override=False):
    """Class decorator: register an nc.Module subclass under `name` (and `aliases`).

    A taken name raises DuplicateNormError naming both owners, unless override=True; a refused
    registration changes nothing. A class that is not an nc.Module subclass raises TypeError.
    Names are looked up with case, ``_`` and ``-`` ignored; ``list_norms()`` shows `name`,
    not the aliases. Registering the same class again under its names is allowed.

    Parameters
    ----------
    name : str
        The norm's name (with a letter or digit).
    aliases : str or sequence of str, default ()
        More names for the same class, keyword-only.
    override : bool, default False
        Replace whatever is registered under these names, keyword-only.

    Returns
    -------
    callable
        The decorator; it returns the class unchanged.

    Raises
    ------
    DuplicateNormError
        A name is taken by another class (and ``override=False``).
    TypeError
        `name` is not a str, or the decorated object is not an nc.Module subclass.
    ValueError
        A name without letters or digits, or names that repeat one another.

    Examples
    --------
    >>> @nc.register_norm("scaled_identity", aliases=("scaled-id",))
    ... class ScaledIdentity(nc.Module):
    ...     def forward(self, x):
    ...         return 2.0 * x
    >>> nc.get_norm("ScaledId") is ScaledIdentity
    True
    >>> nc.create_norm("scaled_identity")(np.ones(2)).tolist()
    [2.0, 2.0]
    """
    canonical(name)

    def decorate(cls):
        return _registry.register(cls, name, aliases, override)

    return decorate


def get_norm(name):
    """The class registered as `name` (case, '_' and '-' ignored). UnknownNormError names the
    close matches and the available names.

    Looks in the built-ins, then the plugins shipped in ``normcore.plugins`` (imported on the
    first lookup that needs them), then the entry points of the group ``normcore.norms``
    (a plugin's module is imported only when its name is asked for).

    Parameters
    ----------
    name : str
        The name, e.g. ``"BatchNorm2d"``, ``"batch_norm2d"`` or ``"batch-norm-2d"``.

    Returns
    -------
    type
        The nc.Module subclass.

    Raises
    ------
    UnknownNormError
        No norm has that name.
    PluginLoadError
        The name is that of an entry point that fails to load.
    TypeError
        `name` is not a str.

    Examples
    --------
    >>> nc.get_norm("BatchNorm2d") is nc.get_norm("batch-norm-2d") is nc.BatchNorm2d
    True
    >>> nc.get_norm("switchable_norm2d").__name__      # a shipped plugin
    'SwitchableNorm2d'
    """
    return _registry.get(name)


def create_norm(name, *args, **kwargs):
    """An instance of the norm registered as `name`: ``get_norm(name)(*args, **kwargs)``.

    Parameters
    ----------
    name : str
        The norm's name (case, ``_`` and ``-`` ignored).
    *args, **kwargs
        The arguments of the class's constructor.

    Returns
    -------
    Module
        The new layer.

    Raises
    ------
    UnknownNormError, PluginLoadError, TypeError
        As ``get_norm``; and whatever the constructor raises.

    Examples
    --------
    >>> m = nc.create_norm("group-norm", 4, 16)        # nc.GroupNorm(4, 16)
    >>> type(m).__name__, m.num_groups, m.num_channels
    ('GroupNorm', 4, 16)
    """
    return get_norm(name)(*args, **kwargs)


def list_norms():
    """Sorted names of every norm: built-in, shipped plugins and third-party entry points
    (whose modules are not imported).

    Each class appears under the name it was registered with (not its aliases). The entry
    points are read again at every call, so a plugin installed after ``import normcore`` is
    listed.

    Returns
    -------
    list of str

    Examples
    --------
    >>> names = nc.list_norms()
    >>> "batch_norm2d" in names, "switchable_norm2d" in names, names == sorted(names)
    (True, True, True)
    """
    return _registry.names()
