"""No import cycles inside ``src/kidneyscan``.

The graph is read from the source with :mod:`ast`, not by importing, so an import hidden inside
a function (the usual way a cycle is papered over) counts like one at module top. Only
``kidneyscan`` modules are nodes: third-party imports, optional or not, cannot close a cycle.
A module's implicit import of its parent packages is not an edge (every ``import a.b.c`` runs
``a/__init__`` and ``a/b/__init__`` first; counting that would turn every re-exporting
``__init__`` into a "cycle"), but an explicit ``from kidneyscan.pkg import name`` is one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "kidneyscan"


def module_files(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every ``.py`` under ``src/package``."""
    mods: dict[str, tuple[Path, bool]] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _resolve(name: str, mods: Mapping[str, object]) -> str | None:
    """The longest known module that ``name`` names or lies in (``a.b.func`` -> ``a.b``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (functions included)."""
    mods = module_files(src, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        here = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: climb level - 1 packages up from here
                    base_parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    for alias in node.names
                ]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    resolved = _resolve(target, mods)
                    if resolved is not None and resolved != mod:
                        graph[mod].add(resolved)
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node, each sorted.

    Iterative, so a deep import chain cannot hit Python's recursion limit.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def describe_cycle(graph: Mapping[str, Iterable[str]], component: list[str]) -> str:
    """One concrete cycle through ``component`` as ``a -> b -> a`` (for the failure message)."""
    members = set(component)
    start = component[0]
    # breadth-first from start's successors back to start, inside the component
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ not in members or succ in prev:
                    continue
                prev[succ] = node
                if succ == start:
                    path = [start]
                    cur = node
                    while cur != start:
                        path.append(cur)
                        cur = prev[cur]
                    path.append(start)
                    return " -> ".join(reversed(path))
                nxt_frontier.append(succ)
        frontier = nxt_frontier
    return " <-> ".join(component)  # unreachable for a real component


def test_no_import_cycles_in_package() -> None:
    """Fails when any two kidneyscan modules import each other, directly or via others,
    even when one side imports inside a function."""
    graph = import_graph(SRC, PACKAGE)
    assert len(graph) > 50, "the walk found too few modules: wrong source root?"
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(graph, c) for c in cycles)


def test_cycle_finder_on_synthetic_graph() -> None:
    """Fails when the finder misses a cycle, reports an acyclic chain, or merges components."""
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": set(),  # d -> e: a chain, no cycle
        "x": {"y"},
        "y": {"x"},  # a second, separate cycle
    }
    assert strongly_connected(graph) == [["a", "b", "c"], ["x", "y"]]
    assert describe_cycle(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
    assert strongly_connected({"d": {"e"}, "e": set()}) == []


@pytest.mark.parametrize("where", ["top", "function", "relative"])
def test_graph_sees_hidden_back_imports(tmp_path: Path, where: str) -> None:
    """Fails when a back-import inside a function, or a relative one, is not an edge."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "app.py").write_text("from pkg.sub.api import bp\n")
    back = {
        "top": "from pkg.sub.app import thing\n",
        "function": "def view():\n    from pkg.sub.app import thing\n    return thing\n",
        "relative": "def view():\n    from .app import thing\n    return thing\n",
    }[where]
    (pkg / "sub" / "api.py").write_text(back)
    (pkg / "sub" / "leaf.py").write_text("import numpy\nfrom pkg.sub import api\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.leaf"] == {"pkg.sub.api"}
    assert strongly_connected(graph) == [["pkg.sub.api", "pkg.sub.app"]]
