"""The house's shape, as ARCHITECTURE.md draws it: no import cycle between modules (lazy imports inside functions
count too), and nothing imports upwards, at every layer of the diagram."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("slidedata", "synthetic", "importers", "embed", "regress", "submission")
# ARCHITECTURE.md's diagram, bottom up: a module may import its own package and the layers below it, never its own
# layer's other packages nor anything above. The benchmarks are scripts on top that no package may import.
LAYERS = (("slidedata",), ("synthetic", "importers", "embed", "regress"), ("submission",), ("benchmarks",))
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    # the benchmark scripts import each other by file name (they put their folder on sys.path)
    files |= {f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")}
    aliases = {p.removeprefix("benchmarks."): p for p in files if p.startswith("benchmarks.")}
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
            candidates = [aliases.get(c, c) for c in candidates]
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


def upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """module -> the modules it imports from its own layer's other packages or from a layer above (should be none)."""
    offenders = {}
    for module, targets in graph.items():
        here = module.split(".")[0]
        bad = sorted(t for t in targets if (there := t.split(".")[0]) != here and LAYER_OF[there] >= LAYER_OF[here])
        if bad:
            offenders[module] = bad
    return offenders


def test_nothing_imports_upwards_or_sideways_at_any_layer():
    graph = project_imports()
    assert {m.split(".")[0] for m in graph} == set(LAYER_OF)  # every layer was walked, benchmarks included
    assert upward_imports(graph) == {}


def test_the_layer_rule_catches_an_upward_and_a_sideways_import():
    graph = {"slidedata.sample": {"regress.metrics"}, "regress.fit": {"embed.pipeline", "slidedata.sample"},
             "submission.main": {"regress.fit", "benchmarks.bench_real"}, "embed.pipeline": {"embed.patches"}}
    assert upward_imports(graph) == {"slidedata.sample": ["regress.metrics"], "regress.fit": ["embed.pipeline"],
                                     "submission.main": ["benchmarks.bench_real"]}


def test_the_layers_are_the_diagrams():
    """Every package of the code is in ARCHITECTURE.md's diagram, on the row this test puts it."""
    diagram = (ROOT / "ARCHITECTURE.md").read_text().split("```")[1]
    rows = [set(re.findall(r"\b([a-z]+)/(?=\s|$)", line)) for line in diagram.splitlines()]
    assert [row for row in rows if row][::-1] == [set(layer) for layer in LAYERS]  # the diagram reads top down
    assert set(PACKAGES) == set(LAYER_OF) - {"benchmarks"}
