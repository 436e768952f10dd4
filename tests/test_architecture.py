"""The package's layout keeps its promises: rooms import only downwards, the torch-free and
Optuna-free rooms stay free of them, and no two modules import each other (docs/architecture.md)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autodrop"
# Lower numbers sit further from the user; a module may import its own room and the ones below.
FLOORS = {"config": 0, "errors": 0, "nets": 1, "training": 2, "run": 3, "outputs": 4, "api": 5, "cli": 6,
          "__main__": 6, "__init__": 6}
NO_OPTUNA_ROOMS = ("nets", "training")
NO_TORCH_MODULES = ("autodrop.outputs.results", "autodrop.outputs.text", "autodrop.outputs.importance",
                    "autodrop.run.records", "autodrop.run.space", "autodrop.run.noise", "autodrop.config")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (functions too), as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from autodrop.nets import masks`` imports the module autodrop.nets.masks.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _own(imported: set[str], modules: dict[str, Path]) -> set[str]:
    return {name for name in imported if name in modules and name != "autodrop"}


def _floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS["__init__"] if len(parts) == 1 else FLOORS[parts[1]]


def test_every_module_lives_in_a_known_room() -> None:
    for module in _modules():
        assert module == "autodrop" or module.split(".")[1] in FLOORS, module


def test_rooms_import_only_their_own_room_and_the_ones_below() -> None:
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        for target in _own(_imports(path), modules):
            if _floor(target) > _floor(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_nets_and_training_import_no_optuna() -> None:
    modules = _modules()
    wrong = [
        f"{module} imports {name}"
        for module, path in modules.items()
        if module.split(".")[1:2] and module.split(".")[1] in NO_OPTUNA_ROOMS
        for name in _imports(path)
        if name.split(".")[0] in ("optuna", "optuna_dashboard")
    ]
    assert not wrong, wrong


def _closure(start: str, modules: dict[str, Path]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_own(_imports(modules[module]), modules))
    return seen


@pytest.mark.parametrize("module", NO_TORCH_MODULES)
def test_results_and_text_reach_no_torch_even_through_what_they_import(module: str) -> None:
    modules = _modules()
    reached = _closure(module, modules)
    wrong = [f"{m} imports {name}" for m in sorted(reached) for name in _imports(modules[m])
             if name.split(".")[0] in ("torch", "torchvision")]
    assert not wrong, wrong


def test_results_and_text_load_without_torch() -> None:
    code = (
        "import sys\n"
        f"import {', '.join(NO_TORCH_MODULES)}\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "TORCH False"


def test_no_two_modules_import_each_other() -> None:
    modules = _modules()
    graph = {module: _own(_imports(path), modules) for module, path in modules.items()}
    cycles = []
    for module, targets in graph.items():
        for target in targets:
            if module in _closure_in(graph, target) and module != target:
                cycles.append(f"{module} <-> {target}")
    assert not cycles, sorted(set(cycles))


def _closure_in(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen
