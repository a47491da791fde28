"""The package's shape: no import cycles, and the planning side never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "atlasflow"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The atlasflow modules one file imports (at any depth: function-local imports count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # the deepest known module the name points at (a name may be a function in a module)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "atlasflow":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        # a package's __init__ is imported along with its modules; edges into it are not cycles
        # unless __init__ itself imports something
        graph[name] = {m for m in imported_modules(path, known) if m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_local_imports(tmp_path):
    graph = import_graph()
    # cli.steps imports the stages inside its command functions: those edges must be seen
    assert any(m.startswith("atlasflow.atlas") for m in graph["atlasflow.cli.steps"])


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_is_over_600_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"


PLANNING_MODULES = [
    "atlasflow.layout",
    "atlasflow.cohort.planning",
    "atlasflow.cohort.manifest",
    "atlasflow.errors",
    "atlasflow.workflow_plan",
    "atlasflow.runtime.server",
    "atlasflow.runtime.provenance",
]


def test_planning_code_does_not_import_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PLANNING_MODULES)
        + "heavy = sorted(m for m in ('torch', 'ants', 'matplotlib') if m in sys.modules)\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"planning imports {out.stdout.strip()}"
