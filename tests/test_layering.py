"""The library's imports point forward along the data flow (data/sim -> tokenizer -> policy -> decoding ->
eval -> pipeline), never into an entry file, and no two modules import each other (at module top or
inside a function: a deferred import is still a dependency)."""

import ast
from pathlib import Path

from common.provenance import REPO_ROOT

LAYERS = ["data", "sim", "tokenizer", "policy", "decoding", "eval", "pipeline"]
ENTRIES = ("phase1_improved", "phase2_draft_retrain", "phase3", "benchmarks", "rsd_entry", "rsd_pipeline")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[int, str]]]:
    """Every ``common`` module -> (line, imported module) for each import statement anywhere in it."""
    found = {}
    for path in sorted((REPO_ROOT / "common").rglob("*.py")):
        names = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                names += [(node.lineno, a.name) for a in node.names]
        found[_module_name(path)] = names
    return found


def _layer(module: str) -> int:
    """Index in LAYERS; -1 for the shared base (common/*.py: artifacts, checkpoints, provenance, ...)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_library_imports_point_forward_and_never_into_entry_files():
    backward = []
    for module, imports in _imports().items():
        for line, name in imports:
            if name.split(".")[0] in ENTRIES:
                backward.append(f"{module}:{line} imports entry {name}")
            elif name.startswith("common.") and _layer(name) > _layer(module):
                backward.append(f"{module}:{line} imports {name} (layer {LAYERS[_layer(name)]} comes after {LAYERS[_layer(module)] if _layer(module) >= 0 else 'the base'})")
    assert backward == []


def test_no_two_library_modules_import_each_other():
    imports = _imports()
    modules = set(imports)
    edges = {m: {n for _, n in imports[m] if n in modules and n != m} for m in modules}
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert cycles == []
