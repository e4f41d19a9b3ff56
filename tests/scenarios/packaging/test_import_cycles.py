"""`scripts/import_cycles.py`, the check that no two project modules import each other.

A tiny project is laid out in tmp_path with the same kind of pyproject.toml as ours (folders mapped to
import names through package-dir) and cycles that Python itself never trips over: one closed by an
import inside a function body, one behind `if TYPE_CHECKING:`, one through a package's `__init__`
(`from pkg import name` where `name` is not a submodule). The checker must find each, with the lines
that form it, and nothing in the same tree once those imports are gone.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "import_cycles.py"

PYPROJECT = """\
[tool.setuptools]
package-dir = { "acme.core" = "core", "acme.extra" = "extra" }
packages = ["acme.core", "acme.core.sub", "acme.extra"]
"""

# Imports that close no cycle: relative and absolute, from a subpackage, of the standard library.
CLEAN = {
    "core/__init__.py": '"""The core."""\n\nHELPER = 1\n',
    "core/a.py": "import json\n\nfrom . import b\n",
    "core/b.py": "from acme.core.sub import deep\n",
    "core/sub/__init__.py": "",
    "core/sub/deep.py": "from ...core import HELPER\n",
    "extra/__init__.py": "",
    "extra/x.py": "from typing import TYPE_CHECKING\n",
    "extra/y.py": "import acme.core.a\n",
    "tests/__init__.py": "",
    "tests/test_x.py": "from acme.extra import x\n",
}

# Appended to CLEAN's files: each closes one cycle.
CYCLES = {
    # b -> sub.deep (CLEAN) and deep -> b, in a function body: deep -> b -> deep.
    "core/sub/deep.py": "\n\ndef later() -> None:\n    from .. import b\n",
    # x <-> y, behind TYPE_CHECKING on one side.
    "extra/x.py": "\nif TYPE_CHECKING:\n    from ..extra.y import Y\n",
    "extra/y.py": "import acme.extra.x as x\n\n\nclass Y: ...\n",
    # a -> b -> deep -> core/__init__ (CLEAN: `from ...core import HELPER`) -> a.
    "core/__init__.py": "\n\ndef load() -> None:\n    from acme.core import a\n",
}


def load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_cycles", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checker() -> ModuleType:
    return load_checker()


def lay_out(root: Path, *, with_cycles: bool) -> Path:
    (root / "pyproject.toml").write_text(PYPROJECT)
    for name, text in CLEAN.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + (CYCLES.get(name, "") if with_cycles else ""))
    return root


def test_finds_cycles_hidden_in_functions_type_checking_and_package_inits(
    checker: ModuleType, tmp_path: Path
) -> None:
    root = lay_out(tmp_path, with_cycles=True)
    cycles, n_modules = checker.find_cycles(root)
    assert n_modules == len(CLEAN)
    assert [c.modules for c in cycles] == [
        ("acme.core", "acme.core.a", "acme.core.b", "acme.core.sub.deep"),
        ("acme.extra.x", "acme.extra.y"),
    ]
    core, extra = cycles
    edges = {(e.source, e.target, f"{e.path.relative_to(root)}:{e.line}") for e in core.edges}
    assert edges == {
        ("acme.core", "acme.core.a", "core/__init__.py:7"),
        ("acme.core.a", "acme.core.b", "core/a.py:3"),
        ("acme.core.b", "acme.core.sub.deep", "core/b.py:1"),
        ("acme.core.sub.deep", "acme.core", "core/sub/deep.py:1"),
        ("acme.core.sub.deep", "acme.core.b", "core/sub/deep.py:5"),
    }
    assert core.example[0] == core.example[-1] == "acme.core"
    edges = {(e.source, e.target, f"{e.path.relative_to(root)}:{e.line}") for e in extra.edges}
    assert edges == {
        ("acme.extra.x", "acme.extra.y", "extra/x.py:4"),
        ("acme.extra.y", "acme.extra.x", "extra/y.py:2"),
    }


def test_a_tree_without_those_imports_is_clean(checker: ModuleType, tmp_path: Path) -> None:
    cycles, _ = checker.find_cycles(lay_out(tmp_path, with_cycles=False))
    assert cycles == []
    assert checker.main(["--root", str(tmp_path)]) == 0


def test_command_exits_1_and_names_the_lines(tmp_path: Path) -> None:
    root = lay_out(tmp_path, with_cycles=True)
    result = subprocess.run(
        [sys.executable, SCRIPT, "--root", root], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1, result.stderr
    assert "extra/x.py:4: acme.extra.x -> acme.extra.y" in result.stdout
    assert "core/sub/deep.py:5: acme.core.sub.deep -> acme.core.b" in result.stdout
    assert "2 cycle(s) among 10 modules" in result.stderr


def test_the_project_has_no_import_cycles(checker: ModuleType) -> None:
    cycles, n_modules = checker.find_cycles(ROOT)
    assert n_modules > 100
    assert cycles == [], checker.report(cycles, ROOT)
