"""The project's import graph has no cycle (every import that runs counts, including ones inside
functions; ``if TYPE_CHECKING:`` imports do not run)."""
from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grft_serve", "grft_train", "bench", "examples")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` (imports there never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _edges(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    deps: set[str] = set()

    def add(mod: str, names: list[str]) -> None:
        subs = {f"{mod}.{n}" for n in names} & known.keys()  # "from pkg import submodule"
        deps.update(subs)
        if mod in known and (not names or len(subs) < len(names)):  # a name defined in mod itself
            deps.add(mod)

    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
            mod = ".".join(x for x in (base, node.module or "") if x)
            add(mod, [a.name for a in node.names])
    deps.discard(name)
    return deps


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _edges(name, path, known) for name, path in known.items()}


def test_no_import_cycle():
    graph = import_graph()
    assert "grft_serve.core.backbones.zoo" in graph["grft_serve.core.backbones"]
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_core_does_not_import_the_server_or_training():
    for name, deps in import_graph().items():
        if name.startswith("grft_serve.core"):
            bad = sorted(d for d in deps if not d.startswith("grft_serve.core") and d != "grft_serve")
            assert not bad, f"{name} imports {bad}"


def test_engine_does_not_import_the_app_or_training():
    """The engine is plain torch: no Ray, no app, no training code (it is tested without them)."""
    for name, deps in import_graph().items():
        if name.startswith("grft_serve.engine"):
            bad = sorted(d for d in deps if d.startswith(("grft_serve.app", "grft_train", "bench")))
            assert not bad, f"{name} imports {bad}"
    code = "import sys, grft_serve.engine; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout
