"""The folder tree is the architecture: packages by pipeline stage, lower stages never import higher ones, no
import cycles, and modules and functions small enough to read in a sitting (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tinystories"
# the stages, lowest first; a module may import its own stage and those below it
STAGES = ["core", "data", "model", "inference", "training", "evaluation", "export"]
TOP = len(STAGES)  # cli.py, quickstart.py, __main__.py: the commands on top of every stage
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def stage(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return TOP


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every tinystories module `path` imports, at module level or inside a function (a lazy import is still a
    dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("tinystories"):
                while name not in known and "." in name:  # `from pkg import name`: the module, else the package
                    name = name.rsplit(".", 1)[0]
                if name in known and name != "tinystories":
                    found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {mod: imports(path, known) - {mod} for mod, path in known.items()}


def test_every_module_lives_in_a_stage_package():
    loose = [m for m in modules() if stage(m) == TOP and m.count(".") > 1]
    assert not loose, f"modules outside the stage packages {STAGES}: {loose}"
    top = sorted(m for m in modules() if stage(m) == TOP)
    assert top == ["tinystories", "tinystories.__main__", "tinystories.cli", "tinystories.quickstart"], top


def test_no_upward_imports():
    upward = [f"{a} ({STAGES[stage(a)] if stage(a) < TOP else 'top'}) imports {b} "
              f"({STAGES[stage(b)] if stage(b) < TOP else 'top'})"
              for a, deps in graph().items() for b in deps if stage(b) > stage(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The two rules above are not vacuous: the same parser finds a planted lazy upward import."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from tinystories.cli import main\n")
    assert imports(fake, modules()) == {"tinystories.cli"}
    assert stage("tinystories.core.config") < stage("tinystories.training.loop") < stage("tinystories.cli")


def test_modules_and_functions_stay_small():
    too_long = []
    for mod, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{mod}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{mod}.{node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)
