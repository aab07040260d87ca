"""The code layout of ARCHITECTURE.md ("Code layout"), read from the source with `ast`: no import
cycle among budrt's modules, dependencies that point one way between its parts, and functions
short enough to read at once.

Every import counts, also one inside a function or under `if TYPE_CHECKING`: deferring an import
hides a dependency from the interpreter's start-up, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "budrt"

# What a part never imports. The bottom parts (config, model_source, observe, protocol) import no
# other part; the CLI is the top (it may import anything, nothing imports it).
BOTTOM = {"config", "model_source", "observe", "protocol"}
NEVER_IMPORTS = {
    "security": {"store", "engine", "gateway", "server", "control"},
    "store": {"engine", "gateway", "server", "control"},
    "engine": {"store", "protocol", "gateway", "server", "control"},  # no HTTP, no database
    "gateway": {"server", "engine", "image", "control"},
    "image": {"store", "gateway", "server", "control"},  # the server drives it
    "server": {"gateway", "control"},
    "control": {"gateway", "server", "engine", "image"},  # it starts them as processes
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """`budrt.store.models` -> "store"."""
    name = module.split(".")[1] if "." in module else module
    return name


def import_graph() -> dict[str, set[str]]:
    """Each budrt module -> the budrt modules it imports."""
    paths = {module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{name}: a relative import"
                targets.add(node.module)  # `from package import module` names a module too
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in targets if target in paths and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        path.append(module)
        for target in sorted(graph[module]):
            if target in path:
                return [*path[path.index(target) :], target]
            if target not in done and (cycle := visit(target)):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "budrt.model_source" in graph["budrt.store.models"]  # module level
    assert "budrt.engine.kernels" in graph["budrt.server.main"]  # inside a function


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_dependencies_point_one_way() -> None:
    broken = []
    for module, targets in sorted(import_graph().items()):
        source = part(module)
        never = NEVER_IMPORTS.get(source, set())
        for target in sorted(targets):
            other = part(target)
            if other != source and (source in BOTTOM or other in never or other == "cli"):
                broken.append(f"{module} imports {target}")
    assert broken == []


MAX_FUNCTION_LINES = 60


def test_functions_fit_on_a_screen() -> None:
    """No function or method longer than MAX_FUNCTION_LINES (signature and docstring included)."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
