"""The shape of the code a newcomer reads: modules import each other without circles (imports inside functions
included), and no module of the product grows past about 450 lines (tests, bench and the synthetic-data
generator aside)."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

MAX_LINES = 450
EXEMPT = {"featseq.featurize.synth"}  # the synthetic-data generator: renderers, long by nature
PACKAGES = ("common", "featurize", "sequence")


def _modules() -> dict[str, Path]:
    """featseq module name -> file, for the installed package (the root's modules and its subpackages)."""
    mods = {"featseq": ROOT / "__init__.py", "featseq.__main__": ROOT / "__main__.py", "featseq.cli": ROOT / "cli.py"}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(("featseq",) + parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level, functions, ``if TYPE_CHECKING``
    excepted: those never run)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and not (mods[t].name == "__init__.py" and _trivial(mods[t])):
                found.add(t)
    return found


def _trivial(init: Path) -> bool:
    """A package __init__ that imports nothing: importing a submodule runs it, but it closes no circle."""
    return not any(isinstance(n, (ast.Import, ast.ImportFrom)) and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
                   for n in ast.walk(ast.parse(init.read_text())))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
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


def test_the_import_graph_has_no_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert graph["featseq.sequence.train"], "the scan finds imports (sanity)"
    assert _cycles(graph) == []


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    """The scan itself: a circle closed by an import inside a function is one."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    mods = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    assert _cycles(graph) == [["p.a", "p.b"]]


def test_no_module_is_over_450_lines():
    long = {name: n for name, path in _modules().items()
            if name not in EXEMPT and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
