"""Package layering: no import circles between modules (lazy imports inside functions count too),
production code never imports gazal_nemo.testing, and data/ stays below tasks/ and rl/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gazal_nemo"


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_production_code_does_not_import_the_test_helpers():
    graph = _import_graph()
    offenders = sorted((name, target) for name, targets in graph.items() for target in targets
                       if target.startswith("gazal_nemo.testing") and not name.startswith("gazal_nemo.testing"))
    assert offenders == []


def test_data_sits_below_the_task_and_the_trainer():
    graph = _import_graph()
    upward = sorted((name, target) for name, targets in graph.items() if name.startswith("gazal_nemo.data")
                    for target in targets if target.startswith(("gazal_nemo.rl", "gazal_nemo.tasks", "gazal_nemo.eval")))
    assert upward == []
