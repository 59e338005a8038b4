"""The norm registry: names, errors, entry-point plugins (with temporary distributions on
sys.path), and the example third-party plugin under examples/ installed with pip."""
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import normcore as nc
import reference as ref
from normcore import registry

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ["batch_norm1d", "batch_norm2d", "batch_norm3d", "instance_norm1d", "instance_norm2d", "instance_norm3d",
            "layer_norm", "group_norm", "local_response_norm", "switchable_norm1d", "switchable_norm2d",
            "switchable_norm3d", "sync_batch_norm"]


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test starts from, and leaves, the registry as it found it (with the shipped plugins
    loaded: their modules register once, on first import, so they must be in the snapshot)."""
    registry._registry._load_shipped()
    entries = dict(registry._registry._entries)
    yield
    registry._registry._entries.clear()
    registry._registry._entries.update(entries)
    registry._registry._entry_points = None


def make_distribution(root, dist, module, source, entry_points):
    """A minimal installed distribution: a module and its .dist-info with entry points."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[normcore.norms]\n{lines}\n")


PLUGIN_SOURCE = """
    import numpy as np
    import normcore as nc

    class Scale(nc.Module):
        def __init__(self, factor=2.0):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return np.asarray(x) * self.factor

        def backward(self, dy):
            return np.asarray(dy) * self.factor
"""


def test_builtin_names_and_lookup_rules():
    assert nc.list_norms() == sorted(BUILTINS)
    assert nc.get_norm("batch_norm2d") is nc.BatchNorm2d
    assert nc.get_norm("BatchNorm2d") is nc.BatchNorm2d
    assert nc.get_norm("batch-norm-2d") is nc.BatchNorm2d
    assert nc.get_norm("LOCAL_RESPONSE_NORM") is nc.LocalResponseNorm
    m = nc.create_norm("GroupNorm", 2, 4, eps=1e-3)
    assert isinstance(m, nc.GroupNorm) and m.eps == 1e-3


def test_unknown_name_names_close_matches_and_the_available_ones():
    with pytest.raises(nc.UnknownNormError) as info:
        nc.get_norm("batchnorm2")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, nc.RegistryError)
    assert "Did you mean" in str(err) and "'batch_norm2d'" in str(err)
    assert "Available: batch_norm1d" in str(err)
    with pytest.raises(KeyError):
        nc.create_norm("no-such-norm")


def test_register_duplicate_override_and_type_rules():
    @nc.register_norm("my_norm", aliases=("mine",))
    class Mine(nc.Module):
        pass

    assert nc.get_norm("MyNorm") is Mine and nc.get_norm("mine") is Mine
    assert "my_norm" in nc.list_norms() and "mine" not in nc.list_norms()  # aliases are not listed

    class Other(nc.Module):
        pass

    before = dict(registry._registry._entries)
    with pytest.raises(nc.DuplicateNormError) as info:
        nc.register_norm("fresh_name", aliases=("my-norm",))(Other)
    assert isinstance(info.value, ValueError)
    assert "Mine" in str(info.value) and "Other" in str(info.value)
    assert registry._registry._entries == before  # refused: nothing registered, not even fresh_name
    with pytest.raises(nc.DuplicateNormError, match="BatchNorm2d"):
        nc.register_norm("BatchNorm2d")(Other)
    nc.register_norm("my_norm", override=True)(Other)
    assert nc.get_norm("my_norm") is Other
    with pytest.raises(TypeError, match="nc.Module"):
        nc.register_norm("not_a_module")(dict)
    with pytest.raises(TypeError, match="nc.Module"):
        nc.register_norm("an_instance")(Mine())
    nc.register_norm("mine")(Mine)  # registering the same class again under its own name is harmless


def test_entry_point_loaded_only_when_asked_for(tmp_path, monkeypatch):
    make_distribution(tmp_path, "scale-plugin", "scale_plugin_mod", PLUGIN_SOURCE,
                      {"scale_norm": "scale_plugin_mod:Scale"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._registry._entry_points = None
    assert "scale_norm" in nc.list_norms()
    assert "scale_plugin_mod" not in sys.modules  # listing imports nothing
    m = nc.create_norm("Scale-Norm", 3.0)
    assert "scale_plugin_mod" in sys.modules
    assert np.array_equal(m(np.ones(2)), [3.0, 3.0])
    monkeypatch.delitem(sys.modules, "scale_plugin_mod")


def test_package_installed_after_import_is_found(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(nc.UnknownNormError):
        nc.get_norm("late_norm")  # indexes the entry points: none yet
    make_distribution(tmp_path, "late-plugin", "late_plugin_mod", PLUGIN_SOURCE, {"late_norm": "late_plugin_mod:Scale"})
    assert nc.get_norm("late_norm").__name__ == "Scale"
    monkeypatch.delitem(sys.modules, "late_plugin_mod")


def test_a_malformed_entry_point_name_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """An entry point named '___' (no letter or digit) is skipped with a warning naming its
    distribution; every other lookup keeps working (issue 12, item 5: it made list_norms() and
    every plugin lookup raise ValueError)."""
    make_distribution(tmp_path / "a", "odd-plugin", "odd_plugin_mod", PLUGIN_SOURCE, {"___": "odd_plugin_mod:Scale"})
    make_distribution(tmp_path / "b", "good-plugin", "good_plugin_mod", PLUGIN_SOURCE, {"good_norm": "good_plugin_mod:Scale"})
    for d in "ab":
        monkeypatch.syspath_prepend(str(tmp_path / d))
    registry._registry._entry_points = None
    with pytest.warns(RuntimeWarning, match=r"'___'.*odd-plugin 1\.0.*ignored"):
        names = nc.list_norms()
    assert "good_norm" in names and "___" not in names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nc.get_norm("good_norm").__name__ == "Scale"
        assert nc.get_norm("switchable_norm2d").__name__ == "SwitchableNorm2d"
        with pytest.raises(nc.UnknownNormError):
            nc.get_norm("nothing_like_this")
    monkeypatch.delitem(sys.modules, "good_plugin_mod", raising=False)


def test_broken_plugin_raises_plugin_load_error_and_breaks_nothing_else(tmp_path, monkeypatch):
    make_distribution(tmp_path / "a", "broken-plugin", "broken_plugin_mod", "raise RuntimeError('boom at import')\n",
                      {"broken_norm": "broken_plugin_mod:Nope"})
    make_distribution(tmp_path / "b", "notmodule-plugin", "notmodule_plugin_mod", "class NotANorm: pass\n",
                      {"notmodule_norm": "notmodule_plugin_mod:NotANorm"})
    make_distribution(tmp_path / "c", "good-plugin", "good_plugin_mod", PLUGIN_SOURCE, {"good_norm": "good_plugin_mod:Scale"})
    for d in "abc":
        monkeypatch.syspath_prepend(str(tmp_path / d))
    registry._registry._entry_points = None
    with pytest.raises(nc.PluginLoadError) as info:
        nc.get_norm("broken_norm")
    err = info.value
    assert isinstance(err, ImportError) and isinstance(err, nc.RegistryError)
    assert "broken_norm" in str(err) and "broken-plugin" in str(err) and "boom at import" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    with pytest.raises(nc.PluginLoadError, match="not an nc.Module subclass"):
        nc.get_norm("notmodule_norm")
    assert nc.get_norm("good_norm").__name__ == "Scale"
    assert nc.get_norm("batch_norm2d") is nc.BatchNorm2d
    assert "broken_norm" in nc.list_norms()
    for mod in ("good_plugin_mod", "notmodule_plugin_mod"):
        monkeypatch.delitem(sys.modules, mod, raising=False)


def test_builtin_wins_a_clash_with_an_entry_point(tmp_path, monkeypatch):
    make_distribution(tmp_path, "clash-plugin", "clash_plugin_mod", PLUGIN_SOURCE, {"BatchNorm2d": "clash_plugin_mod:Scale"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._registry._entry_points = None
    with pytest.warns(RuntimeWarning, match="is a built-in norm"):
        names = nc.list_norms()
    assert names.count("batch_norm2d") == 1 and "BatchNorm2d" not in names
    assert nc.get_norm("batch_norm2d") is nc.BatchNorm2d
    assert "clash_plugin_mod" not in sys.modules


def test_example_plugin_installs_with_pip_and_is_created_by_name(tmp_path, monkeypatch):
    """examples/frn: FilterResponseNorm on the public toolkit, found through its entry point."""
    target = tmp_path / "site"
    # No build isolation (no index needed): this environment's setuptools builds the wheel, and
    # needs bdist_wheel, its own from 70.1 (the test extra asks for setuptools>=70.1).
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "--target", str(target), str(ROOT / "examples" / "frn")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    monkeypatch.syspath_prepend(str(target))
    registry._registry._entry_points = None
    m = nc.create_norm("FilterResponseNorm", 3, eps=1e-3, dtype=np.float64)
    assert type(m).__module__ == "normcore_frn"
    assert type(nc.create_norm("filter_response_norm", 3)) is type(m)  # the README's name
    rng = np.random.default_rng(0)
    for name, p in m.parameters().items():
        p[...] = rng.normal(size=p.shape) * 0.3 + (1.0 if name == "weight" else 0.0)
    x = rng.normal(size=(2, 3, 4, 5))
    nu2 = (x * x).mean(axis=(2, 3), keepdims=True)
    pre = m.weight[:, None, None] * x / np.sqrt(nu2 + 1e-3) + m.bias[:, None, None]
    np.testing.assert_allclose(m(x), np.maximum(pre, m.tau[:, None, None]), rtol=1e-12)
    r = rng.normal(size=x.shape)
    m(x)
    dx = m.backward(r)
    grads = dict(m.grads)
    loss = lambda: float(np.sum(m(x) * r))  # noqa: E731
    np.testing.assert_allclose(dx, ref.numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)
    for name, p in m.parameters().items():
        np.testing.assert_allclose(grads[name], ref.numeric_gradient(loss, p), rtol=1e-6, atol=1e-8)
    monkeypatch.delitem(sys.modules, "normcore_frn", raising=False)


def test_readme_registration_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Registering your own norm", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    m = nc.create_norm("mean-only-norm")
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4))
    assert np.abs(m(x).mean(axis=(2, 3))).max() < 1e-12
    dy = np.random.default_rng(2).normal(size=x.shape)
    np.testing.assert_allclose(m.backward(dy), dy - dy.mean(axis=(2, 3), keepdims=True), atol=1e-12)
