"""The package layout keeps its promises: no import cycle between cage_lens modules (imports inside
functions count), no module that only re-exports another, the core's layers point down, and the
README's "What is where" table names exactly the modules and subpackages that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cage_lens"

#: the LRP core, bottom layer first (docs/rules.md#layers-of-the-core)
CORE_LAYERS = ["memory", "rulesets", "autograd", "precision", "adapter", "hooks", "realise", "recompute", "engine", "certificate", "api"]


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(module: str, node: ast.AST, is_package: bool, known: set[str]) -> list[str]:
    """The cage_lens modules an import statement names (a name imported from a package counts as
    the submodule when one exists, else as the package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
    out = []
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the cage_lens modules it imports anywhere in its body (top level or inside functions).
    Package ``__init__`` files are left out as nodes: they are the lazy public surface."""
    modules = module_names()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= {d for d in _imported(name, node, False, known) if d != name}
        graph[name] = {d for d in deps if modules[d].name != "__init__.py"}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reexport_only(path: Path) -> bool:
    """A module whose body is nothing but a docstring, imports and ``__all__`` (a shim)."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    rest = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))
            and not (isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["__all__"])]
    imports = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))
               and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    return bool(imports) and not rest


# ---------------------------------------------------------------------------- the checkers themselves
def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from cage_lens.core import engine\n")
    node = tree.body[0].body[0]
    assert _imported("cage_lens.core.adapter", node, False, {"cage_lens.core", "cage_lens.core.engine"}) == [
        "cage_lens.core.engine"]


def test_the_shim_detector_tells_a_shim_from_a_module(tmp_path):
    shim = tmp_path / "shim.py"
    shim.write_text('"""old home"""\nfrom cage_lens.circuit import *  # noqa\nfrom cage_lens.circuit import graph\n'
                    '__all__ = ["graph"]\n')
    real = tmp_path / "real.py"
    real.write_text("from cage_lens.errors import InputError\n\ndef f():\n    raise InputError('x')\n")
    assert reexport_only(shim) and not reexport_only(real)


# ---------------------------------------------------------------------------- the package
def test_no_import_cycles_between_modules():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles (imports inside functions count): " + "; ".join(" ↔ ".join(c) for c in cycles)


def test_no_module_only_reexports_another():
    shims = [name for name, path in module_names().items() if path.name != "__init__.py" and reexport_only(path)]
    assert shims == [], f"modules that only re-export others: {shims}"


def test_core_layers_point_down():
    graph = import_graph()
    layer = {f"cage_lens.core.{m}": i for i, m in enumerate(CORE_LAYERS)}
    core = {name for name in module_names() if name.startswith("cage_lens.core.")}
    assert core == set(layer), f"core modules not in the layer list: {sorted(core ^ set(layer))}"
    upward = [f"{m} (layer {layer[m] + 1}) imports {d} (layer {layer[d] + 1})"
              for m in sorted(layer) for d in sorted(graph[m]) if d in layer and layer[d] >= layer[m]]
    outside = [f"{m} imports {d}" for m in sorted(layer) for d in sorted(graph[m])
               if not d.startswith("cage_lens.core") and d != "cage_lens.errors"]
    assert upward == [] and outside == [], upward + outside


def test_readme_table_names_the_modules_that_exist():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What is where", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `cage_lens")]
    named = {n for first, _ in rows for n in re.findall(r"`(cage_lens(?:\.[a-z_]+)*)`", first)}
    modules = module_names()
    subpackages = {n for n, p in modules.items() if p.name == "__init__.py" and n != "cage_lens"}
    # inside a subpackage's row, `sub.module` names one of its modules
    members = {f"cage_lens.{m}" for first, concept in rows for m in re.findall(r"`([a-z_]+\.[a-z_]+)`", concept)
               if f"cage_lens.{m.split('.')[0]}" in subpackages}
    missing = sorted(n for n in named | members if n not in modules)
    assert missing == [], f"the README's table names modules that do not exist: {missing}"
    top_modules = {n for n, p in modules.items() if n.count(".") == 1 and p.name != "__init__.py"}
    unlisted = sorted(n for n in subpackages | top_modules if n not in named and n.count(".") == 1)
    assert unlisted == [], f"the README's table does not list: {unlisted}"


def test_import_cage_lens_does_not_import_torch():
    code = "import sys, cage_lens; print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
