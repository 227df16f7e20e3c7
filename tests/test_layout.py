"""The folder tree is the architecture: imports run one way, and no module-level cycle exists.

Only module-level imports count (those inside functions are deferred on purpose, e.g. optional
extras); ``if TYPE_CHECKING:`` imports count too, since a cycle there is a design smell that
type checkers and readers still have to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmark", "attacks", "defenses", "threat_models")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported at module level (including under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import mod" imports the submodule pkg.mod when there is one
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.If | ast.Try | ast.With):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                continue
            else:
                continue
            for name in names:
                if name in modules:
                    found.add(name)
    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _top_level_imports(p, modules) - {m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_module_level_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, f"module-level import cycles: {cycles}"


def test_cycle_finder_finds_a_cycle():
    # the checker itself must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "benchmark":
        return parts[0]  # attacks, defenses, threat_models: plug-ins
    return parts[1] if len(parts) > 1 else "benchmark"


#: what each layer may import at module level (besides itself). ``report/`` reads the spec,
#: the store and the plug-ins (and the code version it stamps), never ``run/``; plug-in packages
#: (attacks, defenses, threat_models) implement ``api/`` contracts over the zoo and never reach
#: into the harness, the report or the verifier.
ALLOWED: dict[str, set[str]] = {
    "api": set(),
    "plugins": {"api"},
    "zoo": {"api", "plugins"},
    "data": {"api", "plugins"},
    "train": {"api", "plugins", "data", "zoo"},
    "complexity": set(),
    "version": set(),
    "spec": {"api", "plugins", "data", "zoo"},
    "store": {"spec"},
    "report": {"api", "plugins", "spec", "store", "version"},
    "run": {"api", "plugins", "spec", "store", "version", "data", "complexity"},
    "verify": {"api", "plugins", "spec", "store", "version", "data", "report", "run"},
    "threat_models": {"api", "plugins"},
    "defenses": {"api", "plugins", "zoo", "data"},
    "attacks": {"api", "plugins", "zoo", "complexity", "threat_models", "defenses"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_one_way(layer):
    bad = []
    for module, deps in import_graph().items():
        if _layer(module) != layer:
            continue
        for dep in deps:
            target = _layer(dep)
            if target != layer and target not in ALLOWED[layer]:
                bad.append(f"{module} -> {dep}")
    assert not bad, f"{layer}/ may import only {sorted(ALLOWED[layer])}: {bad}"


def test_report_does_not_run_suites():
    # run_suite writes the store only; the report derives tables from it (the CLI calls both)
    graph = import_graph()
    assert not any(d.startswith("benchmark.report") for d in graph["benchmark.run.harness"])
