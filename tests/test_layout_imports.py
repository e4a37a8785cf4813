"""The package's import graph, read from the source with ``ast`` (nothing is imported): no
module-level import circle anywhere in qalora, and nothing imports upward through the
loaders (the format loaders and the checkpoint package take what they need from leaf
modules such as ``qalora.loaded``, never from ``qalora.loaders``, not even inside a
function)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGE = "qalora"
ROOT = Path(next(iter(importlib.util.find_spec(PACKAGE).submodule_search_locations)))


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (source file, whether it is a package's ``__init__``); the compiled
    extension counts as a module too (from its stub), so ``from . import _core`` is an edge
    to it and not to the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
            continue
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        if path.suffix == ".pyi" and name in out:
            continue
        out[name] = (path, is_package)
    return out


MODULES = _modules()


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The qalora modules an import statement imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join([*base, *([node.module] if node.module else [])])
        else:
            origin = node.module or ""
        # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself.
        names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin for alias in node.names]
    return [n for n in names if n in MODULES and n != module]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(imports run when ``module`` is imported, imports inside its functions)."""
    path, is_package = MODULES[module]
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else top).update(_targets(module, is_package, child))
            elif _is_type_checking(child):
                continue  # for static analysers only
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return top, lazy


GRAPH = {name: _imports(name) for name in MODULES}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``edges`` (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_graph_is_read():
    for name in ("qalora.ops", "qalora._dispatch", "qalora.loaders", "qalora.loaded", "qalora.checkpoint.model"):
        assert name in MODULES, sorted(MODULES)
    assert "qalora._dispatch" in GRAPH["qalora.ops"][0]
    assert "qalora.loaded" in GRAPH["qalora.formats.gguf"][0]
    assert "qalora.checkpoint" in GRAPH["qalora.loaders"][1]  # a lazy import, seen as one


def test_no_module_level_import_circle():
    circle = _cycle({name: top for name, (top, _) in GRAPH.items()})
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_circle_through_lazy_imports_outside_the_command_line():
    # The cli package imports its subcommands on demand and they import its shared helpers
    # (``from .. import cli``); everywhere else a lazy import only defers loading torch or an
    # optional dependency, and goes downward.
    edges = {
        name: {n for n in top | lazy if not n.startswith("qalora.cli")}
        for name, (top, lazy) in GRAPH.items()
        if not name.startswith("qalora.cli")
    }
    circle = _cycle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle)


@pytest.mark.parametrize("prefix", ["qalora.formats", "qalora.checkpoint"])
def test_nothing_below_the_loaders_imports_them(prefix):
    offenders = {
        name: sorted(n for n in top | lazy if n == "qalora.loaders")
        for name, (top, lazy) in GRAPH.items()
        if name == prefix or name.startswith(prefix + ".")
    }
    assert not any(offenders.values()), {k: v for k, v in offenders.items() if v}


def test_leaf_modules_import_nothing_that_imports_them():
    # What the loaders, the format loaders and the checkpoint share sits below all of them.
    for leaf in ("qalora.loaded", "qalora.untrusted", "qalora.hf_skeleton", "qalora.optional", "qalora.ties"):
        top, lazy = GRAPH[leaf]
        above = {n for n in top | lazy if n.startswith(("qalora.loaders", "qalora.formats", "qalora.checkpoint"))}
        assert not above, (leaf, above)


def test_the_design_lists_every_module():
    design = Path(__file__).resolve().parents[1] / "docs" / "design.md"
    if not design.is_file():
        pytest.skip("docs/design.md is not beside the tests")
    text = design.read_text(encoding="utf-8")
    section = text[text.index("## 4. The Python package") : text.index("## 5.")]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert sorted(set(MODULES) - listed) == [], "modules missing from docs/design.md §4"
    assert sorted(listed - set(MODULES)) == [], "docs/design.md §4 lists modules that do not exist"
