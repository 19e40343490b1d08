"""Imports run one way: no cycles among kvpass's modules; lowering -> ops, kernels; passes -> ops, policies, analysis;
kernels and models -> nothing of kvpass; apps -> imported by no core module. Any layer may use kvpass.validate, the
one check per kind of input, which imports nothing of kvpass (so it adds no edge between layers).

Read from the source with ``ast`` (every import statement, including those inside functions: a lazy import is still
a dependency), with the folders mapped to the packages they are installed as (pyproject's ``package-dir``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"kvpass": "kvpass", "lowering": "kvpass.lowering", "kernels": "kvpass.kernels",
                "models": "kvpass.models"}
LEAF = "kvpass.validate"  # the input checks: every layer may use them
# what the compiler's layers share: the options and the error classes
FOUNDATION = ("kvpass.config", "kvpass.errors", LEAF)
# lowering/triton_lowering.py reads a policy's spec (kvpass.policies) to pick SnapKV's fused scoring kernel; listed
# until that choice is made before lowering, so that nothing else in lowering/ joins it
KNOWN_EXCEPTIONS = {("kvpass.lowering.triton_lowering", "kvpass.policies"),
                    ("kvpass.lowering.triton_lowering", "kvpass.policies.snapkv")}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the kvpass modules it imports (a name imported from a package counts as its submodule if one)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        resolved = {resolve(t) for t in targets if t == "kvpass" or t.startswith("kvpass.")}
        graph[name] = {t for t in resolved if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(graph: dict[str, set[str]], source: str, allowed: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if under(m, source) for t in targets
                  if not under(t, source, *allowed) and (m, t) not in KNOWN_EXCEPTIONS)


def test_package_dirs_match_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    declared = dict(re.findall(r'"(kvpass[\w.]*)" = "(\w+)"', text.split("package-dir", 1)[1].split("\n", 1)[0]))
    assert {folder: package for package, folder in declared.items()} == PACKAGE_DIRS


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    detail = ["  " + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert not found, "import cycles among kvpass's modules:\n" + "\n".join(detail)


def test_lowering_imports_only_ops_and_kernels():
    assert violations(import_graph(), "kvpass.lowering", ("kvpass.ops", "kvpass.kernels", LEAF)) == []


def test_the_input_checks_import_nothing_of_kvpass():
    assert import_graph()[LEAF] == set()


def test_passes_import_only_ops_policies_and_analysis():
    allowed = ("kvpass.ops", "kvpass.policies", "kvpass.analysis", *FOUNDATION)
    assert violations(import_graph(), "kvpass.passes", allowed) == []


def test_kernels_and_models_import_nothing_of_kvpass():
    graph = import_graph()
    assert violations(graph, "kvpass.kernels", ()) == []
    assert violations(graph, "kvpass.models", ()) == []


def test_the_core_imports_no_application():
    graph = import_graph()
    core = {m for m in graph if not under(m, "kvpass.apps")}
    assert sorted(f"{m} -> {t}" for m in core for t in graph[m] if under(t, "kvpass.apps")) == []


def test_the_checks_see_what_they_check():
    """The graph knows the layers and their real edges (a parser that saw nothing would pass every test above)."""
    graph = import_graph()
    assert {"kvpass.lowering.export.pt2", "kvpass.kernels.compact", "kvpass.apps.cli", "kvpass.exporter"} <= set(graph)
    assert "kvpass.lowering.export.programs" in graph["kvpass.lowering.export.pt2"]  # absolute import
    assert "kvpass.lowering.triton_lowering" in graph["kvpass.lowering"]  # relative import: from . import ...
    assert {"kvpass.passes", "kvpass.analysis"} <= graph["kvpass.exporter"]  # the pipeline lives in kvpass
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
