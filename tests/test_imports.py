"""No import circle among lnshift's modules: every layer can be read, tested and changed from the bottom up.

The graph is built from the source with `ast`, so it sees every import statement wherever it stands:
at the top, inside a function (a lazy import is still a dependency), under `if TYPE_CHECKING:`. What
counts as an edge A -> B:

- `import lnshift.x.y` and `from lnshift.x import y` name the deepest module they reach (`lnshift.x.y`
  when y is a module, else `lnshift.x`); relative imports are resolved against A's package.
- Importing B also runs the `__init__` of each package above B, so A depends on those packages too.
- Edges from A to a package that contains A are left out: Python has loaded that package before A runs,
  so `from . import name` inside `lnshift.report.figures`, say, is package structure, not a dependency.
  (A package's `__init__` importing its own modules is an edge like any other.)
- Names resolved at run time (`importlib.import_module(f"...")`, a worker told which function to run)
  are not imports of the module that holds them.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lnshift"


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file of every module of the package (a package is its __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["lnshift", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def ancestors(name: str) -> list[str]:
    """The packages containing module `name`, outermost first: lnshift.a.b -> [lnshift, lnshift.a]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lnshift modules that module `name` (in `path`) imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            named.update(f"{base}.{alias.name}" for alias in node.names)
    targets = set()
    for dotted in named:
        parts = dotted.split(".")
        reached = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)
        if reached is not None:
            targets.update([reached, *ancestors(reached)])
    return targets - {name, *ancestors(name)}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None when the graph is acyclic (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "lnshift.rundir" in graph["lnshift.training.fit"]  # `from . import rundir as rd`
    ingredients = graph["lnshift.training.ingredients"]
    assert "lnshift.data" in ingredients and "lnshift.data.device" in ingredients
    assert "lnshift.experiments.sweep" in graph["lnshift.cli"]  # imported inside cmd_sweep
    assert "lnshift.report.stats" in graph["lnshift.experiments.sweep_results"]  # inside summarize
    assert "lnshift.report" in graph["lnshift.experiments.sweep_results"]  # the package's __init__ runs first
    run_report = graph["lnshift.report.run_report"]  # `from . import figures as F`, `from .. import rundir as rd`
    assert {"lnshift.report.figures", "lnshift.rundir"} <= run_report and not {"lnshift", "lnshift.report"} & run_report


def test_find_cycle_names_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_among_lnshift_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_training_does_not_import_the_fsr_runner():
    """The FSR estimate trains sub-runs through training (fsr_runs -> fit), never the other way round."""
    graph = import_graph()
    assert (
        "lnshift.analyses.fsr_runs" not in graph["lnshift.training.fit"]
        and "lnshift.training.fit" in graph["lnshift.analyses.fsr_runs"]
    )
