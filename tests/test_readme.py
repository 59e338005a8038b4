"""What the README and the install messages tell a user is true (issue 12, items 19, 20, 22)."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DIST = PYPROJECT["project"]["name"]


def project_texts():
    """The README, the package, the plugins and the example: every place a message or a doc
    tells a user what to install."""
    yield "README.md", README
    for folder in ("normcore", "plugins", "examples"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".toml") and path.is_file():
                yield str(path.relative_to(ROOT)), path.read_text()


def test_the_distribution_name_is_not_the_unrelated_pypi_normcore():
    assert DIST == "normcore-nn"
    assert f"**{DIST}**" in README


def test_no_message_installs_the_unrelated_project():
    """`pip install normcore` or `"normcore[extra]"` would install PyPI's unrelated normcore."""
    wrong = re.compile(r"""pip install\s+["']?normcore(?![-\w])""")
    for name, text in project_texts():
        assert not wrong.search(text), f"{name}: {wrong.search(text).group(0)!r}"


def test_the_example_plugin_depends_on_this_distribution():
    example = tomllib.loads((ROOT / "examples" / "frn" / "pyproject.toml").read_text())
    assert DIST in example["project"]["dependencies"]


def test_the_dev_extra_holds_every_other_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    (dev,) = extras["dev"]
    named = set(re.fullmatch(rf"{re.escape(DIST)}\[([\w,]+)\]", dev).group(1).split(","))
    assert named == set(extras) - {"dev"}
    assert 'pip install -e ".[dev]"' in README


def test_the_readme_entry_point_example_is_the_example_plugin_s():
    """The README's entry-point lines are those of examples/frn, and the name it creates is the
    entry point's (item 22: the README registered `frn`, the example `filter_response_norm`)."""
    block = re.search(r'\[project\.entry-points\."normcore\.norms"\]\n(\w+) = "([\w.:]+)"', README)
    assert block, "the README shows no entry point"
    name, target = block.groups()
    example = tomllib.loads((ROOT / "examples" / "frn" / "pyproject.toml").read_text())
    assert example["project"]["entry-points"]["normcore.norms"] == {name: target}
    assert f'nc.create_norm("{name}"' in README
