"""The import graph of chalicelib/ and tools/: no cycles, and each layer imports only what it may.

Every `import` and `from ... import` counts, at module level and inside
functions alike: an import moved into a function to dodge a cycle still ties
the two modules together, so it is still a cycle here.

Rules:
- no import cycle among the modules of chalicelib/ and tools/;
- nothing in chalicelib/ (what Lambda runs) imports tools/;
- a domain module (any chalicelib module outside the HTTP layer) imports
  neither Chalice nor chalicelib's views, pages or web.

Known offenders, if ever needed, are listed by name below; each list may only
shrink: an entry that no longer happens fails the test too, so a list is kept
honest when the code is fixed. Both are empty now.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chalicelib", "tools")

# The HTTP layer: modules whose job is requests and responses (http.py maps the domain's exceptions to
# responses; pages.py, landing.py and admin.py render HTML). They may import Chalice and each other.
HTTP_LAYER = frozenset(
    {"chalicelib.http", "chalicelib.views", "chalicelib.pages", "chalicelib.landing", "chalicelib.admin", "chalicelib.web"}
)
# What a domain module must not import (a module or anything under it).
NOT_FOR_DOMAIN = ("chalice", "chalicelib.views", "chalicelib.pages", "chalicelib.web")

# Known cycles, each as the set of modules in one strongly connected component. Empty since issue 13
# (databases <-> pool/quotas/expiry and tools/bootstrap <-> tools/package were the last). An entry
# here must name a cycle that exists; better to break a new one than to list it.
ALLOWED_CYCLES: list[frozenset[str]] = []

# Domain modules allowed to import Chalice or the HTTP layer, as (importer, imported) pairs. Empty since
# issue 13 (abuse and databases took a date format from views; errors.ApiError derived from Chalice's
# error class). Same rule: an entry must name an import that exists.
ALLOWED_DOMAIN_IMPORTS: frozenset[tuple[str, str]] = frozenset()


# -- the checker ----------------------------------------------------------------------------------


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the given top-level packages."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name this module imports, anywhere in the file (functions and classes included).

    `from a import b` yields both `a` and `a.b`: b may be a submodule or a name in a; callers keep
    the ones that are modules.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    # The package a relative import is relative to.
    here = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
    names.discard("")
    return names


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing `name` loads: itself, else its nearest ancestor we have."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between our modules, every dotted name each module imports)."""
    modules = find_modules(root, packages)
    graph: dict[str, set[str]] = {}
    raw: dict[str, set[str]] = {}
    for module, path in modules.items():
        raw[module] = imported_names(module, path)
        targets = {resolve(name, modules) for name in raw[module]}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph, raw


class Cycle(NamedTuple):
    members: frozenset[str]  # every module of one strongly connected component
    path: list[str]  # one concrete cycle through them, `a -> b -> ... -> a`, to name in a failure


def cycles(graph: dict[str, set[str]]) -> list[Cycle]:
    """The import cycles: one per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graphs here are a few dozen modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [Cycle(frozenset(c), _path_through(c, graph)) for c in components]


def _path_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle inside a strongly connected component, to name in a failure."""
    start = min(component)
    # Breadth-first from start back to start, staying inside the component.
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")  # cannot happen for an SCC


def describe(cycle: Cycle) -> str:
    return " -> ".join(cycle.path) + f" (all of {sorted(cycle.members)})"


def forbidden_imports(raw: dict[str, set[str]]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(chalicelib modules importing tools, domain modules importing Chalice or the HTTP layer)."""
    to_tools: set[tuple[str, str]] = set()
    to_http: set[tuple[str, str]] = set()
    for module, names in raw.items():
        if not module.startswith("chalicelib"):
            continue
        for name in names:
            if name == "tools" or name.startswith("tools."):
                to_tools.add((module, name))
        if module in HTTP_LAYER:
            continue
        for banned in NOT_FOR_DOMAIN:
            if any(name == banned or name.startswith(banned + ".") for name in names):
                to_http.add((module, banned))
    return to_tools, to_http


# -- the rules, on the real code ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph(ROOT, PACKAGES)


def test_the_checker_sees_the_real_code(real):
    graph, _ = real
    # A walk that found nothing would pass every rule below.
    assert {"chalicelib.models", "chalicelib.settings", "tools.dev.configdoc"} <= set(graph)
    assert "chalicelib.settings" in graph["tools.dev.configdoc"]
    assert "chalicelib.models" in graph["chalicelib.pool"]


def test_no_import_cycles(real):
    graph, _ = real
    found = cycles(graph)
    new = [c for c in found if c.members not in ALLOWED_CYCLES]
    assert not new, "import cycles: " + "; ".join(describe(c) for c in new)
    gone = [sorted(a) for a in ALLOWED_CYCLES if a not in {c.members for c in found}]
    assert not gone, f"these allowed cycles no longer exist (or changed shape): remove them from ALLOWED_CYCLES: {gone}"


def test_chalicelib_never_imports_tools(real):
    _, raw = real
    to_tools, _ = forbidden_imports(raw)
    assert not to_tools, f"chalicelib (what Lambda runs) imports tools/: {sorted(to_tools)}"


def test_domain_does_not_import_chalice_or_the_http_layer(real):
    _, raw = real
    _, to_http = forbidden_imports(raw)
    new = to_http - ALLOWED_DOMAIN_IMPORTS
    assert not new, f"domain modules import Chalice or views/pages/web: {sorted(new)}"
    gone = ALLOWED_DOMAIN_IMPORTS - to_http
    assert not gone, f"fixed, so remove them from ALLOWED_DOMAIN_IMPORTS: {sorted(gone)}"


# -- the checker itself, on tiny packages ---------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_names_a_cycle_through_a_function_level_import(tmp_path):
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def f():\n    from . import c\n",
            "pkg/c.py": "import pkg.a as alias\n",
            "pkg/d.py": "from pkg.a import something\n",  # into the cycle, not part of it
        },
    )
    graph, _ = import_graph(tmp_path, ("pkg",))
    [cycle] = cycles(graph)
    assert cycle.path == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert cycle.members == {"pkg.a", "pkg.b", "pkg.c"}
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in describe(cycle)


def test_checker_finds_no_cycle_where_there_is_none(tmp_path):
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/x.py": "from ..y import thing\nimport os\n",
            "pkg/y.py": "from pkg.z import other\n",
            "pkg/z.py": "import json\n",
        },
    )
    graph, _ = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub.x"] == {"pkg.y"}
    assert graph["pkg.y"] == {"pkg.z"}
    assert cycles(graph) == []


def test_checker_flags_tools_and_http_imports_from_the_domain(tmp_path):
    _package(
        tmp_path,
        {
            "chalicelib/__init__.py": "",
            "chalicelib/views.py": "from chalice import Response\n",  # HTTP layer: allowed
            "chalicelib/things.py": "def f():\n    from tools.dev import pgserver\n    from chalicelib.views import iso\n",
            "chalicelib/other.py": "from chalice.app import Request\n",
            "tools/__init__.py": "",
            "tools/dev/__init__.py": "",
            "tools/dev/pgserver.py": "from chalicelib import things\n",
        },
    )
    _, raw = import_graph(tmp_path, ("chalicelib", "tools"))
    to_tools, to_http = forbidden_imports(raw)
    assert to_tools == {("chalicelib.things", "tools.dev"), ("chalicelib.things", "tools.dev.pgserver")}
    assert to_http == {("chalicelib.things", "chalicelib.views"), ("chalicelib.other", "chalice")}
