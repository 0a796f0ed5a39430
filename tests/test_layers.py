"""The import rules of ARCHITECTURE_TARGET.md, read off the AST of every vastd/**/*.py.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`,
absolute or relative. The checker is pure functions over a package directory, so
the self-tests feed it a synthetic package with known faults.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# unit (first name under vastd/) -> (layer, group). Imports go to a lower layer, or stay
# inside their group on the same layer (instances and execution are separate groups).
# `sim` sits between orchestration and the daemon: it may use everything below layer 4,
# and only layer 4/5 modules (the demo command) may use it. The root `vastd/__init__.py`
# runs before every other vastd module, so it sits below them all and imports nothing.
LAYERS: dict[str, tuple[float, str]] = {
    "__init__": (-1, "root"),
    "utils": (0, "utils"),
    "core": (1, "core"),
    "instances": (2, "instances"),
    "execution": (2, "execution"),
    "orchestration": (3, "orchestration"),
    "sim": (3.5, "sim"),
    "daemon": (4, "service"),
    "demo": (4, "service"),
    "status": (4, "service"),
    "views": (4, "service"),
    "control": (4, "service"),
    "metrics": (4, "service"),
    "cli": (5, "entry"),
    "__main__": (5, "entry"),
}
# Where each layer's modules live, for the advice given to an unplaced module.
HOMES: dict[float, str] = {
    0: "utils/",
    1: "core/",
    2: "instances/ or execution/",
    3: "orchestration/",
}
HOMES |= {4: "top level beside daemon.py", 5: "top level beside cli.py"}

PACKAGE = "vastd"


@dataclass(frozen=True)
class Import:
    """One edge of the module graph: `source` imports `target` at `path:line`."""

    source: str
    target: str
    path: str
    line: int


def module_name(root: Path, file: Path) -> str:
    """`<root>/vastd/core/ssh.py` -> `vastd.core.ssh`; a package's `__init__` is the package."""
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of `package` under `root` by dotted name."""
    return {module_name(root, f): f for f in sorted((root / package).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module `name` is or lies in (`vastd.core.ssh.Backoff` -> `.ssh`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(source: str, file: Path, modules: dict[str, Path], root: Path) -> Iterator[Import]:
    """Every vastd module that `file` imports, wherever in the file the import stands."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    is_package = file.name == "__init__.py"
    here = str(file.relative_to(root))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = source.split(".") if is_package else source.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            # `from x import y`: y is a submodule when one of that name exists.
            names = [f"{prefix}.{a.name}" if a.name != "*" else prefix for a in node.names]
        for name in names:
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            target = _resolve(name, modules)
            if target is not None and target != source:
                yield Import(source, target, here, node.lineno)


def import_graph(root: Path, package: str = PACKAGE) -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(root, package)
    edges = [e for m, f in modules.items() for e in imports_of(m, f, modules, root)]
    return modules, list(dict.fromkeys(edges))  # `from x import a, b` is one edge


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def fitting_layers(module: str, edges: list[Import]) -> list[float]:
    """The layers an unplaced module could join: above what it imports, below its importers."""
    uses = [LAYERS[unit_of(e.target)] for e in edges if e.source == module]
    used_by = [LAYERS[unit_of(e.source)] for e in edges if e.target == module]
    fits: list[float] = []
    for layer in sorted(HOMES):
        groups_here = {g for lay, g in uses if lay == layer}
        if any(lay > layer for lay, _ in uses) or len(groups_here) > 1:
            continue  # it would import upward, or from both sides of a split layer
        if any(0 <= lay < layer for lay, _ in used_by):
            continue  # a module below this layer imports it
        fits.append(layer)
    return fits


def layer_violations(modules: Iterable[str], edges: list[Import]) -> list[str]:
    """Unplaced modules and imports that go up or sideways, as `path:line: rule` lines."""
    out: list[str] = []
    for module in sorted(modules):
        unit = unit_of(module)
        if unit not in LAYERS:
            fits = fitting_layers(module, edges)
            where = (
                ", ".join(f"{lay:g} ({HOMES[lay]})" for lay in fits) or "none: it sits in a loop"
            )
            out.append(
                f"{module.replace('.', '/')}.py: unplaced top-level module {unit!r}: move it into "
                f"a layer (or add it to LAYERS); by what it imports and what imports it, it fits "
                f"layers {where}"
            )
    for e in edges:
        src, dst = unit_of(e.source), unit_of(e.target)
        if src not in LAYERS or dst not in LAYERS or src == dst:
            continue  # unplaced modules are reported above; a unit may use itself
        (src_layer, src_group), (dst_layer, dst_group) = LAYERS[src], LAYERS[dst]
        if dst_layer < src_layer or (dst_layer == src_layer and dst_group == src_group):
            continue
        if dst == "sim":
            rule = "only layer 4/5 modules (the demo command) may import sim"
        elif src == "sim":
            rule = "sim may import only what lies below layer 4"
        elif dst_layer == src_layer:
            rule = f"{src} and {dst} never import each other"
        else:
            rule = "imports go downward only"
        out.append(
            f"{e.path}:{e.line}: {e.source} ({src}, layer {src_layer:g}) imports {e.target} "
            f"({dst}, layer {dst_layer:g}): {rule}"
        )
    return out


def strongly_connected(nodes: Iterable[str], edges: list[Import]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit)."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        succ.setdefault(e.source, []).append(e.target)
        succ.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(sorted(set(succ[start]))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(set(succ[child])))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _shortest_cycle(start: str, members: set[str], edges: list[Import]) -> list[Import]:
    """A shortest path of imports from `start` back to itself inside one component."""
    out: dict[str, list[Import]] = {}
    for e in edges:
        if e.source in members and e.target in members:
            out.setdefault(e.source, []).append(e)
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for node in frontier:
            for e in out.get(node, []):
                if e.target == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                if e.target not in came:
                    came[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def cycle_violations(modules: Iterable[str], edges: list[Import]) -> list[str]:
    """One report per import cycle: its modules, a shortest loop, and every edge inside it."""
    out: list[str] = []
    for component in strongly_connected(modules, edges):
        members = set(component)
        loop = _shortest_cycle(component[0], members, edges)
        inner = sorted(
            (e for e in edges if e.source in members and e.target in members),
            key=lambda e: (e.path, e.line),
        )
        lines = [f"import cycle among {len(component)} modules: {', '.join(component)}"]
        lines.append("  e.g. " + " -> ".join([loop[0].source, *(e.target for e in loop)]))
        lines += [f"  {e.path}:{e.line}: {e.source} -> {e.target}" for e in inner]
        out.append("\n".join(lines))
    return out


def check(root: Path, package: str = PACKAGE) -> tuple[list[str], list[str]]:
    """(layer violations, cycles) of the package at `root/package`."""
    modules, edges = import_graph(root, package)
    return layer_violations(modules, edges), cycle_violations(modules, edges)


REPO = Path(__file__).resolve().parent.parent


def test_imports_follow_the_layers() -> None:
    """Every vastd module belongs to a layer and imports only downward (or within its group)."""
    layers, _ = check(REPO)
    assert not layers, f"{len(layers)} layer violations:\n" + "\n".join(layers)


def test_no_import_cycles() -> None:
    """No two vastd modules import each other, directly or around a loop, at any level."""
    _, cycles = check(REPO)
    assert not cycles, f"{len(cycles)} import cycles:\n" + "\n".join(cycles)


# --- self-tests: the checker finds what it must, and nothing else ----------------------------
def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "__init__.py": "",
    "utils/__init__.py": "",
    "utils/log.py": "import logging\n",
    "core/__init__.py": "",
    "core/ssh.py": "from vastd.utils import log\nfrom . import files\n",
    "core/files.py": "from ..utils.log import logging\n",
    "instances/__init__.py": "",
    "instances/api.py": "import vastd.core.ssh\n",
    "execution/__init__.py": "",
    "execution/run.py": "from vastd.core.ssh import X\n",
    "orchestration/__init__.py": "",
    "orchestration/flow.py": "from vastd.instances import api\nfrom vastd.execution.run import Y\n",
    "sim/__init__.py": "from vastd.sim.cloud import Z\n",
    "sim/cloud.py": "from vastd.orchestration import flow\n",
    "daemon.py": "from vastd import status\nfrom vastd.orchestration.flow import W\n",
    "status.py": "from vastd.core import files\n",
    "cli.py": "def demo():\n    from vastd.sim import cloud\n    from vastd.daemon import run\n",
    "__main__.py": "from vastd.cli import main\n",
}


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    """Downward, same-unit, relative and demo imports raise nothing: the rules are not too wide."""
    assert check(_package(tmp_path, CLEAN)) == ([], [])


def test_checker_reports_each_kind_of_violation(tmp_path: Path) -> None:
    """Upward (function-level, TYPE_CHECKING, relative), sideways, sim and unplaced all found."""
    bad = dict(CLEAN)
    bad["core/ssh.py"] = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from vastd.orchestration.flow import W\n"
        "def f():\n"
        "    import vastd.instances.api\n"
        "from .. import daemon\n"
    )
    bad["execution/run.py"] = "from vastd.instances import api\n"
    bad["orchestration/flow.py"] = "from vastd.sim import cloud\n"
    bad["sim/cloud.py"] = "from vastd.daemon import run\n"
    bad["lock.py"] = "from vastd.core import files\n"
    layers, _ = check(_package(tmp_path, bad))
    text = "\n".join(layers)
    assert (
        "vastd/core/ssh.py:3: vastd.core.ssh (core, layer 1) imports vastd.orchestration.flow"
        in text
    )
    assert "vastd/core/ssh.py:5: " in text and "vastd/core/ssh.py:6: " in text
    assert "vastd/execution/run.py:1: " in text and "never import each other" in text
    assert "vastd/orchestration/flow.py:1: " in text and "may import sim" in text
    assert "vastd/sim/cloud.py:1: " in text and "below layer 4" in text
    assert "vastd/lock.py: unplaced top-level module 'lock'" in text and "layers 1 (core/)" in text
    assert len(layers) == 7, text


def test_checker_reports_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """A three-module loop closed by a deferred import is reported with every edge in it."""
    bad = dict(CLEAN)
    bad["core/a.py"] = "from vastd.core import b\n"
    bad["core/b.py"] = "import vastd.core.c\n"
    bad["core/c.py"] = "def late():\n    from .a import thing\n"
    _, cycles = check(_package(tmp_path, bad))
    assert len(cycles) == 1, cycles
    assert cycles[0].startswith("import cycle among 3 modules: vastd.core.a, vastd.core.b, vastd")
    assert "vastd.core.a -> vastd.core.b -> vastd.core.c -> vastd.core.a" in cycles[0]
    assert "vastd/core/c.py:2: vastd.core.c -> vastd.core.a" in cycles[0]


@pytest.mark.parametrize("count", [2, 5])
def test_strongly_connected_finds_separate_loops(count: int) -> None:
    """Independent loops are separate components; a module on no loop is in none."""
    edges = [
        Import(f"m{i}{j}", f"m{i}{(j + 1) % 2}", "x.py", 1) for i in range(count) for j in range(2)
    ]
    edges.append(Import("lone", "m00", "x.py", 1))
    found = strongly_connected(["lone"], edges)
    assert found == [[f"m{i}0", f"m{i}1"] for i in range(count)]


def test_checker_reads_the_real_package() -> None:
    """The real tree is found and parsed: the two tests above cannot pass on an empty graph."""
    modules, edges = import_graph(REPO)
    assert "vastd.core.state" in modules and "vastd.cli" in modules
    assert len(modules) > 40 and len(edges) > 100
