"""The package's shape, checked from its source: imports run one way, no private name crosses a
module boundary, and no import hides inside a function to dodge a cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_kit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports():
    """(importer, imported module, names, at module level?) for every import of qlora_kit's own code."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", node)
                names = [a.name for a in node.names]
                # `from . import x` / `from .pkg import module` import modules, not names
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                for t in submodules or [target]:
                    if t.startswith("qlora_kit"):
                        found.append((name, t, [] if submodules else names, id(node) in top))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("qlora_kit"):
                        found.append((name, alias.name, [], id(node) in top))
    return modules, found


def module_graph(modules, found) -> dict[str, set[str]]:
    """Module-level imports; a package's __init__ (the public API, importing everything) is left out
    as an importer, since importing a submodule runs it first anyway."""
    graph = {m: set() for m in modules}
    for importer, target, _, top in found:
        if top and importer in graph and not (PACKAGE.parent / importer.replace(".", "/") / "__init__.py").exists():
            graph[importer].add(target)
    return graph


def reaches(graph, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return False


def test_no_private_name_crosses_a_module():
    _, found = imports()
    private = [f"{importer} imports {n} from {target}" for importer, target, names, _ in found
               for n in names if n.startswith("_")]
    assert not private, private


def test_module_level_imports_have_no_cycle():
    modules, found = imports()
    graph = module_graph(modules, found)
    cycles = [f"{m} -> {t} -> ... -> {m}" for m, targets in graph.items() for t in targets
              if t != m and reaches(graph, t, m)]
    assert not cycles, cycles


def test_no_import_inside_a_function_dodges_a_cycle():
    """A function-level import of M from N is a dodge when M, at module level, leads back to N."""
    modules, found = imports()
    graph = module_graph(modules, found)
    dodges = [f"{importer} imports {target} inside a function, and {target} leads back to {importer}"
              for importer, target, _, top in found if not top and reaches(graph, target, importer)]
    assert not dodges, dodges


@pytest.mark.parametrize("layer, below", [
    ("qlora_kit.dtypes", ["qlora_kit.quant", "qlora_kit.lora"]),
    ("qlora_kit.quant", ["qlora_kit.lora", "qlora_kit.inits"]),
    ("qlora_kit.lora", ["qlora_kit.inits", "qlora_kit.adapt", "qlora_kit.adapters", "qlora_kit.loading"]),
    ("qlora_kit.inits", ["qlora_kit.adapt", "qlora_kit.adapters", "qlora_kit.loading"]),
])
def test_core_layers_import_one_way(layer, below):
    """dtypes <- quant <- lora <- inits <- (add/merge) <- loading, training, export: a lower layer never
    reaches a higher one."""
    modules, found = imports()
    graph = module_graph(modules, found)
    assert not [b for b in below if reaches(graph, layer, b)]
