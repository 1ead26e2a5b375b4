"""The shape of the code: no import cycle among parity's modules or packages (imports inside functions count),
and the engine imports no module of a particular system (it knows systems only through its port and the
registry's names)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "parity"
SYSTEM_PACKAGES = ("parity.models", "parity.bridge", "parity.mbridge", "parity.systems")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the parity modules it imports anywhere in its file (``from parity import x`` is module
    ``parity.x`` when that is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            visit(v)
    return out


def test_no_import_cycle_among_modules():
    assert cycles(imports()) == []


def test_no_import_cycle_among_packages():
    graph: dict[str, set[str]] = {}
    for m, deps in imports().items():
        graph.setdefault(package_of(m), set()).update(package_of(d) for d in deps if package_of(d) != package_of(m))
    assert cycles(graph) == []


def test_the_engine_imports_no_system():
    bad = {m: sorted(d for d in deps if d.startswith(SYSTEM_PACKAGES))
           for m, deps in imports().items() if m.startswith("parity.engine")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_checker_sees_function_level_imports(tmp_path):
    """The rule's own law: a cycle closed by an import inside a function is a cycle."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    src = "def f():\n    from parity.engine import pipeline\n"
    found = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert found == {"parity.engine"}
