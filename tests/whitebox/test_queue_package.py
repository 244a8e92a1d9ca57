"""The shape of the ``grafos_fabric`` source tree: no import cycle, modules of a readable size.

``grafos_fabric.queue`` is a package of small modules that each import only the
ones above them (see its docstring). These tests hold that in place: every
module imports on its own in a fresh interpreter (a cycle, or a module that
works only after another was imported first, fails there), the import graph of
the whole library (module-level imports, ``if TYPE_CHECKING:`` blocks left out)
has no cycle, and no module grows past ~800 lines without saying why.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "grafos_fabric"
QUEUE = PKG / "queue"
MAX_LINES = 850  # "~800": a module over this must give its reason in its docstring


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _library_files() -> list[pathlib.Path]:
    # drivers/ and tools/ are symlinked into the package: walk the real files once each
    seen: dict[pathlib.Path, pathlib.Path] = {}
    for folder, _dirs, files in os.walk(PKG, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                path = pathlib.Path(folder) / f
                seen.setdefault(path.resolve(), path)
    return sorted(seen.values())


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The library modules ``path`` imports when it is imported (function bodies and
    ``if TYPE_CHECKING:`` blocks run later or never, so they cannot make a cycle)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(level: int, module: str | None) -> str:
        if level == 0:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = resolve(node.level, node.module)
                found.add(target)
                # ``from . import errors`` imports a submodule, not a name
                found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text()).body)
    edges = set()
    for target in found:
        # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in modules and candidate != name:
                edges.add(candidate)
    # a package's own __init__ always runs before its submodules: not an edge to follow back
    return {e for e in edges if not name.startswith(e + ".")}


def _graph() -> dict[str, set[str]]:
    files = _library_files()
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _module_level_imports(p, modules) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_queue_package_import_graph_is_acyclic_and_goes_one_way():
    graph = _graph()
    queue_modules = sorted(m for m in graph if m.startswith("grafos_fabric.queue."))
    assert len(queue_modules) >= 8, queue_modules
    assert _cycle({m: graph[m] & set(queue_modules) for m in queue_modules}) is None
    # the mapped modules never reach the one-sided ones (FabricQueue finds OneSidedQueue by registry)
    mapped = [m for m in queue_modules if "_onesided" not in m]
    assert {m: sorted(d for d in graph[m] if "_onesided" in d) for m in mapped} == {m: [] for m in mapped}


def test_the_library_import_graph_is_acyclic():
    graph = _graph()
    assert "grafos_fabric.queue._mapped" in graph and "grafos_fabric.drivers.shm" in graph
    assert _cycle(graph) is None


@pytest.mark.parametrize("module", sorted(p.stem for p in QUEUE.glob("*.py")))
def test_each_queue_module_imports_alone_in_a_fresh_interpreter(module):
    name = "grafos_fabric.queue" if module == "__init__" else f"grafos_fabric.queue.{module}"
    code = f"import importlib; importlib.import_module({name!r}); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_fresh_import_of_the_mapped_queue_still_hands_out_the_one_sided_class():
    # importing only the mapped module loads the package __init__ first, which registers OneSidedQueue
    code = (
        "from grafos_fabric.queue._mapped import FabricQueue\n"
        "from grafos_fabric.queue._handle import _one_sided\n"
        "print(_one_sided().__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "OneSidedQueue", out.stderr[-2000:]


def test_no_queue_module_is_over_the_size_limit():
    over = {p.name: n for p in QUEUE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert over == {}



def test_every_package_folder_is_listed_for_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {_module_name(p) for p in _library_files() if p.name == "__init__.py"}
    assert "grafos_fabric.queue" in folders
    assert folders - listed == set()


def test_the_shm_driver_is_split_by_concept_under_the_size_limit():
    drivers = ROOT / "drivers"
    sizes = {p.name: len(p.read_text().splitlines()) for p in [drivers / "shm.py", *drivers.glob("_shm_*.py")]}
    assert set(sizes) == {"shm.py", "_shm_files.py", "_shm_region.py"}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
