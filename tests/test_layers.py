"""The layer rule of docs/design.md, read from the source: every import points down, never sideways
into another room of the same layer, and no module reaches itself again through its imports.

Each module of benchmarks/, pipelines/ and datasets/ is parsed (not imported); every import of an
``rcnn_bench`` module counts, wherever it stands (inside a function, under TYPE_CHECKING).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"benchmarks": "benchmarks", "pipelines": "pipelines", "datasets": "datasets"}

# Lowest first. A module belongs to the room of the longest prefix that names it; a room may
# import rooms of lower layers and itself, nothing of its own layer's other rooms or above.
LAYERS: list[tuple[str, ...]] = [
    ("datasets",),
    ("pipelines.runtime", "pipelines.originals"),
    ("pipelines.parts",),
    ("pipelines.context",),
    ("pipelines.detector",),
    ("pipelines.registry",),
    ("pipelines.rcnn", "pipelines.fast_rcnn", "pipelines.sppnet", "pipelines.faster_rcnn"),
    ("benchmarks.config",),
    ("benchmarks.machine", "benchmarks.evaluation"),
    ("benchmarks.reporting",),
    ("benchmarks.harness", "benchmarks.gate", "benchmarks.micro"),
    ("benchmarks.harness.run", "benchmarks.harness.plan"),
    ("benchmarks.cli",),
]
# The two folders' package files hold a docstring and import nothing: below every layer (a room
# prefix would put every module without a room of its own into them).
PACKAGES = ("benchmarks", "pipelines")


def modules(repo: Path = REPO) -> dict[str, Path]:
    """Dotted name (without ``rcnn_bench.``) -> file, for every module of the three folders."""
    out = {}
    for name, folder in FOLDERS.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(repo / folder).with_suffix("").parts]
            out[".".join([name] + [p for p in parts if p != "__init__"])] = path
    return out


def imports(source: str, known: set[str]) -> set[str]:
    """The ``known`` modules that ``source`` imports (``from a import b`` counts as a.b when that
    is a module, else as a)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            out.update(n for n in names if n.removeprefix("rcnn_bench.") in known)
            if not any(n.removeprefix("rcnn_bench.") in known for n in names):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    stripped = {n.removeprefix("rcnn_bench.") for n in out if n.startswith("rcnn_bench.")}
    return stripped & known


def graph(repo: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules it imports (itself left out)."""
    found = modules(repo)
    known = set(found)
    return {m: imports(p.read_text(), known) - {m} for m, p in found.items()}


def room(module: str, layers: list[tuple[str, ...]] = LAYERS) -> tuple[int, str]:
    """(layer index, room) of the longest room prefix naming ``module``."""
    if module in PACKAGES:
        return -1, module
    best = None
    for level, rooms in enumerate(layers):
        for r in rooms:
            if (module == r or module.startswith(r + ".")) and (
                best is None or len(r) > len(best[1])
            ):
                best = (level, r)
    if best is None:
        raise ValueError(f"{module} is in no room of LAYERS: give it one")
    return best


def upward(edges: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS) -> list[str]:
    """Every import that points up a layer or sideways into another room of the same layer."""
    out = []
    for a in sorted(edges):
        (la, ra) = room(a, layers)
        for b in sorted(edges[a]):
            (lb, rb) = room(b, layers)
            if lb > la or (lb == la and ra != rb):
                out.append(f"{a} ({ra}) imports {b} ({rb})")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected set of two or more modules (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_every_module_has_a_room():
    for module in modules():
        room(module)


def test_imports_point_down():
    assert upward(graph()) == []


def test_no_import_circle():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_are_for():
    edges = {
        "datasets.voc": {"pipelines.parts.boxes"},  # up
        "pipelines.rcnn": {"pipelines.fast_rcnn"},  # sideways: one paper file borrows from another
        "benchmarks.harness.plan": {"benchmarks.harness.run"},  # sideways between entry points
        "benchmarks.harness.data": {"benchmarks.harness.preflight"},  # within a room: allowed
        "benchmarks.harness.preflight": {"benchmarks.harness.data"},  # ... but a circle
        "pipelines.parts.boxes": set(),
        "pipelines.fast_rcnn": set(),
        "benchmarks.harness.run": set(),
    }
    assert upward(edges) == [
        "benchmarks.harness.plan (benchmarks.harness.plan) imports benchmarks.harness.run "
        "(benchmarks.harness.run)",
        "datasets.voc (datasets) imports pipelines.parts.boxes (pipelines.parts)",
        "pipelines.rcnn (pipelines.rcnn) imports pipelines.fast_rcnn (pipelines.fast_rcnn)",
    ]
    assert cycles(edges) == [["benchmarks.harness.data", "benchmarks.harness.preflight"]]
    with pytest.raises(ValueError, match=r"scripts\.x is in no room"):
        room("scripts.x")


def test_imports_are_read_wherever_they_stand():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from rcnn_bench.pipelines import registry\n"
        "import rcnn_bench.datasets.voc\n"
        "if TYPE_CHECKING:\n"
        "    from rcnn_bench.pipelines.detector import Detector\n"
        "def f():\n"
        "    from rcnn_bench.pipelines.parts.boxes import box_iou\n"
    )
    known = {"pipelines", "pipelines.registry", "pipelines.detector", "pipelines.parts.boxes",
             "datasets.voc"}  # fmt: skip
    assert imports(source, known) == {
        "pipelines.registry",
        "pipelines.detector",
        "pipelines.parts.boxes",
        "datasets.voc",
    }
