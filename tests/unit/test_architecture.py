"""The package's imports run one way: parallel <- communication <- layers <- models <-
training/serving/evaluation <- cli (with kernels, data and checkpoint low in the order), and no
module-level import cycle exists. Walks every ``import`` statement of every module, lazy
(function-level) imports included, so a cycle cannot hide behind a local import."""
from __future__ import annotations

import ast
from pathlib import Path

import megatron_ext

ROOT = Path(megatron_ext.__path__[0])
# package -> the packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "parallel": set(),
    "kernels": set(),
    "data": {"parallel"},
    "checkpoint": {"parallel"},
    "communication": {"parallel", "kernels", "data"},
    "layers": {"parallel", "kernels", "data", "communication"},
    "models": {"parallel", "kernels", "data", "communication", "layers", "checkpoint"},
    "serving": {"parallel", "kernels", "data", "communication", "layers", "models", "checkpoint"},
    "training": {"parallel", "kernels", "data", "communication", "layers", "models",
                 "checkpoint"},
    "evaluation": {"parallel", "kernels", "data", "communication", "layers", "models",
                   "checkpoint", "serving", "training"},
    "cli": {"parallel", "kernels", "data", "communication", "layers", "models", "checkpoint",
            "serving", "training", "evaluation"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".")[:-node.level if path.name != "__init__.py"
                                       else len(module.split(".")) - node.level + 1]
                node_module = ".".join(base + ([node.module] if node.module else []))
            else:
                node_module = node.module or ""
            out.add(node_module)
            out |= {f"{node_module}.{a.name}" for a in node.names}
    return {m for m in out if m == "megatron_ext" or m.startswith("megatron_ext.")}


def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def test_every_package_is_placed_in_the_order():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), f"packages not placed in the import order: {packages ^ set(ALLOWED)}"


def test_imports_run_one_way():
    files = _files()
    bad = []
    for module, path in files.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED:
            continue  # megatron_ext/__init__.py: the public surface may import anything
        own = parts[1]
        for target in _imports(path, module, top_level_only=False):
            tparts = target.split(".")
            if len(tparts) < 2 or tparts[1] not in ALLOWED:
                if target != "megatron_ext":
                    continue
                bad.append(f"{module} imports the top-level package megatron_ext")
                continue
            if tparts[1] != own and tparts[1] not in ALLOWED[own]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the one-way order:\n" + "\n".join(sorted(bad))


def test_no_module_level_import_cycle():
    files = _files()
    graph = {m: {t for t in _imports(p, m, top_level_only=True) if t in files and t != m}
             for m, p in files.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
