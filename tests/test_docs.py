"""The public API's docstrings (issue item 23): present, in numpydoc's sections, and their
examples run.

The public API is every class and function in ``normcore.__all__``, ``normcore.functional.__all__``
and ``normcore.toolkit.__all__``, the SwitchableNorm classes of ``normcore.plugins.switchable``
and the public methods of ``nc.Module``. Each docstring of its own (not inherited) must have a
summary line, an Examples section with at least one example, a Parameters section that names
every argument of the signature when the object takes arguments (a class: its ``__init__``),
and, for a layer (an ``nc.Module`` subclass), a Shape section. The examples, those of the
methods that the classes define included, run under the standard library's doctest with
``np`` and ``nc`` in their globals. Neither torch nor mpi4py is needed: SyncBatchNorm's
examples are marked ``+SKIP`` (they need ``mpiexec``).
"""
import doctest
import inspect

import numpy as np
import pytest

import normcore as nc
from normcore import registry, threads
from normcore.plugins import switchable

MODULE_METHODS = ("forward", "backward", "train", "eval", "parameters", "state_dict", "load_state_dict")
OPTIONFLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def public_objects():
    """Qualified name -> object, for every public class and function."""
    objects = {}
    for module, prefix in ((nc, "nc"), (nc.functional, "nc.functional"), (nc.toolkit, "nc.toolkit"),
                           (switchable, "nc.plugins.switchable")):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):  # nc.functional and nc.toolkit are modules
                objects[f"{prefix}.{name}"] = obj
    for name in MODULE_METHODS:
        objects[f"nc.Module.{name}"] = getattr(nc.Module, name)
    return objects


PUBLIC = public_objects()


def own_docstring(obj):
    """The object's own docstring (a class's is not inherited), cleaned of its indentation."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return inspect.cleandoc(doc) if doc else ""


def sections(doc):
    """Title -> lines of each numpydoc section: a title line underlined by as many dashes."""
    lines = doc.splitlines()
    found = {}
    title = None
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        underline = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line and underline and set(underline) == {"-"} and len(underline) == len(line):
            title = line
            found[title] = []
            i += 2
            continue
        if title is not None:
            found[title].append(lines[i])
        i += 1
    return found


def documented_names(parameter_lines):
    """The argument names a Parameters section documents (``a, b : type`` documents a and b)."""
    names = set()
    for line in parameter_lines:
        if line and not line[0].isspace():
            names.update(n.strip().lstrip("*") for n in line.split(" : ")[0].split(","))
    return names


def arguments(obj):
    """The names of the arguments the object takes (for a class, its ``__init__``'s), self left out."""
    target = obj
    if inspect.isclass(obj):
        target = obj.__init__
        if not inspect.isfunction(target):  # object's or an exception's __init__: no arguments of its own
            return []
    return [p for p in inspect.signature(target).parameters if p != "self"]


def is_layer(obj):
    return inspect.isclass(obj) and issubclass(obj, nc.Module) and obj is not nc.Module


def problems(obj):
    """What the object's docstring lacks, as sentences (none: the docstring is complete)."""
    doc = own_docstring(obj)
    if not doc:
        return ["no docstring"]
    found = sections(doc)
    missing = []
    if not doc.splitlines()[0].strip():
        missing.append("no summary line")
    if "Examples" not in found:
        missing.append("no Examples section")
    elif not doctest.DocTestParser().get_examples("\n".join(found["Examples"])):
        missing.append("an Examples section without a >>> example")
    args = arguments(obj)
    if args:
        if "Parameters" not in found:
            missing.append(f"no Parameters section (it takes {', '.join(args)})")
        else:
            undocumented = [a for a in args if a not in documented_names(found["Parameters"])]
            if undocumented:
                missing.append(f"Parameters does not document {', '.join(undocumented)}")
    if is_layer(obj) and "Shape" not in found:
        missing.append("no Shape section")
    return missing


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_has_the_sections(name):
    assert problems(PUBLIC[name]) == [], f"{name}'s docstring: {'; '.join(problems(PUBLIC[name]))}"


def test_the_api_is_all_there():
    # The collection itself: a change that empties it would make every other test here pass.
    for name in ("nc.BatchNorm2d", "nc.SyncBatchNorm", "nc.Module.load_state_dict", "nc.functional.batch_norm",
                 "nc.toolkit.apply_rows", "nc.toolkit.check_eps", "nc.register_norm", "nc.UnknownNormError",
                 "nc.set_num_threads", "nc.plugins.switchable.SwitchableNorm1d"):
        assert name in PUBLIC
    assert sum(is_layer(obj) for obj in PUBLIC.values()) == 13


def test_a_missing_section_is_found():
    """The checks above fail for a docstring that lacks what they ask for."""

    def documented(x, y=1):
        """Summary.

        Parameters
        ----------
        x, y : int
            Numbers.

        Examples
        --------
        >>> 1 + 1
        2
        """

    def no_examples(x):
        """Summary.

        Parameters
        ----------
        x : int
            A number.
        """

    def half_documented(x, y):
        """Summary.

        Parameters
        ----------
        x : int
            A number.

        Examples
        --------
        >>> 1
        1
        """

    class Layer(nc.Module):
        """A layer.

        Examples
        --------
        >>> 1
        1
        """

    assert problems(documented) == []
    assert problems(no_examples) == ["no Examples section"]
    assert problems(half_documented) == ["Parameters does not document y"]
    assert problems(Layer) == ["no Shape section"]
    assert problems(lambda x: x) == ["no docstring"]


def collect_doctests():
    """Test name -> doctest.DocTest with examples, for the public objects and the methods their
    classes define."""
    finder = doctest.DocTestFinder(recurse=True)
    tests = {}
    for name, obj in PUBLIC.items():
        for test in finder.find(obj, name, globs={"np": np, "nc": nc}):
            if test.examples:
                tests.setdefault(test.name, test)
    return tests


DOCTESTS = collect_doctests()


@pytest.fixture
def global_state_restored():
    """The examples register norms and set the thread count: put both back afterwards."""
    entries = dict(registry._registry._entries)
    requested = threads._requested
    yield
    registry._registry._entries.clear()
    registry._registry._entries.update(entries)
    threads._requested = requested


@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_docstring_examples_run(name, global_state_restored):
    report = []
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    result = runner.run(DOCTESTS[name], out=report.append, clear_globs=True)
    assert result.failed == 0, "".join(report)


def test_every_public_object_has_running_examples():
    # Each public object's own examples are among those run (SyncBatchNorm's are all skipped).
    assert set(PUBLIC) <= set(DOCTESTS)
