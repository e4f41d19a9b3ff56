"""Fail on any import cycle among the project's modules, including the ones Python never trips over.

A cycle hidden in a function body (`def f(): from .b import g`) or behind `if TYPE_CHECKING:` does not
break at import time, but it still ties two modules together: neither can be understood, tested or moved
without the other. So every import statement counts here, wherever it is in the file.

Which folders hold which import names comes from pyproject.toml (`[tool.setuptools] package-dir`: the
folder `mesh/` installs as `helexa.mesh`), plus `tests/` and `scripts/` as they are. Each `.py` file is
parsed with `ast` (nothing is imported), and each import becomes an arrow to the project module it
names:

- `import a.b.c` and `from a.b.c import x` point at `a.b.c` (the module itself, not its parent
  packages: a package's `__init__` importing its own modules is a table of contents, not a cycle);
- `from a.b import c` points at the submodule `a.b.c` when there is one, else at `a.b`'s `__init__`;
- relative imports are resolved against the importing module's package;
- imports of anything outside the project (the standard library, aiohttp, ...) are ignored, and so are
  module names in strings (`importlib.import_module(...)`, `python -m ...`), which are not imports.

The strongly connected components of that graph with more than one module are the cycles; each is
printed with the import lines (file:line) that form it, and the exit status is 1.

    .venv/bin/python scripts/import_cycles.py [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folders that are not installed but import the packages (and each other): checked as they are named.
EXTRA_FOLDERS = ("tests", "scripts")
_SKIPPED_DIRS = {"__pycache__", "node_modules"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Edge:
    """One import statement of a project module by another."""

    source: str
    target: str
    path: Path
    line: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Cycle:
    """A strongly connected component: every module in it imports, in the end, every other."""

    modules: tuple[str, ...]
    edges: tuple[Edge, ...]
    example: tuple[str, ...]  # one closed walk through the component, first module repeated at the end


def package_folders(root: Path) -> dict[str, Path]:
    """Import name -> folder, from pyproject's package-dir, plus the extra folders that exist."""
    pyproject = root / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text(encoding="utf-8")) if pyproject.is_file() else {}
    setuptools = data.get("tool", {}).get("setuptools", {})
    package_dir: Mapping[str, str] = setuptools.get("package-dir", {})
    folders = {name: root / folder for name, folder in package_dir.items() if name}
    for name in setuptools.get("packages", []):
        if not any(name == top or name.startswith(top + ".") for top in folders):
            base = package_dir.get("", ".")
            folders[name] = root / base / name.replace(".", "/")
    for name in EXTRA_FOLDERS:
        if name not in folders and (root / name).is_dir():
            folders[name] = root / name
    return {name: path for name, path in folders.items() if path.is_dir()}


def _python_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            if path.name not in _SKIPPED_DIRS and not path.name.startswith("."):
                yield from _python_files(path)
        elif path.suffix == ".py":
            yield path


def discover(folders: Mapping[str, Path]) -> dict[str, Module]:
    """Every module under the folders, by its import name."""
    modules: dict[str, Module] = {}
    for top, folder in folders.items():
        for path in _python_files(folder):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            modules[name] = Module(name=name, path=path, is_package=is_package)
    return modules


def _absolute(module: Module, level: int, name: str | None) -> str | None:
    """The absolute name of a relative import (`from ..a import b`: level 2, name "a")."""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if level - 1 > len(package) or (level - 1 == len(package) and not name):
        return None  # beyond the top of the tree: Python would refuse it too
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _targets(node: ast.Import | ast.ImportFrom, module: Module, modules: Mapping[str, Module]) -> set[str]:
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in modules:  # `import a.b.c` where only a.b is ours
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
        return found
    base = _absolute(module, node.level, node.module) if node.level else node.module
    if base is None:
        return found
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            found.add(submodule)
        elif base in modules:
            found.add(base)
    return found


def import_edges(modules: Mapping[str, Module]) -> list[Edge]:
    """Every import of a project module by another, wherever the statement is (functions and
    `if TYPE_CHECKING:` blocks included)."""
    edges: list[Edge] = []
    for module in modules.values():
        tree = ast.parse(module.path.read_bytes(), filename=str(module.path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in sorted(_targets(node, module, modules)):
                    if target != module.name:
                        edges.append(
                            Edge(source=module.name, target=target, path=module.path, line=node.lineno)
                        )
    return edges


def strongly_connected(graph: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(graph[succ])))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def _shortest_cycle(start: str, graph: Mapping[str, Sequence[str]], members: set[str]) -> tuple[str, ...]:
    """The shortest walk from `start` back to itself inside the component (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in graph[node]:
            if succ not in members:
                continue
            if succ == start:
                walk = [node]
                while walk[-1] != start:
                    walk.append(came_from[walk[-1]])
                return (*reversed(walk), start)
            if succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    return (start,)


def find_cycles(root: Path) -> tuple[list[Cycle], int]:
    """The import cycles under `root` (a checkout with a pyproject.toml), and how many modules were read."""
    modules = discover(package_folders(root))
    edges = import_edges(modules)
    graph: dict[str, list[str]] = {name: [] for name in sorted(modules)}
    for edge in edges:
        if edge.target not in graph[edge.source]:
            graph[edge.source].append(edge.target)
    for targets in graph.values():
        targets.sort()
    cycles = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        inside = sorted(
            (e for e in edges if e.source in members and e.target in members),
            key=lambda e: (e.source, e.line, e.target),
        )
        first = min(members)
        cycles.append(
            Cycle(
                modules=tuple(sorted(members)),
                edges=tuple(inside),
                example=_shortest_cycle(first, graph, members),
            )
        )
    cycles.sort(key=lambda c: c.modules)
    return cycles, len(modules)


def _where(edge: Edge, root: Path) -> str:
    try:
        shown = edge.path.relative_to(root)
    except ValueError:
        shown = edge.path
    return f"{shown}:{edge.line}"


def report(cycles: Sequence[Cycle], root: Path) -> str:
    lines = []
    for number, cycle in enumerate(cycles, 1):
        lines.append(f"cycle {number}: {len(cycle.modules)} modules, e.g. {' -> '.join(cycle.example)}")
        for edge in cycle.edges:
            lines.append(f"  {_where(edge, root)}: {edge.source} -> {edge.target}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout (default: %(default)s)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    cycles, n_modules = find_cycles(root)
    if cycles:
        print(report(cycles, root))
        print(f"import_cycles: {len(cycles)} cycle(s) among {n_modules} modules", file=sys.stderr)
        return 1
    print(f"import_cycles: no cycles among {n_modules} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
