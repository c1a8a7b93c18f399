"""Import structure of hf_fisher: every module imports alone, and module-level imports form no cycle.

1. One fresh interpreter imports each module of the package with every ``hf_fisher`` module
   cleared from ``sys.modules`` before it, so a module that only works after another one was
   imported first (an import-order dependence, a circle broken only by luck) fails here.
2. A static check parses every module with :mod:`ast`, keeps the imports executed at import time
   (module level, including ``try``/``if`` blocks, but not inside functions, classes' methods or
   ``if TYPE_CHECKING:``), builds the graph of imports among ``hf_fisher`` modules and reports
   every cycle (strongly connected component) with one concrete circle through it; a second check
   adds the imports inside functions, which today hide the package's big circle.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import hf_fisher

PACKAGE = Path(hf_fisher.__file__).parent
ROOT = PACKAGE.parent


def modules() -> list[str]:
    """Every module and package of hf_fisher (the source tree, not what happens to be imported)."""
    names = ["hf_fisher"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="hf_fisher."):
        names.append(info.name)
    return sorted(names)


ISOLATED_IMPORTS = r"""
import importlib, json, sys, traceback, warnings
warnings.simplefilter("ignore")  # deprecation shims warn by design
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "hf_fisher" or m.startswith("hf_fisher.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_every_module_imports_alone():
    names = modules()
    assert len(names) > 40, names  # the walk found the package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", ISOLATED_IMPORTS, json.dumps(names)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import alone:\n" + "\n".join(f"{k}:\n{v}" for k, v in failures.items())


# ---------------------------------------------------------------------------- static cycle check


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_nodes(body: list[ast.stmt], deferred: bool = False):
    """Import statements executed when the module is imported (not in functions, classes' methods,
    or ``if TYPE_CHECKING:`` blocks); ``deferred=True`` adds those inside functions (still not
    ``TYPE_CHECKING``): the imports that today hide a circle by running late."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_nodes(node.body, deferred)
            yield from _import_time_nodes(node.orelse, deferred)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _import_time_nodes(block, deferred)
        elif isinstance(node, (ast.With, ast.For, ast.While, ast.ClassDef)) or (
            deferred and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        ):
            yield from _import_time_nodes(node.body, deferred)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the hf_fisher modules it imports at import time (``from pkg import name`` counts as
    an import of ``pkg.name`` when that is a module, else of ``pkg``)."""
    known = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in _import_time_nodes(ast.parse(path.read_text(), str(path)).body, deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                while target and target not in known:  # `import hf_fisher.a.b` of a name: its module
                    target = target.rpartition(".")[0]
                if target.startswith("hf_fisher") and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """``(modules, circle)`` per strongly connected component of more than one module (Tarjan),
    largest first: its sorted modules and one shortest circle ``[a, b, ..., a]`` through its first."""
    index, low, stack, on_stack, comps, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [(sorted(comp), _circle(graph, comp)) for comp in sorted(comps, key=len, reverse=True)]


def _circle(graph, comp):
    """One shortest circle through the component's first module (breadth-first search)."""
    start = min(comp)
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [(["a", "b", "c"], ["a", "b", "c", "a"])]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _report(found):
    return "\n".join(
        f"{len(mods)} modules in a cycle ({', '.join(mods)}), e.g. " + " -> ".join(circle) for mods, circle in found
    )


def test_no_import_cycles_at_module_level():
    graph = import_graph()
    assert graph["hf_fisher.api"], "the graph found no import in api.py"
    found = cycles(graph)
    assert not found, "module-level import cycles in hf_fisher:\n" + _report(found)


# Imports inside functions that go against the pipeline (collect -> artifact -> analysis -> consume)
# and are allowed on purpose; each is a deferred import, and each has its reason. Any other circle
# through deferred imports fails the test below.
ALLOWED_DEFERRED = {
    # Fisher's convenience methods (top_k, head_importance, compare, ...) are thin calls into the
    # analysis layer, which returns Fisher objects: the public API keeps both directions.
    ("hf_fisher.artifacts.fisher", "hf_fisher.analysis"),
    ("hf_fisher.artifacts.cards", "hf_fisher.analysis"),
    ("hf_fisher.artifacts.fisher", "hf_fisher.artifacts.cards"),
    # the deprecated alias hf_fisher.artifacts.cards.merged_card (moved to consumers/merge/card.py)
    ("hf_fisher.artifacts.cards", "hf_fisher.consumers.merge.card"),
    # physical removal is chosen through the hf_fisher_physical_pruner hook, whose built-in
    # implementation reuses the pruning core's unit bookkeeping
    ("hf_fisher.consumers.prune.physical", "hf_fisher.consumers.prune.core"),
    # a registry's built-ins live in the package that looks names up in it
    ("hf_fisher.consumers.merge.recipe", "hf_fisher.consumers.merge.api"),
    ("hf_fisher.consumers.prune.statistics", "hf_fisher.consumers.prune.registry"),
}


def test_no_import_cycles_through_deferred_imports_but_the_allowed_ones():
    """The same with the imports inside functions: a circle kept alive by importing late fails,
    unless it runs through an edge of :data:`ALLOWED_DEFERRED`."""
    graph = import_graph(deferred=True)
    eager = import_graph()
    for a, b in ALLOWED_DEFERRED:
        assert b in graph[a] and b not in eager[a], f"stale entry {(a, b)}: remove it"
        graph[a].discard(b)
    found = cycles(graph)
    assert not found, "import cycles in hf_fisher through deferred (function-level) imports:\n" + _report(found)


def deprecated_modules() -> set[str]:
    """The modules kept only as deprecation aliases of a new home (they warn when imported)."""
    out = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "DeprecationWarning" in text and ("sys.modules[__name__]" in text or "was split" in text):
            out.add(_module_name(path))
    return out


def test_the_package_never_imports_its_own_deprecated_paths():
    """Old paths are for users' code for one release; the package itself (and its plugins) import
    the new homes, at module level and inside functions alike."""
    old = deprecated_modules()
    assert {"hf_fisher.fisher", "hf_fisher.consumers.merging", "hf_fisher.consumers.pruning", "hf_fisher.collector"} <= old
    graph = import_graph(deferred=True)
    users = {m: sorted(graph[m] & old) for m in graph if m not in old and graph[m] & old}
    assert not users, f"modules importing deprecated paths: {users}"
    for path in sorted((ROOT / "plugins").glob("*/*/**/*.py")):
        if "tests" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not used & old, (path, sorted(used & old))
