"""The package reads as the pipeline: imports go down the layers only, and no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

import qlora_kit

PACKAGE = Path(qlora_kit.__file__).parent

# Lower numbers lie lower: a module may import its own layer or below, never above (see docs/architecture.md).
LAYERS = {
    "errors": 0,
    "recipe": 1,
    "metrics": 1,
    "resolve": 2,
    "rundir": 2,
    "tokenizer": 3,
    "tracking": 3,
    "model": 4,
    "checkpoints": 4,
    "data": 5,
    "launch": 5,
    "plan": 5,
    "evaluate": 6,
    "train": 7,
    "merge": 7,
    "export": 8,
    "bench": 8,
    "preference": 8,
    "demo_model": 8,
    "docs": 9,
    "console": 9,
    "cli": 10,
    "__main__": 11,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every qlora_kit module this file imports, at the top or inside a function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("qlora_kit")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            if base.startswith("qlora_kit"):
                found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    assert top in LAYERS, f"{module}: place the new module in LAYERS (and docs/architecture.md)"
    return LAYERS[top]


def test_no_import_goes_up_a_layer():
    upward = [
        f"{name} -> {target}"
        for name, targets in graph().items()
        if name != "qlora_kit"
        for target in targets
        if target != "qlora_kit" and layer(target) > layer(name)
    ]
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(edges[node]):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    # A package's __init__ importing its own submodules (which import siblings through it) is not a cycle of stages.
    real = [c for c in cycles if len({part.split(".")[1] for part in c.split(" -> ") if "." in part}) > 1]
    assert real == []


def test_no_module_calls_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_kit"):
                offenders += [f"{module_name(path)}: {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id.endswith("_stage"):
                    offenders.append(f"{module_name(path)}: {owner.id}.{node.attr}")
    assert offenders == []
