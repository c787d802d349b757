"""The layout keeps its promises: dependencies point sandbox -> vmm -> cubefs, and no cubefs module
imports itself back through others, counting imports made inside functions (a lazy import still ties
the two modules together; it only hides the cycle until someone moves one of them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("cubefs", "vmm", "sandbox")
# oci.py reaches the registry client only for a registry reference, and the client reuses
# oci's manifest types: one package's two halves, not layers.  Any other cycle is new.
KNOWN_CYCLES = {frozenset({"cubefs.dedup.oci", "cubefs.dedup.registry"})}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for top in TOPS:
        for path in (ROOT / top).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its text."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for n in names if (t := resolve(n)) and t != mod}
        graph[mod] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(comp)
    return out


def test_dependencies_point_from_sandbox_to_vmm_to_cubefs() -> None:
    graph = _imports(_modules())
    below = {"cubefs": ("vmm", "sandbox"), "vmm": ("sandbox",), "sandbox": ()}
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if t.split(".")[0] in below[m.split(".")[0]])
    assert upward == []


def test_no_cubefs_module_imports_itself_back() -> None:
    graph = _imports(_modules())
    cycles = [c for c in _cycles(graph) if all(m.startswith("cubefs.") for m in c)]
    assert [sorted(c) for c in cycles if frozenset(c) not in KNOWN_CYCLES] == []


def test_the_cubefs_root_keeps_only_what_every_part_uses() -> None:
    """Loose modules at cubefs/'s root are what everything shares; the rest lives in its package."""
    loose = sorted(p.stem for p in (ROOT / "cubefs").glob("*.py"))
    assert loose == ["__init__", "__main__", "cli", "errors", "humanize"]


def test_every_module_imports_on_its_own() -> None:
    """A cycle among top-level imports shows only in a fresh interpreter, depending on which module comes first."""
    mods = sorted(m for m in _modules() if m.startswith("cubefs") and not m.endswith("__main__"))
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    failed = []
    for i in range(0, len(mods), 4):  # four at a time: ~60 interpreters, ~10 s on 2 busy cores
        procs = {mod: subprocess.Popen([sys.executable, "-c", script, mod], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True, cwd=ROOT) for mod in mods[i:i + 4]}
        for mod, proc in procs.items():
            _out, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                failed.append(f"{mod}: {err.strip().splitlines()[-1]}")
    assert failed == []
