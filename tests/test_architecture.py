"""The house's shape: no import cycle between modules (lazy imports inside functions count too), and the floor
(`slidedata`) imports none of the rooms built on it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("slidedata", "synthetic", "importers", "embed", "regress", "submission")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` imports the submodule; `from module import name`, the module
                candidates = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                              for a in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in files and c != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph = project_imports()
    assert len(graph) > 40  # the walk found the packages
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_floor_imports_no_room_built_on_it():
    above = tuple(p for p in PACKAGES if p != "slidedata")
    offenders = {m: sorted(t for t in targets if t.split(".")[0] in above)
                 for m, targets in project_imports().items() if m.split(".")[0] == "slidedata"}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_regress_has_one_evaluation_path():
    modules = set(project_imports())
    assert "regress.engine" in modules and not {"regress.stream", "regress.dataset"} & modules
