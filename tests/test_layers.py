"""The import graph of pbs_cli and pbs_kernels has no cycle (issue 20).

Every import counts, the ones inside functions too: a module that imports another lazily still
depends on it, and a cycle through a lazy import is the same knot (the bench's workflow and
serving modules once imported each other that way). Read from the source with `ast`, so nothing
is imported and the test takes well under a second."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pbs_cli": ROOT / "pbs_cli", "pbs_kernels": ROOT / "kernels" / "pbs_kernels"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, packages by their __init__.py."""
    found = {}
    for top, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports (a `from X import y` counts as X.y when
    X.y is a module, else as X)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    # A sanity check that imports are resolved at all (relative, from-package and submodule forms).
    assert "pbs_cli.workflows.bench.harness" in graph["pbs_cli.workflows.bench.workflow"]
    assert "pbs_kernels.profile" in graph["pbs_cli.workflows.profiles"]


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


if __name__ == "__main__":
    for comp in cycles(import_graph()):
        print(" <-> ".join(comp))


# -- the rest of issue 20's house rules, read from the source the same way ---------------------

GEOMETRY = ("pbs_kernels.blocks", "pbs_kernels.packing")


def test_geometry_stands_on_nothing_above_it():
    # Block geometry is what the ops stand on: it imports no op module (it once took cdiv from
    # ops/_common.py).
    graph = import_graph()
    for name in GEOMETRY:
        assert not {m for m in graph[name] if m.startswith("pbs_kernels.ops")}, name


def test_attention_imports_only_op_packages():
    # attention.py chains the ops through their dispatchers; which backend or layout runs is
    # the op package's business, so no module below ops/<op>/ is imported here.
    ops = {m for m in import_graph()["pbs_kernels.attention"] if m.startswith("pbs_kernels.ops.")}
    below = {m for m in ops if m.count(".") > 2 and not m.startswith("pbs_kernels.ops._common")}
    assert not below, below


def _functions_with_parameter(param: str) -> list[str]:
    found = []
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                if param in [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]:
                    found.append(f"{name}.{node.name}")
    return found


def test_a_knob_travels_inside_the_settings_object():
    # A per-layer knob is a field of pbs_kernels.settings.PbsSettings; only the public entry
    # points (pbs_attention, its varlen and plan forms, select_stage) and the CLI option take it
    # loose. Before issue 20, threshold_mass was in 17 signatures.
    where = _functions_with_parameter("threshold_mass")
    assert 0 < len(where) <= 6, where


_WRITES = ("write_atomic", "write_text", "write_bytes")


def test_one_module_writes_files():
    # Every command's files go through workflows/outputs.py, which keeps them in a temporary
    # folder when a write fails after the work. Pictures are rendered to bytes (savefig into a
    # buffer); the caches (GGUF dequantized weights, Optuna storage) are not command files.
    writers = set()
    for name, path in _modules().items():
        if not name.startswith("pbs_cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called in _WRITES:
                    writers.add(name)
                if called == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                            and set(a.value) & set("wax") for a in node.args[1:2]):
                    writers.add(name)
    assert writers == {"pbs_cli.workflows.outputs"}, writers
