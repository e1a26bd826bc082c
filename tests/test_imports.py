"""The package's import graph, read from the source with ``ast`` (nothing is imported).

Two rules, each a test: no import cycle anywhere in ``kiban`` (imports inside functions count:
a lazy import only hides a cycle until the function runs), and no module imports another
module's private names (``from kiban.x import _y``, or ``x._y`` on an imported kiban module); a
private module (``kiban.data._io``) is for its own package only.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "benchmarks", "bin", "docs", "configs", "build", "dist"}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package (the repository root is ``kiban``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIP or parts[0].startswith(".") or any(p.startswith(".") for p in parts):
            continue
        if not all((ROOT.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # a script in a folder that is no package
        names = ["kiban", *parts[:-1]] + ([] if parts[-1] == "__init__.py" else [path.stem])
        modules[".".join(names)] = path
    return modules


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


@functools.cache
def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every kiban import in ``name``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] == "kiban"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "kiban":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in _imports(name) if target in MODULES and target != name} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(name: str) -> list[str]:
    problems = []
    package = name if _is_package(name) else name.rpartition(".")[0]
    for target, taken, line in _imports(name):
        owner = target.rpartition(".")[0]
        if any(_private(part) for part in target.split(".")) and not (package + ".").startswith(owner + "."):
            problems.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports the private module {target}")
        if taken is not None and _private(taken) and target != name:
            problems.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}.{taken}")
    # attribute access on an imported kiban module: plots._pyplot
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kiban"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target is not None and target != name:
                problems.append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno} uses {target}.{node.attr}")
    return problems


def test_the_graph_sees_the_package():
    assert {"kiban", "kiban.cli", "kiban.fusion.model", "kiban.data.datamodule"} <= set(MODULES)
    assert "kiban.fusion.model" in _graph()["kiban.data.datamodule"] or _graph()["kiban.data.datamodule"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    problems = [p for name in MODULES for p in _private_uses(name)]
    assert not problems, "\n".join(problems)


def test_no_import_cycle_in_tasks():
    """The task heads' modules (the fine-tuning driver, every task type, predict, the pair heads)
    form no cycle, lazy imports included; and the graph does see the task types.
    """
    tasks = {name for name in MODULES if name.startswith("kiban.tasks")}
    assert {"kiban.tasks.pipeline", "kiban.tasks.models", "kiban.tasks.types.protein", "kiban.tasks.predict"} <= tasks
    graph = {name: targets & tasks for name, targets in _graph().items() if name in tasks}
    assert _cycles(graph) == [], "import cycles in kiban.tasks"
    # kiban embed, predict and the pair heads read models, not the fine-tuning pipeline
    for name in ("kiban.tasks.embed", "kiban.tasks.predict", "kiban.tasks.dti"):
        assert "kiban.tasks.finetune" not in graph[name] and "kiban.tasks.pipeline" not in graph[name], name


def test_no_file_in_tasks_is_over_500_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in (ROOT / "tasks").rglob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > 500}
