"""scripts/ holds what reproduces a BENCHMARKS.md figure (and the demo-model trainer): every script
is listed in scripts/README.md and cited in BENCHMARKS.md, every reference to a script names one
that exists (or one scripts/README.md lists as removed), and each script still compiles and finds
the names it imports from the project. CPU only: nothing here runs a script."""
from __future__ import annotations

import ast
import importlib
import py_compile
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
FILES = sorted(p for p in SCRIPTS.iterdir() if p.is_file() and p.name != "README.md")
PY = [p for p in FILES if p.suffix == ".py"]
SH = [p for p in FILES if p.suffix == ".sh"]
# Where scripts are referenced by path (the scripts' docstrings call each other too).
DOCS = [ROOT / "BENCHMARKS.md", ROOT / "README.md", ROOT / "Makefile", SCRIPTS / "README.md",
        *sorted((ROOT / "docs").glob("*.md")), *FILES, *sorted((ROOT / "tests").rglob("*.py")),
        *sorted((ROOT / "kernels" / "pbs_kernels").rglob("*.py")), *sorted((ROOT / "pbs_cli").rglob("*.py"))]
# A script path not preceded by "REV:" (`git show REV:<path>` names an old commit's file).
REF = re.compile(r"(?<![\w:])scripts/([\w.-]+\.(?:py|sh))\b")
PROJECT = ("pbs_kernels", "pbs_cli")


def _ids(paths):
    return [p.name for p in paths]


def _readme_sections() -> tuple[str, str]:
    """scripts/README.md split at its "## Removed" heading: (the listing, the removed scripts)."""
    text = (SCRIPTS / "README.md").read_text()
    listing, _, removed = text.partition("\n## Removed")
    return listing, removed


def test_scripts_folder_is_not_empty():
    assert PY and SH, "scripts/ lost its Python or shell scripts: this test would check nothing"


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_every_script_is_listed_and_cited(path):
    listing, _ = _readme_sections()
    assert f"`{path.name}`" in listing, f"scripts/README.md has no entry for {path.name}: add one line"
    bench = (ROOT / "BENCHMARKS.md").read_text()
    assert re.search(rf"(?<![\w-]){re.escape(path.name)}(?![\w-])", bench), (
        f"BENCHMARKS.md cites no figure from scripts/{path.name}: cite it where its figure is, or remove it")


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_references_name_existing_scripts(doc):
    _, removed = _readme_sections()
    names = {p.name for p in FILES}
    stale = sorted({m for m in REF.findall(doc.read_text()) if m not in names and f"`{m}`" not in removed})
    assert not stale, f"{doc.relative_to(ROOT)} names missing scripts {stale}: rename the reference, " \
                      "or list the script under '## Removed' in scripts/README.md with its last commit"


@pytest.mark.parametrize("path", PY, ids=_ids(PY))
def test_python_script_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("path", SH, ids=_ids(SH))
def test_shell_script_parses(path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    r = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _has(module: str, name: str) -> bool:
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return True
    try:  # a submodule not imported by its package
        importlib.import_module(f"{module}.{name}")
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("path", PY, ids=_ids(PY))
def test_project_imports_resolve(path):
    """A script that imports a name the runtime renamed would fail only on the GPU, minutes in."""
    siblings = {p.stem: p for p in PY}
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if node.module in siblings:
                defined = _top_level_names(siblings[node.module])
                missing += [f"{node.module}.{a.name}" for a in node.names if a.name not in defined]
            elif top in PROJECT:
                missing += [f"{node.module}.{a.name}" for a in node.names if not _has(node.module, a.name)]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PROJECT:
                    importlib.import_module(a.name)
    assert not missing, f"scripts/{path.name} imports names that no longer exist: {missing}"
