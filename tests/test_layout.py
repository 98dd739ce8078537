"""The source layout keeps its promises: imports run one way along the data's path, with no
circles (a function's own imports included), and functions fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "instructlm"
# Lowest first: a module may import from its own stage or from stages before it.
STAGES = ["errors", "folders", "data", "runs", "model", "answering", "measuring", "training",
          "curve", "serve", "export", "arguments", "cli", "__main__"]
MAX_FUNCTION_LINES = 60
LONG_ALLOWED = {("arguments.py", "build_parser")}  # one add_argument a line


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it, functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import module` names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known and name != "instructlm"}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, set(found)) - {name} for name, path in found.items()}


def stage(module: str) -> int:
    return STAGES.index(module.split(".")[1])


def test_every_module_belongs_to_a_stage():
    assert {m.split(".")[1] for m in modules() if m != "instructlm"} <= set(STAGES)


def test_the_package_has_no_relative_imports_to_rewrite_when_modules_move():
    relative = [f"{p.relative_to(SRC)}:{node.lineno}" for p in PACKAGE.rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == []


def test_imports_run_one_way_along_the_stages():
    upward = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
              if stage(b) > stage(a)]
    assert upward == []


def test_no_import_circles_between_modules():
    deps = graph()
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    circles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(deps[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(deps):
        if name not in state:
            walk(name, [name])
    assert circles == []


def test_functions_fit_on_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    path.name, node.name) not in LONG_ALLOWED:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines})")
    assert long == []
