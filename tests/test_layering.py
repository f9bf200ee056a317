"""The package's layering, read from the AST of every ``stepdistill/**/*.py`` (nothing is imported).

- no import cycle among stepdistill modules (module-level and function-local imports alike);
- no import of another module's private (``_name``) names;
- a module imports only from its own layer or a lower one (``LAYERS``);
- function-local imports are under 5% of all imports, leaving out the optional dependencies.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stepdistill"

#: bottom to top; a unit is a top-level module or subpackage of stepdistill ("" is the package itself)
LAYERS: list[set[str]] = [
    # 0: leaves: errors, caches, tensors, schedules, conditions, losses, attention kernels, the training batch
    {"", "errors", "cache", "dtensors", "schedules", "conditioning", "losses", "kernels", "batch", "args"},
    # 1: denoisers and what wraps them: LoRA, EMA, sampling, guidance, heads, the tiny test stacks
    {"denoisers", "lora", "ema", "sampling", "guidance", "heads", "tiny_stacks"},
    # 2: the roles (teacher, generator, critic) and their adapters, hybrid sampling, the teacher builders
    {"adapters", "roles", "hybrid", "teachers"},
    # 3: data sources and the distillation algorithms
    {"data", "algorithms"},
    # 4: the Task protocol (what the trainer and evaluation ask of a dataset)
    {"tasks"},
    # 5: the trainer
    {"training"},
    # 6: few-step pipelines, export and evaluation
    {"pipelines", "eval"},
    # 7: Hydra config composition, its reference, and the workflows built from it (train, teacher, evaluate)
    {"config", "config_reference", "workflows"},
    # 8: the memory planner and the benchmark suites
    {"planner", "bench"},
    # 9: the commands (``run(overrides)``)
    {"commands"},
    # 10: the command line
    {"cli"},
]

#: optional dependencies: imported where used (inside a function) and not counted in the ratio
OPTIONAL = {"xformers", "torchao", "bitsandbytes"}
MAX_LOCAL_RATIO = 0.05


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    target: str  # the imported module (a submodule where ``from pkg import submodule``)
    name: str | None  # the imported name of ``from x import name``
    local: bool  # inside a function
    type_checking: bool  # under ``if TYPE_CHECKING:``
    top: str  # the imported top-level package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _walk(node: ast.AST, local: bool = False, type_checking: bool = False):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local, type_checking
        yield from _walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                         type_checking or _is_type_checking(child))


def _from_module(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if FILES[module].name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports() -> list[Import]:
    found = []
    for module, path in FILES.items():
        for node, local, tc in _walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            else:
                source = _from_module(module, node)
                pairs = [(f"{source}.{a.name}" if f"{source}.{a.name}" in FILES else source, a.name)
                         for a in node.names]
            for target, name in pairs:
                found.append(Import(module, node.lineno, target, name, local, tc, target.split(".")[0]))
    return found


def statements() -> list[Import]:
    """One entry per import statement (its first name), for counting."""
    seen, out = set(), []
    for imp in imports():
        if (imp.module, imp.line) not in seen:
            seen.add((imp.module, imp.line))
            out.append(imp)
    return out


def internal() -> list[Import]:
    return [i for i in imports() if i.top == "stepdistill"]


def where(imp: Import) -> str:
    return f"{FILES[imp.module].relative_to(PACKAGE.parent)}:{imp.line}"


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit(module) in units:
            return i
    raise AssertionError(f"{FILES[module].relative_to(PACKAGE.parent)}: {unit(module)!r} is in no layer of LAYERS")


def cycles() -> list[list[str]]:
    """The strongly connected components (more than one module) of the import graph (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in FILES}
    for imp in internal():
        if not imp.type_checking and imp.target in FILES:
            graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_import_resolves():
    missing = [f"{where(i)}: {i.target}" for i in internal() if i.target not in FILES]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_cycle():
    lines = []
    for component in cycles():
        edges = [f"  {where(i)}: {i.module} -> {i.target}" for i in internal()
                 if i.module in component and i.target in component and not i.type_checking]
        lines.append(" <-> ".join(component) + "\n" + "\n".join(dict.fromkeys(edges)))
    assert not lines, "import cycles:\n" + "\n".join(lines)


def test_no_private_import_across_modules():
    bad = [f"{where(i)}: {i.name} from {i.target}" for i in internal()
           if i.name and i.name.startswith("_") and not i.name.startswith("__") and i.target != i.module]
    assert not bad, "imports of another module's private names:\n" + "\n".join(bad)


def test_layers_import_only_downwards():
    bad = [f"{where(i)}: {i.module} (layer {layer(i.module)}) imports {i.target} (layer {layer(i.target)})"
           for i in internal() if i.target in FILES and layer(i.target) > layer(i.module)]
    assert not bad, "imports of a higher layer:\n" + "\n".join(dict.fromkeys(bad))


def test_few_function_local_imports():
    counted = [i for i in statements() if i.top not in OPTIONAL | {"__future__"} and not i.type_checking]
    local = [i for i in counted if i.local]
    ratio = len(local) / len(counted)
    print(f"imports: {len(counted)}, function-local: {len(local)} ({ratio:.1%})")
    assert ratio < MAX_LOCAL_RATIO, (f"{len(local)} of {len(counted)} imports ({ratio:.1%}) are inside functions "
                                     f"(limit {MAX_LOCAL_RATIO:.0%}):\n" + "\n".join(
                                         f"  {where(i)}: {i.target}" for i in local))
